"""The ``mmsphere`` command dispatches to every tool and rejects unknown commands."""

from __future__ import annotations

import importlib
import json

import pytest

from mmsphere import cli_errors
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


# --------------------------------------------------------------------------------------------
# bad input: every command fails with one line naming the key, file or value, never a traceback
# (ARCHITECTURE.md, Bad input). Each case fails before any model is built or any data is read, so all run in-process.


def _files(tmp_path):
    (tmp_path / "typo.yaml").write_text("train: {max_step: 3}\n")
    (tmp_path / "ok.yaml").write_text("output_dir: run\ndata: {train: [{urls: shard.tar, modality: image}]}\n")
    (tmp_path / "gone.yaml").write_text("output_dir: run\n"
                                        "data: {train: [{urls: 'gone-{0..3}.tar', modality: image}]}\n")
    (tmp_path / "classes.txt").write_text("red\ngreen\n")
    (tmp_path / "list.jsonl").write_text('{"path": "a.jpg", "caption": "a photo"}\n')
    (tmp_path / "images").mkdir()
    (tmp_path / "shard.tar").write_bytes(b"")


OOD = ["score-ood", "--run", "RUN", "--id", "images", "--ood", "far=images", "--classes", "classes.txt"]
EVAL = ["eval-retrieval", "--run", "RUN", "--data", "shard.tar"]

BAD_INPUT = {
    # command: [(kind, argv, what the message must name)]
    "train": [
        ("path", ["train", "--config", "absent.yaml"], "config file 'absent.yaml' does not exist"),
        ("path", ["train", "--config", "gone.yaml"],
         "data.train[0].urls='gone-{0..3}.tar': 4 of 4 shards do not exist"),
        ("key", ["train", "--config", "typo.yaml"], "unknown config key train.max_step; did you mean train.max_steps"),
        ("key", ["train", "--config", "ok.yaml", "trian.lr=0.1"], "trian"),
        ("value", ["train", "--config", "ok.yaml", "train.lr=fast"], "train.lr='fast' must be a number"),
        ("value", ["train", "--config", "ok.yaml", "loss.terms.angular_margin.margin=-0.1"],
         "loss.terms.angular_margin.margin=-0.1"),
    ],
    "eval-retrieval": [
        ("path", ["eval-retrieval", "--run", "absent", "--data", "shard.tar"], "run directory 'absent' does not exist"),
        ("path", ["eval-retrieval", "--run", "RUN", "--list", "absent.csv"], "--list 'absent.csv' does not exist"),
        ("key", [*EVAL, "--frame", "4x"], "--frame"),
        ("key", [*EVAL, "--modality", "audio"], "--modality='audio' must be one of video, image"),
        ("value", [*EVAL, "--batch-size", "0"], "argument --batch-size: '0' is not an integer >= 1"),
        ("value", [*EVAL, "--save-sim", "sim.txt"], "--save-sim 'sim.txt' must end in .npy"),
    ],
    "score-ood": [
        ("path", [*OOD[:-1], "absent.txt"], "classes file 'absent.txt' does not exist"),
        ("key", [*OOD, "--score", "mahalanobis"], "argument --score: invalid choice: 'mahalanobis'"),
        ("key", [*OOD, "--negative-labels", "n.txt"], "unrecognized arguments: --negative-labels n.txt"),
        ("key", [*OOD, "--temp", "1"], "ambiguous option: --temp could match --templates, --temperature"),
        ("value", [*OOD, "--temperature", "-1"], "--temperature=-1.0 must be > 0"),
        ("value", [*OOD, "--ood", "nameless"], "--ood expects NAME=DIR_OR_SHARDS, got 'nameless'"),
    ],
    "make-shards": [
        ("path", ["make-shards", "--input", "absent.jsonl", "--out", "out"], "--input 'absent.jsonl' does not exist"),
        ("path", ["make-shards", "--input", "list.jsonl", "--out", "out", "--media-root", "nowhere"],
         "--media-root 'nowhere' is not a directory"),
        ("key", ["make-shards", "--input", "list.jsonl", "--out", "out", "--max-count", "3"], "--max-count"),
        ("value", ["make-shards", "--input", "list.jsonl", "--out", "out", "--maxcount", "0"],
         "argument --maxcount: '0' is not an integer >= 1"),
        ("value", ["make-shards", "--input", "list.jsonl", "--out", "out", "--max-side", "1"], "--max-side=1"),
    ],
    "inspect-shards": [
        ("path", ["inspect-shards", "absent-{0..1}.tar"], "shard 'absent-0.tar' does not exist"),
        ("path", ["inspect-shards", "absent-*.tar"], "shard pattern 'absent-*.tar' names no shard"),
        ("key", ["inspect-shards", "shard.tar", "--modality", "audio"], "argument --modality: invalid choice: 'audio'"),
        ("value", ["inspect-shards", "shard.tar", "--frames", "zero"], "argument --frames: 'zero' is not an integer"),
    ],
    "export": [
        ("path", ["export", "absent", "--out", "out"], "run directory 'absent' does not exist"),
        ("key", ["export", "RUN", "--out", "out", "--fromat", "hf"], "--fromat"),
        ("value", ["export", "RUN", "--out", "out", "--format", "hf"], "argument --format: invalid choice: 'hf'"),
        ("value", ["export", "RUN"], "the following arguments are required: --out"),
    ],
}


