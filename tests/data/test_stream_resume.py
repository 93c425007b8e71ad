"""A training stream loaded with the position of another continues with exactly its batches (ARCHITECTURE.md, Data)."""

import json
import logging

import pytest
import torch

from mmsphere.data.config import DataConfig, SourceConfig
from mmsphere.data import build_train_stream, source_samples

SIZE = 16
BATCH = 3
BATCHES_PER_EPOCH = 10


@pytest.fixture(scope="module")
def sources(tmp_path_factory, media):
    """Two finite sources, each shard with one sample that fails to decode: photos (weight 2) and clips."""
    folder = tmp_path_factory.mktemp("resume_shards")
    clips = [media.video(width=24, height=20, frames=14), media.video(width=20, height=24, frames=19)]
    for shard in range(4):
        photos = [("photo-bad.png", b"not an image"), ("photo-bad.txt", b"unreadable")]
        videos = [("clip-bad.mp4", b""), ("clip-bad.txt", b"empty clip")]
        for index in range(6):
            key = f"photo{shard}_{index}"
            photos += [(f"{key}.json", json.dumps({"captions": [f"{key} a", f"{key} b", f"{key} c"]}).encode()),
                       (f"{key}.png", media.image(18, 20, "PNG", seed=shard * 10 + index))]
        for index in range(3):
            key = f"clip{shard}_{index}"
            videos += [(f"{key}.json", json.dumps({"captions": [f"{key} a", f"{key} b", f"{key} c"]}).encode()),
                       (f"{key}.mp4", clips[(shard + index) % 2])]
        # the bad sample's key differs per shard: a repeated key within a shard is a duplicate
        media.tar(folder / f"photos-{shard}.tar", [(name.replace("bad", f"bad{shard}"), data) for name, data in photos])
        media.tar(folder / f"clips-{shard}.tar", [(name.replace("bad", f"bad{shard}"), data) for name, data in videos])
    return [SourceConfig(urls=str(folder / "photos-{0..3}.tar"), modality="image", weight=2.0, name="photos"),
            SourceConfig(urls=str(folder / "clips-{0..3}.tar"), modality="video", weight=1.0, name="clips")]


def make_stream(sources, media, tokenizer, **fields):
    data = dict(frames=4, shuffle_buffer=5, epoch_samples=BATCH * BATCHES_PER_EPOCH, resampled=False,
                random_offset=True, workers=0)
    data.update(fields)
    return build_train_stream(sources, DataConfig(**data), image_size=SIZE, image_mean=media.mean,
                              image_std=media.std, tokenizer=tokenizer, batch_size=BATCH, seed=7)


def same_batches(got: list[dict], expected: list[dict]) -> None:
    assert [(batch.source, batch.keys, batch.caption) for batch in got] == \
        [(batch.source, batch.keys, batch.caption) for batch in expected]
    for index, (mine, theirs) in enumerate(zip(got, expected)):
        assert torch.equal(mine.media, theirs.media), f"batch {index}: other frames"
        assert torch.equal(mine.text, theirs.text), f"batch {index}: other tokens"


def two_epochs(stream) -> tuple[list[dict], list[dict]]:
    """The batches of two passes, and the stream's state before the first and after each batch."""
    batches, states = [], [json.loads(json.dumps(stream.state_dict()))]
    for _ in range(2):
        for batch in stream:
            batches.append(batch)
            states.append(json.loads(json.dumps(stream.state_dict())))  # what a checkpoint stores
    return batches, states


def rest_after(stream, count: int) -> list[dict]:
    batches = []
    while len(batches) < count:
        batches.extend(stream)
    return batches


def test_a_resumed_stream_makes_the_same_batches_and_decodes_only_what_it_hands_out(sources, media, tokenizer,
                                                                                   monkeypatch):
    decoded: list[str] = []
    real_decode = source_samples.decode_sample

    def counting_decode(raw, *arguments, **keywords):
        decoded.append(raw.key)
        return real_decode(raw, *arguments, **keywords)

    monkeypatch.setattr(source_samples, "decode_sample", counting_decode)
    stream = make_stream(sources, media, tokenizer)
    full, states = [], [stream.state_dict()]
    decoded_before = [0]  # decode calls the full stream had made when it handed out its first b batches
    for _ in range(2):
        for batch in stream:
            full.append(batch)
            states.append(json.loads(json.dumps(stream.state_dict())))
            decoded_before.append(len(decoded))
    every_decode = list(decoded)
    assert len(full) == 2 * BATCHES_PER_EPOCH
    assert {batch.source for batch in full} == {"photos", "clips"}
    assert any(key.startswith(("photo-bad", "clip-bad")) for key in every_decode)  # failures are in the stream
    assert (states[BATCHES_PER_EPOCH]["epoch"], states[BATCHES_PER_EPOCH]["batch"]) == (1, 0)  # an epoch ended

    for position in (1, 4, 7, BATCHES_PER_EPOCH, BATCHES_PER_EPOCH + 3):
        decoded.clear()
        resumed = make_stream(sources, media, tokenizer)
        resumed.load_state_dict(states[position])
        same_batches(rest_after(resumed, len(full) - position), full[position:])
        # the resumed stream decodes exactly what the full one decoded from that batch on, failures included
        assert decoded == every_decode[decoded_before[position]:], f"resumed at batch {position}"


