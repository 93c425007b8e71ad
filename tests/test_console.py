"""The terminal gets what a user acts on; a run's log file gets everything."""

from __future__ import annotations

import logging

from mmsphere.console import ON_CONSOLE, ConsoleHandler, console_logging, run_log_file

log = logging.getLogger("mmsphere.test_console")  # its records reach the root logger's handlers, as the library's do


def test_the_terminal_shows_warnings_and_marked_information_only(capsys):
    with console_logging():
        log.info("open_clip chatter")
        log.info("saved checkpoint runs/x/checkpoints/step_00000010", extra=ON_CONSOLE)
        log.warning("skipped (empty_media) key=a")
        log.debug("never")
    assert capsys.readouterr().err.splitlines() == [
        "saved checkpoint runs/x/checkpoints/step_00000010",
        "WARNING mmsphere.test_console: skipped (empty_media) key=a",
    ]


def test_other_processes_show_only_errors(capsys):
    handler = ConsoleHandler(rank=1)
    logging.getLogger().addHandler(handler)
    try:
        log.warning("a warning every process would print")
        log.info("marked", extra=ON_CONSOLE)
        log.error("an error of this process")
    finally:
        logging.getLogger().removeHandler(handler)
    assert capsys.readouterr().err.splitlines() == ["ERROR mmsphere.test_console: an error of this process"]


def test_console_logging_leaves_the_callers_logging_as_it_was():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    with console_logging():
        assert root.level == logging.INFO
    assert root.level == level and root.handlers == handlers


def test_the_run_log_file_gets_every_record_and_other_processes_write_theirs_only_on_a_warning(tmp_path):
    with console_logging():
        with run_log_file(tmp_path, rank=0) as main_log, run_log_file(tmp_path, rank=1) as other_log:
            log.info("model-building chatter")
            assert not other_log.exists()
        with run_log_file(tmp_path, rank=1):
            log.warning("a shard only process 1 reads is damaged")
        log.info("after the run")
    assert "INFO mmsphere.test_console: model-building chatter" in main_log.read_text()
    assert "after the run" not in main_log.read_text()
    assert main_log.name == "train.log" and other_log.name == "train.rank1.log"
    assert other_log.read_text().count("\n") == 1 and "WARNING" in other_log.read_text()
