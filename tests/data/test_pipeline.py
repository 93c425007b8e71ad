"""Training streams and evaluation loaders over real shards: the batch contract, splitting, seeding, weights."""

import io
import json
from collections import Counter
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from open_clip.transform import image_transform

from mmsphere.data.config import DataConfig, SourceConfig
from mmsphere.errors import ConfigError, DataError, MmsphereError
from mmsphere.data import Batch, build_eval_loader, build_train_stream, skipped_counts

SIZE = 16


@pytest.fixture(scope="module")
def clips(media):
    """Three distinct real H.264 clips (different lengths, one portrait with audio)."""
    return [
        media.video(width=32, height=24, frames=14),
        media.video(width=24, height=40, frames=9, audio=True),
        media.video(width=40, height=32, frames=20),
    ]


def write_video_shards(folder, media, clips, name, shards, per_shard, hostile_first=False):
    """``shards`` tar files of ``per_shard`` clips; each sample has two captions. Returns (pattern, key -> captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for shard in range(shards):
        members = [("broken.mp4", b""), ("broken.txt", b"zero bytes")] if hostile_first else []
        for index in range(per_shard):
            key = f"{name}-{shard}-{index}"
            captions[key] = [f"{name} clip {shard} {index}", f"another caption of {key}"]
            members += [(f"{key}.json", json.dumps({"captions": captions[key]}).encode()),
                        (f"{key}.mp4", clips[(shard + index) % len(clips)])]
        media.tar(folder / f"{name}-{shard}.tar", members)
    return str(folder / f"{name}-{{0..{shards - 1}}}.tar"), captions


def write_image_shards(folder, media, name, shards, per_shard):
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for shard in range(shards):
        members = []
        for index in range(per_shard):
            key = f"{name}-{shard}-{index}"
            captions[key] = [f"an image {key}"]
            members += [(f"{key}.txt", captions[key][0].encode()),
                        (f"{key}.png", media.image(20 + index, 18, "PNG", seed=shard * 100 + index))]
        media.tar(folder / f"{name}-{shard}.tar", members)
    return str(folder / f"{name}-{{0..{shards - 1}}}.tar"), captions


def stream_for(sources, media, tokenizer, batch_size=4, **data_fields):
    fields = dict(frames=4, shuffle_buffer=8, epoch_samples=16)
    fields.update(data_fields)
    keywords = {key: fields.pop(key) for key in ("rank", "world_size", "seed", "epoch", "split") if key in fields}
    return build_train_stream(sources, DataConfig(**fields), image_size=SIZE, image_mean=media.mean,
                              image_std=media.std, tokenizer=tokenizer, batch_size=batch_size, **keywords)


def test_training_batches_follow_the_contract(tmp_path, media, clips, tokenizer):
    video_urls, video_captions = write_video_shards(tmp_path / "v", media, clips, "vid", 2, 4)
    image_urls, image_captions = write_image_shards(tmp_path / "i", media, "img", 2, 4)
    sources = [SourceConfig(urls=video_urls, modality="video", weight=1.0, name="clips"),
               SourceConfig(urls=image_urls, modality="image", weight=1.0, name="photos")]
    stream = stream_for(sources, media, tokenizer, epoch_samples=40)
    batches = list(stream)
    assert len(batches) == len(stream) == 10
    assert {batch.source for batch in batches} == {"clips", "photos"}
    for batch in batches:
        assert isinstance(batch, Batch) and not batch.cached and batch.group_ids is None  # positives: diagonal
        video = batch.source == "clips"
        assert batch.modality == ("video" if video else "image")
        frames = 4 if video else 1
        # frames [B, T, 3, H, W] for clips, images [B, 3, H, W] for photos
        assert batch.media.shape == ((4, frames, 3, SIZE, SIZE) if video else (4, 3, SIZE, SIZE))
        assert batch.media.dtype == torch.float32 and batch.valid.all()
        assert set(batch.encoder_inputs()) == ({"text", "frames", "frame_mask"} if video else {"text", "images"})
        assert batch.frame_mask.shape == (4, frames) and batch.frame_mask.dtype == torch.bool
        assert batch.frame_mask.all()  # every clip here has at least 4 frames
        known = video_captions if video else image_captions
        assert all(key in known for key in batch.keys)  # homogeneous: one source per batch
        assert all(caption in known[key] for key, caption in zip(batch.keys, batch.caption))
        assert torch.equal(batch.text, tokenizer(batch.caption))
    chosen = Counter(caption for batch in batches if batch.source == "clips" for caption in batch.caption)
    assert any(caption.startswith("another caption") for caption in chosen)  # a random caption, not always the first
    assert any(not caption.startswith("another caption") for caption in chosen)


def independent_frames(data: bytes, count: int, mean, std) -> torch.Tensor:
    """PyAV sequential decode + open_clip's PIL preprocessing at linspace indices: no code shared with mmsphere."""
    with av.open(io.BytesIO(data)) as container:
        images = [frame.to_image() for frame in container.decode(video=0)]
    total = len(images)
    if total <= count:
        indices = list(range(total))
    else:
        indices = [int(Fraction(step * (total - 1), count - 1) + Fraction(1, 2)) for step in range(count)]
    transform = image_transform(SIZE, is_train=False, mean=mean, std=std)
    return torch.stack([transform(images[index]) for index in indices])


