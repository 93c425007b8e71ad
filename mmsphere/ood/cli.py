"""``mmsphere score-ood`` / ``python scripts/score_ood.py``: zero-shot OoD detection scoring.

Prints FPR@95, AUROC, AUPR-In and AUPR-Out per OoD set, their mean (and the mean of the near and of
the far sets of a protocol), with the convention; writes the results card (``--out`` JSON and the
markdown beside it), a per-sample scores CSV, a ROC-curve PNG and a score-histogram PNG.
``--protocol NAME --data-root DIR`` runs a named suite; a set that loses images stops the run
unless ``--allow-missing``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from mmsphere.cli_errors import ArgumentParser, non_negative_int, positive_int, run_cli
from mmsphere.config import ConfigError
from mmsphere.eval.cli import add_model_arguments
from mmsphere.eval.completeness import ALLOW_FLAG, MissingItem, refuse_incomplete
from mmsphere.eval.protocols import import_modules
from mmsphere.eval.report import format_table, sibling, versions
from mmsphere.ood.evaluate import OodEvaluation, evaluate_ood, read_prompts
from mmsphere.ood.inputs import ImageFiles, image_files, is_folder, is_list_file, parse_ood_sets
from mmsphere.ood.protocols import get_ood_protocol, resolve_suite
from mmsphere.ood.report import ood_results, write_ood_report
from mmsphere.ood.scores import OOD_SCORES, scores_needing
from mmsphere.results.card import make_card, model_identity, model_precision, subset_line, write_card

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    """Score an ID image set against OoD sets (given, or a protocol's) with a zero-shot classifier over the classes."""
    parser = ArgumentParser(prog="mmsphere score-ood", description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--protocol", metavar="NAME",
                        help="a named suite (mmsphere protocols lists them): cifar10, cifar100, imagenet1k-mos")
    parser.add_argument("--data-root", metavar="DIR", help="with --protocol: the folder holding the suite's sets")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=PATH",
                        help="with --protocol: where one set lies, a folder or .txt list (repeat for several)")
    parser.add_argument("--id", metavar="DIR_OR_SHARDS", help="in-distribution images (without --protocol)")
    parser.add_argument("--ood", action="append", metavar="NAME=DIR_OR_SHARDS",
                        help="an OoD set (repeat the option for several; without --protocol)")
    parser.add_argument("--classes", metavar="FILE",
                        help="ID class names, one per line (a protocol's own by default)")
    parser.add_argument("--templates", metavar="FILE", help="prompt templates with {} (default: 'a photo of a {}.')")
    # checked after --imports, which may register a score of its own
    parser.add_argument("--score", default="mcm", help=f"one of {', '.join(OOD_SCORES)} (default %(default)s)")
    parser.add_argument("--neg-labels", metavar="FILE",
                        help=f"negative labels for --score {scores_needing('negative_features')}, one per line")
    own = ", ".join(f"{score.temperature:g} for {name}" for name, score in OOD_SCORES.items()
                    if score.temperature is not None)
    parser.add_argument("--temperature", type=float,
                        help=f"logits = cosine / T (default: {own}, 1/logit_scale otherwise)")
    parser.add_argument("--positive", choices=("id", "ood"), default="id",
                        help="FPR@95 convention: id (MCM/CMA, default) or ood (OpenOOD v1.5)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score what is found when images or whole sets are missing or do not decode; every "
                             "output then says it is a subset and the names go to <out>.missing.txt")
    parser.add_argument("--imports", action="append", default=[], metavar="MODULE",
                        help="a module that registers your own OoD protocols or scores (repeat for several)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--workers", type=non_negative_int, default=0)
    parser.add_argument("--out", default="ood/results.json",
                        help="results card JSON; the markdown, CSV and PNGs go beside it (default %(default)s)")
    return run_cli(parser, argv, lambda args: run_scoring(args, argv))


