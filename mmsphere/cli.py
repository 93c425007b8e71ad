"""The ``mmsphere`` console command: one sub-command per tool, each a thin parser over the library."""

from __future__ import annotations

import importlib
import sys

# sub-command -> "module:function"; each function takes the remaining argv and returns an exit code
COMMANDS = {
    "train": ("mmsphere.train.cli:main", "fine-tune a dual encoder (also: accelerate launch scripts/train.py)"),
    "eval-retrieval": ("mmsphere.eval.cli:main", "text-video / text-image retrieval evaluation"),
    "score-ood": ("mmsphere.ood.cli:main", "out-of-distribution detection scoring"),
    "protocols": ("mmsphere.results.cli:protocols_main", "list the benchmark protocols and the files each expects"),
    "results": ("mmsphere.results.cli:results_main", "compare results cards side by side (results compare A B)"),
    "cache": ("mmsphere.cache.cli:main", "encode a config's shards once through frozen trunks (model.trainable=heads)"),
    "make-shards": ("mmsphere.data.cli:make_shards_main", "build webdataset shards from a CSV/JSONL list"),
    "inspect-shards": ("mmsphere.data.cli:inspect_shards_main", "decode every sample of shards and report"),
    "demo": ("mmsphere.demo:main", "build the demo data, fine-tune, evaluate and write a report"),
    "sface-ab": ("mmsphere.train.sface_ab:main", "SFace's a, b measured on a config's first training batches"),
    "ablate": ("mmsphere.ablation.cli:main", "train and evaluate objective variants over several seeds"),
    "export": ("mmsphere.models.export:main",
               "write a run's towers in open_clip's local-dir layout (open_clip, CLIP_benchmark)"),
    "export-offline-towers": ("mmsphere.models.offline_towers:main",
                              "write MiniLM + EfficientNet-Lite0 (from their PyPI packages) as a pretrained dir"),
}


def run_command(name: str, argv: list[str]) -> int:
    """Run sub-command ``name`` with ``argv``; returns its exit code."""
    module_name, _, function_name = COMMANDS[name][0].partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mmsphere`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(len(name) for name in COMMANDS)
        print("usage: mmsphere COMMAND [ARGS...]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<{width}}  {help_text}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"mmsphere: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
