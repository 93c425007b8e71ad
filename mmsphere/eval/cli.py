"""``mmsphere eval-retrieval`` / ``python scripts/eval_retrieval.py``: text-video retrieval evaluation.

Prints t2v and v2t R@1/5/10, MdR and MnR (DSL rows only with ``--dsl``, labelled as such) and the
geometry diagnostics; writes a JSON with everything needed to reproduce the numbers.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from mmsphere.cli_errors import ArgumentParser, non_negative_int, positive_float, positive_int, run_cli
from mmsphere.config import ConfigError, DataError
from mmsphere.eval.evaluate import evaluate_retrieval
from mmsphere.eval.media_list import MediaListLoader
from mmsphere.eval.report import format_table, versions, write_json

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    """Evaluate a run directory (or an open_clip model) on retrieval shards or a media list."""
    parser = ArgumentParser(prog="mmsphere eval-retrieval", description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="URLS",
                      help="webdataset shard URLs, e.g. 'shards/test-{000000..000009}.tar' or 'shards/test-*.tar'")
    data.add_argument("--list", metavar="FILE", help="CSV/JSONL of media paths and captions, or the MSR-VTT 1k-A CSV")
    parser.add_argument("--media-root", metavar="DIR", help="folder the media paths of --list are relative to")
    parser.add_argument("--modality", choices=("video", "image"), default="video")
    parser.add_argument("--frames", type=int, default=12, help="frames per video, sampled uniformly (default 12)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="decoding processes (default 0: in this process)")
    parser.add_argument("--out", default="retrieval_results.json", help="results JSON (default %(default)s)")
    parser.add_argument("--save-sim", metavar="SIM.npy", help="write the caption x video similarity matrix and its keys")
    parser.add_argument("--dsl", action="store_true", help="add dual-softmax (DSL) post-processed rows, labelled as such")
    parser.add_argument("--dsl-temperature", type=positive_float,
                        help="DSL temperature (default: 1 / the model's logit scale)")
    parser.add_argument("--chunk-size", type=positive_int,
                        help="query rows scored at once (default: ~16M scores per chunk)")
    return run_cli(parser, argv, lambda args: run_evaluation(args, argv))


def run_evaluation(args: argparse.Namespace, argv: list[str]) -> int:
    """Check the arguments, load the model, evaluate, print the table and write the results JSON."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.list is None and args.media_root is not None:
        raise ConfigError("--media-root goes with --list, not with --data")
    if args.frames < 1:
        raise ConfigError(f"--frames={args.frames} must be >= 1")
    if args.save_sim is not None and Path(args.save_sim).suffix != ".npy":
        raise ConfigError(f"--save-sim {args.save_sim!r} must end in .npy (numpy's format, np.load reads it)")
    if args.list is not None and not Path(args.list).is_file():
        raise DataError(f"--list {args.list!r} does not exist")
    if args.media_root is not None and not Path(args.media_root).is_dir():
        raise DataError(f"--media-root {args.media_root!r} is not a directory")
    # lazy: run_dir imports open_clip via mmsphere.models (seconds); keeps `--help` fast
    from mmsphere.models.run_dir import load_dual_encoder

    model, model_identity = load_dual_encoder(args.run, args.model, args.pretrained, args.device)
    if args.data is not None:
        data: Any = args.data
        data_identity = {"urls": args.data}
    else:
        data, data_identity = list_batches(model, args.list, args.media_root, modality=args.modality,
                                           frames=args.frames, batch_size=args.batch_size, workers=args.workers)
    results = evaluate_retrieval(
        model, data, modality=args.modality, frames=args.frames, batch_size=args.batch_size,
        workers=args.workers, dsl=args.dsl, dsl_temperature=args.dsl_temperature, chunk_size=args.chunk_size,
        save_sim=args.save_sim,
    )

    results["data"].update(data_identity, frames=args.frames if args.modality == "video" else 1)
    results = {"model": model_identity, **results, "versions": versions(), "command": ["eval-retrieval", *argv]}
    print(format_results(results))
    print(f"\nresults: {write_json(args.out, results)}")
    if args.save_sim:
        print(f"similarity matrix: {results['saved_similarity']['similarity']} "
              f"(keys: {results['saved_similarity']['keys']})")
    return 0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--run RUN_DIR | --model NAME [--pretrained TAG]`` and ``--device``, shared with ``score-ood``."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", metavar="RUN_DIR", help="a run directory written by mmsphere train")
    model.add_argument("--model", metavar="NAME", help="an open_clip architecture name or JSON config")
    parser.add_argument("--pretrained", metavar="TAG", help="open_clip pretrained tag or checkpoint (with --model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def list_batches(model: Any, list_file: str, media_root: str | None, *, modality: str, frames: int, batch_size: int,
                 workers: int) -> tuple[Any, dict[str, Any]]:
    """Evaluation batches of a media list (CSV/JSONL or the MSR-VTT 1k-A CSV) and its identity."""
    # lazy: run_dir imports open_clip via mmsphere.models (seconds); keeps `--help` fast
    from mmsphere.models.run_dir import file_sha256

    batches = MediaListLoader(list_file, media_root, modality=modality, frames=frames, image_size=model.image_size,
                              image_mean=model.image_mean, image_std=model.image_std, batch_size=batch_size,
                              workers=workers)
    identity = {"list": str(Path(list_file).resolve()), "list_sha256": file_sha256(list_file),
                "media_root": str(Path(media_root).resolve()) if media_root else None,
                "skipped_list_lines": batches.skipped_lines}
    return batches, identity


def format_results(results: dict[str, Any]) -> str:
    """The terminal report: metrics table (DSL rows labelled), set sizes, tie rule and geometry."""
    labels = {"t2v": "t2v (text->video)", "v2t": "v2t (video->text)",
              "t2v_dsl": "t2v + DSL post-processing", "v2t_dsl": "v2t + DSL post-processing"}
    rows = []
    for direction, metrics in results["metrics"].items():
        base = direction.removesuffix("_dsl")
        rows.append([labels[direction], metrics["R@1"], metrics["R@5"], metrics["R@10"], metrics["MdR"],
                     metrics["MnR"], results["num_queries"][base], results["num_gallery"][base]])
    data = results["data"]
    lines = [
        f"retrieval on {data['num_videos']} {data['modality']}s with {data['num_captions']} captions"
        + (f" ({sum(data['skipped'].values())} samples skipped: {data['skipped']})" if data["skipped"] else ""),
        format_table(["direction", "R@1", "R@5", "R@10", "MdR", "MnR", "queries", "gallery"], rows),
        f"tie rule: {results['tie_rule']}",
    ]
    if "dsl" in results:
        lines.append(f"DSL rows: {results['dsl']['definition']} (T={results['dsl']['temperature']:.4g})")
    geometry = results["geometry"]
    lines.append(
        "geometry: alignment {alignment:.4f}  uniformity image {uniformity_image:.4f} / text {uniformity_text:.4f} "
        "/ union {uniformity_union:.4f}  modality gap {modality_gap:.4f}  mean angle positive "
        "{mean_positive_angle:.2f}° / negative {mean_negative_angle:.2f}°".format(**geometry)
    )
    return "\n".join(lines)
