"""Importing the modules that register a user's own loss terms and protocols (``loss.imports``, ``--imports``).

A module named there is looked up as ``python -m`` would: on ``sys.path`` and in the working
directory. The ``mmsphere`` console command and ``python scripts/*.py`` put the command's or the
script's folder on ``sys.path``, not the working directory, so without this a ``my_terms.py``
beside the command line (as the README shows it) would not be found. The working directory is
appended, so installed modules keep their precedence.
"""

from __future__ import annotations

import importlib
import os
import sys


def import_user_module(name: str) -> None:
    """Import module ``name`` from ``sys.path`` or the working directory; raises ``ImportError``."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    importlib.import_module(name)