def test_evaluation_frames_match_an_independent_decode(tmp_path, media, clips):
    urls, captions = write_video_shards(tmp_path, media, clips, "val", 2, 3)
    loader = build_eval_loader(urls, "video", frames=6, image_size=SIZE, image_mean=media.mean,
                               image_std=media.std, batch_size=4)
    batches = list(loader)
    assert [len(batch.keys) for batch in batches] == [4, 2]
    keys = [key for batch in batches for key in batch.keys]
    assert keys == [f"val-{shard}-{index}" for shard in range(2) for index in range(3)]  # in shard order
    tolerance = 3.0 / 255.0 / min(media.std)
    for batch in batches:
        assert isinstance(batch, Batch) and batch.modality == "video" and batch.text is None  # all captions, no tokens
        for row, key in enumerate(batch.keys):
            assert batch.captions[row] == captions[key]  # all captions, untokenised
            shard, index = map(int, key.split("-")[1:])
            expected = independent_frames(clips[(shard + index) % 3], 6, media.mean, media.std)
            valid = int(batch.frame_mask[row].sum())
            assert valid == min(6, expected.shape[0]) == expected.shape[0]
            assert (batch.media[row, :valid] - expected).abs().max() <= tolerance


def test_sources_interleave_by_weight(tmp_path, media, tokenizer):
    heavy, _ = write_image_shards(tmp_path / "a", media, "heavy", 1, 3)
    light, _ = write_image_shards(tmp_path / "b", media, "light", 1, 3)
    sources = [SourceConfig(urls=heavy, modality="image", weight=3.0, name="heavy"),
               SourceConfig(urls=light, modality="image", weight=1.0, name="light")]
    stream = stream_for(sources, media, tokenizer, batch_size=2, epoch_samples=800, shuffle_buffer=0)
    counts = Counter(batch.source for batch in stream)
    share = counts["heavy"] / 400
    assert abs(share - 0.75) < 3 * np.sqrt(0.75 * 0.25 / 400)  # three binomial standard deviations


