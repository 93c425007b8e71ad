"""``mmsphere eval-retrieval`` / ``python scripts/eval_retrieval.py``: text-video retrieval evaluation.

Prints t2v and v2t R@1/5/10, MdR and MnR (DSL rows only with ``--dsl``, labelled as post-processed)
and the geometry diagnostics; writes the results card (``--out`` JSON and the markdown beside it).
``--protocol NAME`` runs a named benchmark from its own annotation files; a listed item that is
missing or does not decode stops the run unless ``--allow-missing``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from mmsphere.cli_errors import ArgumentParser, non_negative_int, positive_float, positive_int, run_cli
from mmsphere.config import ConfigError, DataError
from mmsphere.data.modalities import MODALITY_REGISTRY
from mmsphere.eval.benchmark import DEFAULT_FRAMES, evaluate_set, evaluate_shards, list_set, protocol_set
from mmsphere.eval.completeness import ALLOW_FLAG, refuse_incomplete
from mmsphere.eval.protocols import get_protocol, import_modules
from mmsphere.eval.report import format_table, sibling, versions
from mmsphere.results.card import make_card, model_identity, model_precision, subset_line, write_card

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    """Evaluate a run directory (or an open_clip model) on a benchmark protocol, retrieval shards or a media list."""
    parser = ArgumentParser(prog="mmsphere eval-retrieval", description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--protocol", metavar="NAME",
                      help="a named benchmark (mmsphere protocols lists them): msrvtt-1k-a, msrvtt-full, msvd, "
                           "didemo, activitynet, lsmdc")
    data.add_argument("--data", metavar="URLS",
                      help="webdataset shard URLs, e.g. 'shards/test-{000000..000009}.tar' or 'shards/test-*.tar'")
    data.add_argument("--list", metavar="FILE", help="CSV/JSONL of media paths and captions, or the MSR-VTT 1k-A CSV")
    parser.add_argument("--media-root", metavar="DIR",
                        help="folder of the videos (searched recursively by --protocol; "
                             "--list paths are relative to it)")
    parser.add_argument("--annotations", metavar="PATH",
                        help="with --protocol: the folder holding its annotation files, or the file itself "
                             "(default: --media-root)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="evaluate what is found when listed items are missing or do not decode; every output "
                             "then says it is a subset and the names go to <out>.missing.txt")
    parser.add_argument("--imports", action="append", default=[], metavar="MODULE",
                        help="a module that registers your own protocols or modalities (repeat for several)")
    parser.add_argument("--modality", default="video",
                        help="the media's modality: video, image or one registered by --imports (default video)")
    parser.add_argument("--frames", type=int,
                        help="frames per video, sampled uniformly (default: the protocol's, else 12)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="decoding processes (default 0: in this process)")
    parser.add_argument("--out", default="retrieval/results.json",
                        help="results card JSON; the markdown card goes beside it as .md (default %(default)s)")
    parser.add_argument("--save-sim", metavar="SIM.npy", help="write the caption x video similarity matrix and its keys")
    parser.add_argument("--dsl", action="store_true", help="add dual-softmax (DSL) post-processed rows, labelled as such")
    parser.add_argument("--dsl-temperature", type=positive_float,
                        help="DSL temperature (default: 1 / the model's logit scale)")
    parser.add_argument("--chunk-size", type=positive_int,
                        help="query rows scored at once (default: ~16M scores per chunk)")
    return run_cli(parser, argv, lambda args: run_evaluation(args, argv))


def run_evaluation(args: argparse.Namespace, argv: list[str]) -> int:
    """Check the arguments and the data, load the model, evaluate, print the table and write the card."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.data is not None and args.media_root is not None:
        raise ConfigError("--media-root goes with --list or --protocol, not with --data")
    if args.protocol is not None and args.media_root is None:
        raise ConfigError(f"--protocol {args.protocol} needs --media-root DIR, the folder holding its videos")
    if args.protocol is not None and args.modality != "video":  # protocols list video files
        raise ConfigError(f"--protocol {args.protocol} is a video benchmark; --modality {args.modality} goes with "
                          "--data or --list")
    if args.annotations is not None and args.protocol is None:
        raise ConfigError("--annotations goes with --protocol")
    if args.frames is not None and args.frames < 1:
        raise ConfigError(f"--frames={args.frames} must be >= 1")
    if args.save_sim is not None and Path(args.save_sim).suffix != ".npy":
        raise ConfigError(f"--save-sim {args.save_sim!r} must end in .npy (numpy's format, np.load reads it)")
    if Path(args.out).suffix == ".md":
        raise ConfigError(f"--out {args.out!r} is the card's JSON; its markdown goes beside it as .md")
    if args.list is not None and not Path(args.list).is_file():
        raise DataError(f"--list {args.list!r} does not exist")
    if args.media_root is not None and not Path(args.media_root).is_dir():
        raise DataError(f"--media-root {args.media_root!r} is not a directory")
    import_modules(args.imports)
    unknown = MODALITY_REGISTRY.check(args.modality, "--modality")
    if unknown is not None:
        raise ConfigError(unknown)
    missing_file = sibling(args.out, ".missing.txt")
    evaluation_set = None
    if args.protocol is not None:
        get_protocol(args.protocol)  # an unknown name stops here, listing the known ones
        evaluation_set = protocol_set(args.protocol, args.media_root, args.annotations)
    elif args.list is not None:
        evaluation_set = list_set(args.list, args.media_root)
    if evaluation_set is not None:
        # every listed file is looked up before the model loads: a wrong --media-root fails in a second
        refuse_incomplete(evaluation_set.missing, evaluation_set.listed, evaluation_set.what,
                          allow_missing=args.allow_missing, missing_file=missing_file)
    # lazy: run_dir imports open_clip via mmsphere.models (seconds); keeps `--help` fast
    from mmsphere.models.run_dir import load_dual_encoder

    model, identity = load_dual_encoder(args.run, args.model, args.pretrained, args.device)
    scoring = {"dsl": args.dsl, "dsl_temperature": args.dsl_temperature, "chunk_size": args.chunk_size,
               "save_sim": args.save_sim}
    common = {"modality": args.modality, "batch_size": args.batch_size, "workers": args.workers,
              "allow_missing": args.allow_missing}
    if evaluation_set is not None:
        results = evaluate_set(model, evaluation_set, frames=args.frames, missing_file=missing_file, **common,
                               **scoring)
    else:
        results = evaluate_shards(model, args.data, frames=DEFAULT_FRAMES if args.frames is None else args.frames,
                                  **common, **scoring)
    card = make_card(results, kind="retrieval", model=model_identity(identity), precision=model_precision(model),
                     versions=versions(), command=["eval-retrieval", *argv])
    print(format_results(card))
    json_path, markdown_path = write_card(args.out, card)
    print(f"\nresults card: {json_path} and {markdown_path}")
    if card["data"].get("missing", {}).get("file"):
        print(f"not evaluated: {card['data']['missing']['file']}")
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