def run_scoring(args: argparse.Namespace, argv: list[str]) -> int:
    """Score, print the table and write the card, the per-sample CSV and the plots."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results, evaluation, model = score_ood(args)

    outputs = write_ood_report(args.out, evaluation)
    results["outputs"] = {name: str(path) for name, path in outputs.items()}
    card = make_card(results, kind="ood", model=model_identity(results["model"]), precision=model_precision(model),
                     versions=versions(), command=["score-ood", *argv])
    print(format_results(card))
    json_path, markdown_path = write_card(args.out, card)
    print(f"\nresults card: {json_path} and {markdown_path}")
    for path in outputs.values():
        print(f"         {path}")
    return 0


def score_ood(args: argparse.Namespace) -> tuple[dict[str, Any], OodEvaluation, Any]:
    """The arguments and image sets checked, the model loaded and :func:`evaluate_ood` run; the results dict."""
    import_modules(args.imports)
    if args.score not in OOD_SCORES:  # argparse's own words; checked here as --imports may register a score
        raise ConfigError(f"argument --score: invalid choice: {args.score!r} (choose from {', '.join(OOD_SCORES)})")
    if Path(args.out).suffix == ".md":
        raise ConfigError(f"--out {args.out!r} is the card's JSON; its markdown goes beside it as .md")
    protocol = None
    sets_missing: dict[str, list[str]] = {}
    if args.protocol is not None:
        if args.id is not None or args.ood:
            raise ConfigError("--protocol names its own sets; give --id/--ood without --protocol, or --set NAME=PATH")
        if args.data_root is None:
            raise ConfigError(f"--protocol {args.protocol} needs --data-root DIR, the folder holding its sets")
        protocol = get_ood_protocol(args.protocol)
        suite = resolve_suite(protocol, args.data_root, _overrides(args.set))
        sets_missing = suite.not_found
        if sets_missing and not args.allow_missing:
            raise _missing_sets(protocol.name, args.data_root, sets_missing, len(protocol.sets()))
        locations = dict(suite.locations)
        id_spec = locations.pop(protocol.id_set.name)
        ood_sets, roles, list_root = locations, suite.roles, args.data_root
        if args.classes is None and protocol.classes is None:
            raise ConfigError(f"protocol {protocol.name} needs --classes FILE ({protocol.notes})")
        class_names: Any = args.classes if args.classes is not None else list(protocol.classes)
        templates: Any = args.templates if args.templates is not None else list(protocol.templates)
    else:
        if args.id is None or not args.ood or args.classes is None:
            raise ConfigError("give --protocol NAME --data-root DIR, or --id, --ood NAME=PATH and --classes FILE")
        if args.data_root is not None or args.set:
            raise ConfigError("--data-root and --set go with --protocol")
        id_spec, ood_sets, roles, list_root = args.id, parse_ood_sets(args.ood), None, None
        class_names, templates = args.classes, args.templates
    # inputs are read and checked before the model loads, so a typo or a missing file fails in a second
    needs_negatives = "negative_features" in OOD_SCORES.lookup(args.score).needs
    if needs_negatives and args.neg_labels is None:
        raise ConfigError(f"--score {args.score} needs --neg-labels FILE (negative labels, one per line)")
    if not needs_negatives and args.neg_labels is not None:
        raise ConfigError(f"--neg-labels is only used by --score {scores_needing('negative_features')}, "
                          f"not by --score {args.score}")
    prompts = read_prompts(class_names, templates, args.neg_labels, args.score)
    if args.temperature is not None and not args.temperature > 0:
        raise ConfigError(f"--temperature={args.temperature} must be > 0")
    missing_file = sibling(args.out, ".missing.txt")
    sources = {name: _files(spec, list_root) for name, spec in [("id", id_spec), *ood_sets.items()]}
    found = [item for name, source in sources.items() if isinstance(source, ImageFiles)
             for item in (MissingItem(f"{name}: {entry.name}", entry.reason, entry.detail) for entry in source.missing)]
    refuse_incomplete(found, sum(source.listed for source in sources.values() if isinstance(source, ImageFiles)),
                      "images of the ID and OoD sets", allow_missing=args.allow_missing, missing_file=missing_file)

    # lazy: run_dir imports open_clip via mmsphere.models (seconds); keeps `--help` fast
    from mmsphere.models.run_dir import load_dual_encoder

    model, model_identity_found = load_dual_encoder(args.run, args.model, args.pretrained, args.device)
    id_source = sources.pop("id")
    evaluation = evaluate_ood(model, id_source, sources, prompts.classes, prompts.templates, score=args.score,
                              temperature=args.temperature, positive=args.positive,
                              negative_labels=prompts.negative_labels, batch_size=args.batch_size,
                              workers=args.workers, allow_missing=args.allow_missing, missing_file=missing_file,
                              roles=roles)
    results = ood_results(evaluation, model_identity_found, protocol, id_spec, ood_sets, sets_missing=sets_missing,
                          classes_file=args.classes, negative_labels_file=args.neg_labels)
    return results, evaluation, model


def _overrides(specs: list[str]) -> dict[str, str]:
    overrides = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator or not name.strip() or not path.strip():
            raise ConfigError(f"--set expects NAME=PATH, got {spec!r}")
        overrides[name.strip()] = path.strip()
    return overrides


def _files(spec: str, list_root: str | None) -> str | ImageFiles:
    """A folder or list becomes its files, found before the model loads; shard URLs stay as they are."""
    if is_folder(spec) or is_list_file(spec):
        return image_files(spec, list_root if is_list_file(spec) else None)
    return spec


def _missing_sets(protocol: str, root: str, missing: dict[str, list[str]], total: int) -> Exception:
    from mmsphere.eval.completeness import IncompleteDataError

    looked = "; ".join(f"{name} (looked at {', '.join(paths)})" for name, paths in missing.items())
    return IncompleteDataError(
        f"{len(missing)} of {total} sets of protocol {protocol} are not under {root!r}, stopped before loading the "
        f"model: {looked}; point at them with --set NAME=PATH, or pass {ALLOW_FLAG} to score the others (every "
        "output then says so)")


def format_results(results: dict[str, Any]) -> str:
    """The terminal report: per-set, per-role and overall mean metrics (percent) with the convention."""
    keys = ("FPR95", "AUROC", "AUPR_IN", "AUPR_OUT")
    rows = []
    for name, metrics in results["metrics"].items():
        if name != "mean":
            values = results["ood"][name]
            rows.append([name, values.get("role", "ood"), *(100.0 * metrics[key] for key in keys),
                         values["num_samples"]])
    for role, metrics in (results.get("group_means") or {}).items():
        rows.append([f"mean {role}", role, *(100.0 * metrics[key] for key in keys), ""])
    rows.append(["mean", "all", *(100.0 * results["metrics"]["mean"][key] for key in keys), ""])
    identity = results["id"]
    accuracy = f", zero-shot accuracy {100 * identity['accuracy']:.2f}%" if identity["accuracy"] is not None else ""
    skipped = {name: counts for name, counts in [("id", identity["skipped"])] +
               [(name, values["skipped"]) for name, values in results["ood"].items()] if counts}
    protocol = results.get("protocol") or {}
    lines = [
        f"OoD detection ({protocol.get('name', 'custom')}): score {results['score']} (T={results['temperature']:.4g}), "
        f"ID {identity['spec']} ({identity['num_samples']} images{accuracy}), {len(results['classes']['names'])} classes",
        format_table(["OoD set", "role", "FPR@95 %", "AUROC %", "AUPR-In %", "AUPR-Out %", "images"], rows),
        f"convention: {results['convention']}",
    ]
    if skipped:
        lines.append(f"skipped samples: {skipped}")
    subset = subset_line(results)
    if subset:
        lines.insert(0, f"WARNING ({ALLOW_FLAG}): {subset}")
        lines.append(f"WARNING: {subset}")
    return "\n".join(lines)
