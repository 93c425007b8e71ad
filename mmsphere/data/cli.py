"""``mmsphere make-shards`` and ``mmsphere inspect-shards``: thin parsers over the data library."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mmsphere.cli_errors import ArgumentParser, positive_float, positive_int, run_cli
from mmsphere.config import ConfigError, DataError
from mmsphere.data.modalities import modality_names
from mmsphere.data.sample_list import MEDIA_COLUMNS
from mmsphere.data.shards import DEFAULT_MAXCOUNT, DEFAULT_MAXSIZE, INPUT_SKIP_REASONS, ShardSummary, make_shards
from mmsphere.data.stats import SKIP_REASONS


LIST_COLUMNS_HELP = f"""\
the list: a CSV/TSV with a header row (separated by , ; or tab) or a JSONL file (one object a line),
with these columns (fields); a line needs a media path and a non-empty caption:
  {MEDIA_COLUMNS[0]:<9} the media file; also named {', '.join(MEDIA_COLUMNS[1:])}. A relative path starts
            from --media-root, else from the list's own folder
  caption   one caption (text)
  captions  several captions: a list of strings (in a CSV cell, JSON: ["one", "two"])
  key       optional: the sample's key (default: the media file's name without its extension)
  split     optional: write the line into OUT/<split>/ (train, val, ...)
  group     optional: lines sharing a group are positives of each other under loss.positives: group
An MSR-VTT 1k-A CSV (columns video_id, sentence) reads MEDIA_ROOT/<video_id>.mp4; --media-root is
required for it."""


def make_shards_main(argv: list[str]) -> int:
    """Build webdataset shards from a CSV/JSONL list of media files and captions."""
    parser = ArgumentParser(
        prog="mmsphere make-shards",
        description="Write OUT/shard-%06d.tar and OUT/sizes.json from a CSV or JSONL list (media path +\n"
        "caption/captions, optional key/split/group) or an MSR-VTT 1k-A CSV (with --media-root).",
        epilog=LIST_COLUMNS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="the sample list (.csv, .tsv or .jsonl)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--maxcount", type=positive_int, default=DEFAULT_MAXCOUNT,
                        help="samples per shard at most")
    parser.add_argument("--maxsize", type=positive_int, default=DEFAULT_MAXSIZE,
                        help="bytes per shard at most")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in the output folder")
    parser.add_argument("--media-root", default=None, help="folder that relative media paths start from")
    parser.add_argument("--max-side", type=positive_int, default=None,
                        help="re-encode videos whose longer side exceeds this")
    parser.add_argument("--max-fps", type=positive_float, default=None,
                        help="re-encode videos faster than this frame rate")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return run_cli(parser, argv, run_make_shards)


def run_make_shards(args: argparse.Namespace) -> int:
    """Check the paths, write the shards and print what was written and skipped."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not Path(args.input).is_file():
        raise DataError(f"--input {args.input!r} does not exist")
    if args.media_root is not None and not Path(args.media_root).is_dir():
        raise DataError(f"--media-root {args.media_root!r} is not a directory")
    if args.max_side is not None and args.max_side < 2:
        raise ConfigError(f"--max-side={args.max_side} must be >= 2")
    summary = make_shards(
        args.input,
        args.out,
        media_root=args.media_root,
        maxcount=args.maxcount,
        maxsize=args.maxsize,
        overwrite=args.overwrite,
        max_side=args.max_side,
        max_fps=args.max_fps,
        progress=not args.quiet,
    )
    written = sum(summary.samples.values())
    for split, paths in summary.shards.items():
        if paths:
            print(f"{split or 'all'}: {summary.samples[split]} samples in {len(paths)} shard(s): "
                  f"{summary.url_pattern(split)}")
        else:
            print(f"{split or 'all'}: 0 samples, nothing written")
    by_reason = summary.skipped_by_reason()
    if by_reason:
        print(f"skipped {len(summary.skipped)} input(s):")
        for reason, count in sorted(by_reason.items()):
            first = next(item for item in summary.skipped if item.reason == reason)
            example = f"{first.where} {first.detail}".strip()
            print(f"  {reason:<22} {count:>6}  ({INPUT_SKIP_REASONS[reason]}; first: {example})")
    else:
        print("skipped 0 inputs")
    if written == 0:
        raise DataError(_nothing_written(summary, args))
    return 0


def _nothing_written(summary: ShardSummary, args: argparse.Namespace) -> str:
    """Why no sample was written, and what to do where the cause is plain (every media file missing)."""
    missing = [item.detail for item in summary.skipped if item.reason == "missing"]
    if not missing or any(item.reason == "unreadable" for item in summary.skipped):
        return "no sample was written; see the skipped inputs above"
    examples = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    if args.media_root is None:
        where = (f"relative paths start from the list's folder {str(Path(args.input).parent)!r}; pass --media-root "
                 "DIR, the folder they start from")
    else:
        where = f"relative paths start from --media-root {args.media_root!r}; check that it is the right folder"
    return (f"no media file was found: the list's {len(missing)} media path(s) name no existing file ({examples}); "
            f"{where}. Nothing was written")


def inspect_shards_main(argv: list[str]) -> int:
    """Decode every sample of some shards through the training decode path and report."""
    parser = ArgumentParser(
        prog="mmsphere inspect-shards",
        description="Decode every sample exactly as training does; report decoded samples by modality, "
        "skipped samples by reason and frame-count statistics.",
    )
    parser.add_argument("urls", nargs="+",
                        help="shard URLs or patterns (brace patterns, local globs, '::'-joined, pipe:)")
    parser.add_argument("--frames", type=positive_int, default=8, help="frames per clip, T (default 8)")
    parser.add_argument("--size", type=positive_int, default=224, help="image size after resize and crop (default 224)")
    parser.add_argument("--modality", choices=modality_names(), default=None, help="expect only this modality")
    parser.add_argument("--fast", action="store_true", help="use the fast keyframe decoding of training")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return run_cli(parser, argv, run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    """Decode every sample and print the report (or one JSON object)."""
    # lazy: inspect imports open_clip (seconds), which `--help` and make-shards do not need
    from mmsphere.data.inspect import inspect_shards

    level = logging.ERROR if args.json else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    report = inspect_shards(
        args.urls, frames=args.frames, image_size=args.size, modality=args.modality, fast=args.fast,
        progress=not args.json,
    )
    summary = report.to_dict()
    if args.json:
        print(json.dumps(summary))
    else:
        _print_report(summary)
    return 0 if report.decoded else 1


def _print_report(summary: dict) -> None:
    print(f"shards: {summary['shards']}")
    modalities = ", ".join(f"{name} {count}" for name, count in summary["decoded_by_modality"].items())
    print(f"decoded: {summary['decoded']} ({modalities or 'nothing'})")
    backends = ", ".join(f"{name} {count}" for name, count in summary["decoded_by_backend"].items())
    if backends:
        print(f"decoders: {backends}")
    print(f"skipped: {summary['skipped']}")
    for reason, count in summary["skipped_by_reason"].items():
        print(f"  {reason:<20} {count:>6}  {SKIP_REASONS[reason]}")
    frames = summary["video_frames"]
    if frames["clips"]:
        print(
            f"video frames per clip: min {frames['min']}, median {frames['median']:.0f}, mean {frames['mean']:.1f}, "
            f"max {frames['max']}; {frames['shorter_than_requested']} clip(s) shorter than "
            f"T={summary['frames_requested']} (kept, masked)"
        )
