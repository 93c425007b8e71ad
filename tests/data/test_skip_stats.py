"""Skip counters and their rate-limited warnings."""

import logging

import pytest

from mmsphere.data.stats import SkipCounter, add_skipped, reset_skipped_counts, skipped_counts


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_warnings_are_rate_limited_and_counts_are_exact(caplog):
    clock = FakeClock()
    counter = SkipCounter(burst=3, interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="mmsphere.data.stats"):
        for _ in range(50):
            counter.record("empty_caption", key="k")
        assert len(caplog.records) == 3  # the burst, then silence within the interval
        clock.now = 10.5
        counter.record("empty_caption", key="k")
        assert len(caplog.records) == 4
        assert "47 more since the last warning" in caplog.records[-1].getMessage()
        counter.record("missing_media", key="other")  # another reason has its own budget
        assert len(caplog.records) == 5
    assert counter.totals == {"empty_caption": 51, "missing_media": 1}


def test_drain_hands_on_each_count_once():
    counter = SkipCounter()
    counter.record("duplicate_key")
    counter.record("duplicate_key")
    assert counter.drain() == {"duplicate_key": 2}
    assert counter.drain() == {}
    counter.record("truncated_tar")
    assert counter.drain() == {"truncated_tar": 1}
    assert counter.totals == {"duplicate_key": 2, "truncated_tar": 1}


def test_unknown_reason_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown skip reason 'oops'"):
        SkipCounter().record("oops")


def test_process_totals_add_up_and_reset():
    reset_skipped_counts()
    add_skipped({"empty_caption": 2})
    add_skipped({"empty_caption": 1, "missing_media": 4, "duplicate_key": 0})
    assert skipped_counts() == {"empty_caption": 3, "missing_media": 4}
    reset_skipped_counts()
    assert skipped_counts() == {}
