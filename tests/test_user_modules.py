"""A user's own module (``loss.imports: [my_terms]``, ``--imports my_protocols``) is found in the working directory.

The ``mmsphere`` console command and ``python scripts/train.py`` run with the command's or the script's
folder first on ``sys.path``, not the working directory (``python -m`` and ``python -c`` add it), so each
check runs in a subprocess that removes ``sys.path[0]``, as a console script has it, from a working
directory holding the module (the README's examples: ``my_terms.py``, ``my_protocols.py``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# sys.path as the `mmsphere` console script has it: its own folder first, not the working directory
AS_CONSOLE_SCRIPT = "import sys; del sys.path[0]; "

MY_TERMS = '''
from dataclasses import dataclass

from mmsphere.losses import Term, TermOptions, register_term


@dataclass(frozen=True)
class GapOptions(TermOptions):
    power: float = 2.0


@register_term
class PositiveGap(Term):
    name = "positive_gap"
    description = "alignment of the positive pairs"
    Options = GapOptions

    def forward(self, context):
        distance = (2 - 2 * context.positive_cosine).clamp(min=0).sqrt()
        return context.scaled_sum(distance ** self.options.power)
'''

MY_PROTOCOLS = '''
from mmsphere.eval.annotations import DelimitedColumns, FileRole
from mmsphere.eval.protocols import RetrievalProtocol, register_protocol

register_protocol(RetrievalProtocol(
    name="my-bench", version="1", description="my test split", source="my paper",
    files=(FileRole("captions", ("test.tsv",)),),
    reader=DelimitedColumns(video="clip", caption="text", delimiter="\\t"),
    grouping="all", media_names=("{id}.*",), frames=12))
'''


def run(code: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", AS_CONSOLE_SCRIPT + code, *arguments], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_loss_imports_find_a_module_in_the_working_directory(tmp_path):
    (tmp_path / "my_terms.py").write_text(MY_TERMS)
    code = ("from mmsphere.train.config import load_config; "
            f"config = load_config({str(REPO / 'configs' / 'demo.yaml')!r}, sys.argv[1:]); "
            "print(sorted(config.loss.terms))")
    done = run(code, "loss.imports=[my_terms]", "loss.terms={angular_margin: 1.0, positive_gap: {weight: 0.1}}",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "'positive_gap'" in done.stdout


def test_protocol_imports_find_a_module_in_the_working_directory(tmp_path):
    (tmp_path / "my_protocols.py").write_text(MY_PROTOCOLS)
    done = run("from mmsphere.cli import main; sys.exit(main())", "protocols", "--imports", "my_protocols",
               "my-bench", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("my-bench (version 1): my test split")


def test_a_module_found_nowhere_is_still_one_line(tmp_path):
    done = run("from mmsphere.cli import main; sys.exit(main())", "protocols", "--imports", "not_a_module_anywhere",
               cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "mmsphere protocols: error: --imports: cannot import 'not_a_module_anywhere' "
        "(No module named 'not_a_module_anywhere')")