def test_ranks_read_disjoint_shards_that_cover_the_data(tmp_path, media, clips, tokenizer):
    urls, captions = write_video_shards(tmp_path, media, clips, "v", 4, 3)
    source = SourceConfig(urls=urls, modality="video", name="v")
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stream = stream_for([source], media, tokenizer, batch_size=3, resampled=False, shuffle_buffer=0,
                                epoch_samples=6, rank=rank, world_size=2, epoch=epoch)
            seen.append([key for batch in stream for key in batch.keys])
        assert len(seen[0]) == len(seen[1]) == 6
        assert not set(seen[0]) & set(seen[1])
        assert set(seen[0]) | set(seen[1]) == set(captions)
        # whole shards go to one rank
        assert len({key.split("-")[1] for key in seen[0]}) == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_draws_the_same_source_at_each_step(tmp_path, media, tokenizer, workers):
    """The global batch is one modality (ARCHITECTURE.md, Data): ranks in different collectives hang for ever."""
    first, _ = write_image_shards(tmp_path / "a", media, "first", 4, 2)
    second, _ = write_image_shards(tmp_path / "b", media, "second", 4, 2)
    sources = [SourceConfig(urls=first, modality="image", weight=1.0, name="first"),
               SourceConfig(urls=second, modality="image", weight=1.0, name="second")]
    per_rank = []
    for rank in (0, 1):
        stream = stream_for(sources, media, tokenizer, batch_size=2, epoch_samples=24, shuffle_buffer=0,
                            rank=rank, world_size=2, workers=workers)
        per_rank.append([batch.source for batch in stream])
    assert len(per_rank[0]) == 12
    assert per_rank[0] == per_rank[1]
    assert set(per_rank[0]) == {"first", "second"}  # both sources do take part


def test_seeds_and_epochs_fix_the_order(tmp_path, media, tokenizer):
    urls, _ = write_image_shards(tmp_path, media, "img", 3, 4)
    source = SourceConfig(urls=urls, modality="image", name="img")

    def keys(**fields):
        return [key for batch in stream_for([source], media, tokenizer, epoch_samples=12, **fields)
                for key in batch.keys]

    assert keys(seed=1) == keys(seed=1)
    assert keys(seed=1) != keys(seed=2)
    assert keys(seed=1, epoch=0) != keys(seed=1, epoch=1)
    assert keys(seed=1, split="train") != keys(seed=1, split="meta")
    stream = stream_for([source], media, tokenizer, epoch_samples=12, seed=1)
    first = [key for batch in stream for key in batch.keys]
    assert stream.epoch == 1  # a pass is an epoch
    second = [key for batch in stream for key in batch.keys]
    assert first == keys(seed=1, epoch=0) and second == keys(seed=1, epoch=1)
    stream.set_epoch(0)
    assert [key for batch in stream for key in batch.keys] == first


def test_a_virtual_epoch_has_a_fixed_length_even_on_finite_data(tmp_path, media, tokenizer):
    urls, captions = write_image_shards(tmp_path, media, "img", 1, 3)
    stream = stream_for([SourceConfig(urls=urls, modality="image")], media, tokenizer, batch_size=4,
                        resampled=False, epoch_samples=21)
    batches = list(stream)
    assert len(stream) == 5 and len(batches) == 5
    counts = Counter(key for batch in batches for key in batch.keys)
    assert set(counts) == set(captions) and sum(counts.values()) == 20  # the 3 samples, repeated


def test_too_few_shards_for_the_readers_is_a_clear_error(tmp_path, media, clips, tokenizer):
    urls, _ = write_video_shards(tmp_path, media, clips, "v", 3, 1)
    source = SourceConfig(urls=urls, modality="video", name="few")
    with pytest.raises(ConfigError, match=r"'few': 3 shard\(s\) for 2 process\(es\) x 2 worker\(s\) = 4 readers"):
        stream_for([source], media, tokenizer, resampled=False, workers=2, rank=1, world_size=2)
    stream_for([source], media, tokenizer, resampled=True, workers=2, rank=1, world_size=2)  # resampling is fine


