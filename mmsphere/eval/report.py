"""What every evaluation result carries: software versions, a plain-text table, an atomic JSON write."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mmsphere
from mmsphere.atomic import write_text_atomic

# distributions whose versions change the numbers an evaluation produces
VERSIONED = ("torch", "open-clip-torch", "numpy", "faiss-cpu", "decord", "av", "pillow", "scikit-learn")


def versions() -> dict[str, str]:
    """Versions of mmsphere, Python, the platform and the libraries on the scoring path."""
    found = {"mmsphere": mmsphere.__version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A left-aligned plain-text table; floats with two decimals."""
    cells = [[_cell(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def sibling(path: str | os.PathLike, suffix: str) -> Path:
    """``results.json`` + ``.scores.csv`` -> ``results.scores.csv``: outputs that travel with a result file."""
    path = Path(path)
    return path.with_name(path.stem + suffix)