def format_results(results: dict[str, Any]) -> str:
    """The terminal report: metrics table (DSL rows labelled), set sizes, tie rule and geometry."""
    labels = {"t2v": "t2v (text->video)", "v2t": "v2t (video->text)",
              "t2v_dsl": "t2v + DSL (post-processed)", "v2t_dsl": "v2t + DSL (post-processed)"}
    names = [name for name in ("R@1", "R@5", "R@10", "MdR", "MnR")
             if any(name in metrics for metrics in results["metrics"].values())]
    rows = []
    for direction, metrics in results["metrics"].items():
        base = direction.removesuffix("_dsl")
        rows.append([labels[direction], *(metrics.get(name, "") for name in names), results["num_queries"][base],
                     results["num_gallery"][base]])
    data = results["data"]
    protocol = results.get("protocol") or {}
    version = f" v{protocol['version']}" if protocol.get("version") else ""
    lines = [
        f"{protocol.get('name', 'retrieval')}{version}: {data['num_videos']} {data['modality']}s with "
        f"{data['num_captions']} captions, {data.get('frames')} frames"
        + (f" ({sum(data['skipped'].values())} samples skipped: {data['skipped']})" if data["skipped"] else ""),
        format_table(["direction", *names, "queries", "gallery"], rows),
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
    published = (protocol.get("published_size") or {}).get("videos")
    if published and data.get("n_listed") != published:
        lines.append(f"note: the annotation files list {data.get('n_listed')} videos; {protocol['name']} has "
                     f"{published:,} (a different or edited list? its digest is in the card)")
    subset = subset_line(results)
    if subset:
        lines.insert(0, f"WARNING ({ALLOW_FLAG}): {subset}")
        lines.append(f"WARNING: {subset}")
    return "\n".join(lines)