def test_bad_arguments_fail_fast_and_name_the_problem(tmp_path, media, clips, tokenizer):
    urls, _ = write_video_shards(tmp_path, media, clips, "v", 2, 1)
    good = SourceConfig(urls=urls, modality="video", name="v")
    cases = [
        (ConfigError, "no data source", dict(sources=[])),
        (ConfigError, "modality='audio'", dict(sources=[SourceConfig(urls=urls, modality="audio")])),
        (ConfigError, "weight=0", dict(sources=[SourceConfig(urls=urls, weight=0.0)])),
        (FileNotFoundError, "missing-3.tar", dict(sources=[SourceConfig(urls=str(tmp_path / "missing-{3..4}.tar"))])),
        (ValueError, "names no shard", dict(sources=[SourceConfig(urls="::")])),
        (ValueError, "batch_size=0", dict(batch_size=0)),
        (ValueError, "rank=2, world_size=2", dict(rank=2, world_size=2)),
        (TypeError, "tokenizer must return a tensor", dict(tokenizer=lambda captions: [[1, 2]] * len(captions))),
    ]
    for error, message, overrides in cases:
        arguments = dict(sources=[good], tokenizer=tokenizer, batch_size=2, rank=0, world_size=1)
        arguments.update(overrides)
        with pytest.raises(error, match=message):
            build_train_stream(arguments.pop("sources"), DataConfig(), image_size=SIZE, image_mean=media.mean,
                               image_std=media.std, **arguments)
    with pytest.raises(ValueError, match="frames=0"):
        build_eval_loader(urls, "video", frames=0, image_size=SIZE, image_mean=media.mean, image_std=media.std,
                          batch_size=2)
    with pytest.raises(ValueError, match="modality='text'"):
        build_eval_loader(urls, "text", frames=4, image_size=SIZE, image_mean=media.mean, image_std=media.std,
                          batch_size=2)


def test_a_source_with_nothing_decodable_stops_with_an_error_instead_of_hanging(tmp_path, media, tokenizer):
    media.tar(tmp_path / "bad-0.tar", [("a.mp4", b""), ("a.txt", b"x"), ("b.txt", b"no media")])
    media.tar(tmp_path / "bad-1.tar", [("c.jpg", b"garbage"), ("c.txt", b"x")])
    source = SourceConfig(urls=str(tmp_path / "bad-{0..1}.tar"), modality="video", name="broken")
    with pytest.raises(MmsphereError, match="'broken': a full pass over its 2 shard"):
        list(stream_for([source], media, tokenizer, resampled=False))
    (tmp_path / "empty-0.tar").write_bytes(b"")
    empty = SourceConfig(urls=str(tmp_path / "empty-0.tar"), modality="video", name="empty")
    with pytest.raises(MmsphereError, match="'empty': 64 shards in a row gave no sample"):
        list(stream_for([empty], media, tokenizer, resampled=True))


@pytest.mark.parametrize("resampled", [False, True], ids=["finite", "resampled"])
def test_image_shards_given_as_a_video_source_stop_at_the_first_batch_with_one_line(tmp_path, media, tokenizer,
                                                                                    resampled):
    """After 16 samples, not 10,000: the source, the modality declared, the extensions found and expected.

    From a loader worker the error arrives as it was raised, not as the DataLoader's re-raise with the
    worker's traceback for a message.
    """
    urls, _ = write_image_shards(tmp_path, media, "photos", shards=2, per_shard=20)  # a 40-sample set
    source = SourceConfig(urls=urls, modality="video", name="clips")
    messages = []
    for workers in (0, 1):
        stream = stream_for([source], media, tokenizer, resampled=resampled, workers=workers)
        with pytest.raises(DataError) as raised:
            next(iter(stream))
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("data source 'clips' has modality=video, but its first 16 samples hold .png and "
                                  "none of .mp4, .webm")
    assert messages[0].endswith("set the source's modality to image, or point its urls at video shards")
    assert "\n" not in messages[0]


@pytest.mark.slow
def test_worker_processes_split_shards_and_report_their_skips(tmp_path, media, clips, tokenizer):
    urls, captions = write_video_shards(tmp_path, media, clips, "w", 4, 2, hostile_first=True)
    source = SourceConfig(urls=urls, modality="video", name="w")
    stream = stream_for([source], media, tokenizer, batch_size=2, resampled=False, shuffle_buffer=0,
                        epoch_samples=8, workers=2)
    keys = [key for batch in stream for key in batch.keys]
    assert sorted(keys) == sorted(captions)  # each worker read its own two shards once
    assert skipped_counts() == {"empty_media": 4}  # counted in the workers, delivered to this process
    loader = build_eval_loader(urls, "video", frames=4, image_size=SIZE, image_mean=media.mean,
                               image_std=media.std, batch_size=3, workers=2)
    assert sorted(key for batch in loader for key in batch.keys) == sorted(captions)
    assert skipped_counts() == {"empty_media": 8}
