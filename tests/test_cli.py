"""The ``mmsphere`` command dispatches to every tool and rejects unknown commands."""

from __future__ import annotations

import importlib

import pytest

from mmsphere.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_resolves_to_a_function(name):
    module_name, _, function_name = COMMANDS[name][0].partition(":")
    assert callable(getattr(importlib.import_module(module_name), function_name))


def test_help_lists_commands(capsys):
    assert main([]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in COMMANDS)


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_train_reports_config_errors(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train: {max_step: 3}\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "did you mean train.max_steps" in capsys.readouterr().err
