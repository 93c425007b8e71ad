"""``mmsphere ablate`` / ``python scripts/ablate.py``: train and evaluate objective variants over several seeds."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mmsphere.ablation.evaluation import OodSets, read_mismatched_keys
from mmsphere.ablation.runs import run_ablation
from mmsphere.ablation.summary import RETRIEVAL_COLUMNS, markdown_table
from mmsphere.ablation.variants import known_variants, split_variants
from mmsphere.errors import ConfigError, MmsphereError
from mmsphere.train.config import load_config
from mmsphere.ood.inputs import parse_ood_sets, read_names, read_templates
from mmsphere.ood.scores import OOD_SCORES, scores_needing


def main(argv: list[str] | None = None) -> int:
    """``python scripts/ablate.py --config BASE.yaml --variants ... --seeds N --out DIR [overrides...]``."""
    parser = argparse.ArgumentParser(prog="python scripts/ablate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="base training config (YAML)")
    parser.add_argument("--variants",
                        help="comma-separated variants: every registered term (a contrastive one alone, any other "
                             "on the angular-margin baseline), meta, all; margin and calunif are short for "
                             "angular_margin and calibrated_uniformity; a non-contrastive term also as NAME@WEIGHT, "
                             "e.g. cma@0.1; a term's fields as NAME:FIELD=VALUE, e.g. siglip:margin=0.1 "
                             f"(default: every variant of the term registry: {','.join(known_variants())})")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant: base seed, +1, ... (default 3)")
    parser.add_argument("--out", required=True, help="output folder: OUT/VARIANT/seed_S runs, ablation.json/.md/.png")
    parser.add_argument("--zero-shot", action="store_true", help="add a row for the untrained model of each seed")
    parser.add_argument("--ood-id", metavar="DIR_OR_SHARDS", help="in-distribution images for OoD evaluation")
    parser.add_argument("--ood", action="append", default=[], metavar="NAME=DIR_OR_SHARDS", help="an OoD set (repeat)")
    parser.add_argument("--classes", metavar="FILE", help="ID class names, one per line")
    parser.add_argument("--templates", metavar="FILE", help="prompt templates with {} (default 'a photo of a {}.')")
    parser.add_argument("--ood-scores", default="mcm,energy", help=f"comma-separated, of {', '.join(OOD_SCORES)}")
    parser.add_argument("--neg-labels", metavar="FILE",
                        help=f"negative labels for --ood-scores {scores_needing('negative_features')}, one per line")
    parser.add_argument("--ood-positive", choices=("id", "ood"), default="id", help="FPR@95 convention (default id)")
    parser.add_argument("--mismatched-keys", metavar="FILE",
                        help="keys of mismatched pairs (demo meta.json, JSON list or lines): AUROC of learned weights")
    parser.add_argument("--eval-batch-size", type=int, help="evaluation batch size (default train.batch_size)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the base config")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = ",".join(known_variants())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # one line per run (which variant and seed, and where) from the study's loggers
    logging.getLogger("mmsphere.ablation").setLevel(logging.INFO)

    try:
        if args.seeds < 1:
            raise ConfigError(f"--seeds={args.seeds} must be >= 1")
        base = load_config(args.config, args.overrides)
        results = run_ablation(
            base, split_variants(args.variants), [base.seed + index for index in range(args.seeds)], args.out,
            zero_shot=args.zero_shot, ood=_ood_sets(args), eval_batch_size=args.eval_batch_size,
            mismatched_keys=read_mismatched_keys(args.mismatched_keys) if args.mismatched_keys else None,
            description={"command": ["scripts/ablate.py", *argv],
                         "config": str(args.config), "overrides": args.overrides},
        )
    except (MmsphereError, ValueError, FileNotFoundError) as error:
        print(f"ablate: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(markdown_table(list(results["variants"]), results["aggregate"], RETRIEVAL_COLUMNS)))
    print(f"\nresults: {Path(args.out) / 'ablation.md'}, {Path(args.out) / 'ablation.json'}")
    return 0


def _ood_sets(args: argparse.Namespace) -> OodSets | None:
    given = {"--ood-id": args.ood_id, "--ood": args.ood or None, "--classes": args.classes}
    if all(value is None for value in given.values()):
        if args.templates:
            raise MmsphereError("--templates goes with OoD evaluation (--ood-id, --ood and --classes)")
        return None
    missing = [flag for flag, value in given.items() if value is None and flag != "--ood"]
    if missing:
        raise MmsphereError(f"OoD evaluation (or ID accuracy alone, without --ood) needs --ood-id and --classes; "
                            f"missing {', '.join(missing)}")
    return OodSets(id_images=args.ood_id, ood_images=parse_ood_sets(args.ood) if args.ood else {},
                   classes=read_names(args.classes, "classes"), templates=read_templates(args.templates),
                   scores=tuple(args.ood_scores.split(",")), positive=args.ood_positive,
                   negative_labels=read_names(args.neg_labels, "negative labels") if args.neg_labels else None)


if __name__ == "__main__":
    sys.exit(main())