def test_every_bad_input_case_covers_path_key_and_value():
    assert {"train", "eval-retrieval", "score-ood", "make-shards", "inspect-shards", "export"} <= set(BAD_INPUT)
    for command, cases in BAD_INPUT.items():
        assert {kind for kind, _, _ in cases} == {"path", "key", "value"}, command


@pytest.mark.parametrize("command, kind, argv, message", [
    pytest.param(command, kind, argv, message, id=f"{command}-{kind}-{index}")
    for command, cases in BAD_INPUT.items() for index, (kind, argv, message) in enumerate(cases)
])
def test_bad_input_is_one_line_naming_it_and_exit_code_2(command, kind, argv, message, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.chdir(tmp_path)
    _files(tmp_path)
    # a run directory that is never reached: each case fails on its arguments first
    argv = [str(tmp_path / "absent-run") if part == "RUN" else part for part in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"mmsphere {command}: error: "), captured.err
    assert message in captured.err and "Traceback" not in captured.err


def test_a_bug_is_not_reported_as_bad_input(monkeypatch):
    """Only the MmsphereError family is bad input; any other exception keeps its traceback."""
    import mmsphere.data.inspect

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(mmsphere.data.inspect, "inspect_shards", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["inspect-shards", "shard.tar"])


def test_a_multi_line_message_is_printed_on_one_line(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("train: [1, 2\n")
    assert main(["train", "--config", str(tmp_path / "broken.yaml")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is not valid YAML" in error


def test_under_a_launcher_process_0_reports_at_once_and_the_launcher_reads_the_line(tmp_path, monkeypatch, capsys):
    """The line also goes to torch.distributed.elastic's reply file, which its report of a failed process shows."""
    slept = []
    monkeypatch.setattr(cli_errors.time, "sleep", slept.append)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setenv("RANK", "0")
    cli_errors.report_error("mmsphere train: error: loss.terms.angular_margin.margin=-1.0 must be in [0, π)")
    assert capsys.readouterr().err == "mmsphere train: error: loss.terms.angular_margin.margin=-1.0 must be in [0, π)\n" and not slept
    assert json.loads((tmp_path / "error.json").read_text())["message"] == (
        "mmsphere train: error: loss.terms.angular_margin.margin=-1.0 must be in [0, π)")


def test_another_process_reports_after_a_grace_period_marked_with_its_rank(monkeypatch, capsys):
    """Time for the launcher to stop it when process 0 fails alike; an error of its own still reaches the terminal."""
    slept = []
    monkeypatch.setattr(cli_errors.time, "sleep", slept.append)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setenv("RANK", "3")
    cli_errors.report_error("mmsphere train: error: a shard only process 3 reads")
    assert slept == [cli_errors.OTHER_PROCESS_GRACE_S]
    assert capsys.readouterr().err == "mmsphere train: error: a shard only process 3 reads (process 3)\n"