def test_with_loader_workers_every_worker_resumes_at_its_own_position(sources, media, tokenizer):
    full, states = two_epochs(make_stream(sources, media, tokenizer, workers=2))
    assert len(full) == 2 * BATCHES_PER_EPOCH
    for position in (3, 8):  # the next batch is worker 1's, then worker 0's
        resumed = make_stream(sources, media, tokenizer, workers=2)
        resumed.load_state_dict(states[position])
        same_batches(rest_after(resumed, len(full) - position), full[position:])


def test_a_changed_layout_or_resampled_shards_resume_with_a_fresh_epoch(sources, media, tokenizer, caplog):
    stream = make_stream(sources, media, tokenizer)
    for index, _ in zip(range(4), stream):
        pass
    state = json.loads(json.dumps(stream.state_dict()))
    assert (state["epoch"], state["batch"]) == (0, 4)
    assert len(state["consumed"]) == 1 and len(state["consumed"][0]) == 2

    other = make_stream(sources, media, tokenizer, shuffle_buffer=6)
    with caplog.at_level(logging.WARNING, logger="mmsphere.data.mixing"):
        other.load_state_dict(state)
    assert "layout changed since the checkpoint (shuffle_buffer)" in caplog.text
    assert (other.epoch, other.state_dict()["batch"]) == (1, 0)

    resampled = make_stream(sources, media, tokenizer, resampled=True)
    resampled.load_state_dict(state)
    assert (resampled.epoch, resampled.state_dict()["batch"]) == (1, 0)
    fresh = make_stream(sources, media, tokenizer, resampled=True)
    fresh.set_epoch(1)
    same_batches(list(resampled)[:3], list(fresh)[:3])


@pytest.fixture(scope="module")
def damaged_sources(tmp_path_factory, media):
    """One image source whose every shard holds, before its good photos, a skip of the tar reader (an unknown
    member, a duplicate key) and one of decoding (an image that is not one)."""
    folder = tmp_path_factory.mktemp("damaged_shards")
    for shard in range(4):
        members = [(f"bad{shard}.png", b"not an image"), (f"bad{shard}.txt", b"unreadable"),
                   (f"junk{shard}.pth", b"never decoded")]
        for index in range(6):
            key = f"photo{shard}_{index}"
            members += [(f"{key}.txt", f"{key} a".encode()), (f"{key}.png", media.image(18, 20, "PNG", seed=index))]
        members += members[3:5]  # photo<shard>_0 again: a duplicate key
        media.tar(folder / f"photos-{shard}.tar", members)
    return [SourceConfig(urls=str(folder / "photos-{0..3}.tar"), modality="image", name="photos")]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_counts_each_skip_once(damaged_sources, media, tokenizer, workers):
    """The skips counted before a checkpoint plus those the resumed stream counts are the uninterrupted
    stream's: the reader's skips in what the resumed stream reads again to reach its position are not
    counted twice (a checkpoint stores the run's counts; see mmsphere.train.loop)."""
    stream = make_stream(damaged_sources, media, tokenizer, workers=workers)
    states, counted = [stream.state_dict()], [{}]
    for _ in range(2):
        for batch in stream:
            states.append(json.loads(json.dumps(stream.state_dict())))
            counted.append(stream.skipped.counts())  # what the run's counters hold at a checkpoint after the batch
    assert len(states) == 2 * BATCHES_PER_EPOCH + 1
    total = stream.skipped.counts()
    assert set(total) == {"unknown_member", "duplicate_key", "image_decode_error"}

    positions = (3, BATCHES_PER_EPOCH + 7) if workers else (1, 4, 7, BATCHES_PER_EPOCH + 3)
    for position in positions:
        # the skips of the reader are in what the resumed stream reads again to reach its position
        assert {"unknown_member", "duplicate_key"} <= set(counted[position]), position
        resumed = make_stream(damaged_sources, media, tokenizer, workers=workers)
        resumed.load_state_dict(states[position])
        rest_after(resumed, len(states) - 1 - position)
        after = resumed.skipped.counts()
        assert {reason: counted[position].get(reason, 0) + after.get(reason, 0) for reason in total} == total, \
            f"resumed at batch {position}: {counted[position]} before, {after} after"
