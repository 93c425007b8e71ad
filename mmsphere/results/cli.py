"""``mmsphere results compare A.json B.json ...`` and ``mmsphere protocols [NAME]``.

``results compare`` prints results cards side by side and warns when what defines the benchmark
differs (protocol, list, media fingerprint, frames; for OoD the sets, score and convention);
``--strict`` then exits with 1. ``protocols`` lists the retrieval protocols and OoD suites with the
files each expects.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmsphere.cli_errors import ArgumentParser, run_cli
from mmsphere.errors import ConfigError
from mmsphere.eval.protocols import PROTOCOLS, import_modules
from mmsphere.eval.report import format_table
from mmsphere.ood.protocols import OOD_PROTOCOLS
from mmsphere.results.card import load_card
from mmsphere.results.compare import compare_cards

DIFFERENT = 1  # exit code of `results compare --strict` when the cards are not comparable


def results_main(argv: list[str]) -> int:
    """``mmsphere results compare CARD CARD ...``."""
    parser = ArgumentParser(prog="mmsphere results", description="read and compare results cards")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    compare = commands.add_parser("compare", help="print cards side by side, warn where they are not comparable")
    compare.add_argument("cards", nargs="+", metavar="CARD.json", help="results cards written by an evaluation")
    compare.add_argument("--strict", action="store_true",
                         help=f"exit with {DIFFERENT} when protocols, data or frame settings differ")
    return run_cli(parser, argv, run_compare)


def run_compare(args: argparse.Namespace) -> int:
    """Load the cards, print the side-by-side table and the warnings."""
    if len(args.cards) < 2:
        raise ConfigError(f"results compare needs at least two cards, got {len(args.cards)}")
    names = [Path(path).name for path in args.cards]
    # a card is labelled by its file name, or by its path where two share a name
    labels = [name if names.count(name) == 1 else path for name, path in zip(names, args.cards)]
    if len(set(labels)) < len(labels):
        twice = sorted({label for label in labels if labels.count(label) > 1})
        raise ConfigError(f"a card is given twice: {', '.join(twice)}")
    cards = {label: load_card(path) for label, path in zip(labels, args.cards)}
    comparison = compare_cards(cards)
    print(format_table(comparison.header, comparison.rows))
    for warning in comparison.warnings:
        print(f"WARNING: {warning}")
    if not comparison.warnings:
        print("comparable: same protocol, data and frame settings")
    return DIFFERENT if comparison.warnings and args.strict else 0


def protocols_main(argv: list[str]) -> int:
    """``mmsphere protocols [NAME]``: the registered benchmark protocols and the files each expects."""
    parser = ArgumentParser(prog="mmsphere protocols",
                            description="list the retrieval protocols and OoD suites, with the files each expects")
    parser.add_argument("name", nargs="?", help="show one protocol in full")
    parser.add_argument("--imports", action="append", default=[], metavar="MODULE",
                        help="a module that registers your own protocols")
    return run_cli(parser, argv, run_protocols)


def run_protocols(args: argparse.Namespace) -> int:
    """Print the table of protocols, or one protocol's definition."""
    import_modules(args.imports)
    if args.name is not None:
        print(describe_protocol(args.name))
        return 0
    rows = [[name, protocol.version, protocol.grouping, protocol.frames, protocol.describe_files(),
             protocol.description] for name, protocol in sorted(PROTOCOLS.items())]
    print("retrieval (mmsphere eval-retrieval --protocol NAME --media-root VIDEOS [--annotations DIR]):")
    print(format_table(["protocol", "version", "captions", "frames", "expects", "what"], rows))
    rows = [[name, protocol.version, protocol.id_set.name,
             ", ".join(f"{spec.name} ({spec.role})" for spec in protocol.ood_sets),
             "shipped" if protocol.classes is not None else "--classes"]
            for name, protocol in sorted(OOD_PROTOCOLS.items())]
    print("\nOoD (mmsphere score-ood --protocol NAME --data-root DIR):")
    print(format_table(["protocol", "version", "ID", "OoD sets", "classes"], rows))
    print("\nmmsphere protocols NAME shows one in full (files, columns, media names, source).")
    return 0


def describe_protocol(name: str) -> str:
    """One protocol's definition in words, retrieval or OoD: files and format, sets, media names, frames, source."""
    for registry in (PROTOCOLS, OOD_PROTOCOLS):
        if name in registry:
            return registry[name].describe()
    raise ConfigError(f"unknown protocol {name!r}; known: {', '.join(sorted([*PROTOCOLS, *OOD_PROTOCOLS]))}")
