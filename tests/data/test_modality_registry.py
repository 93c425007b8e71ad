"""Adding a modality is one registered definition: an "npy-clip" modality registered here only.

Its media member is a NumPy array of frames ``[n, H, W, 3]`` uint8 (read with pickling off); it feeds
the ``frames`` path. Training (decoded and from the feature cache), evaluation and the config check
must all find it through the registry, with no other file touched.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from mmsphere.data import build_eval_loader, build_train_stream
from mmsphere.data.config import DataConfig, SourceConfig
from mmsphere.data.modalities import MODALITY_REGISTRY, DecodedMedia, Modality, register_modality
from mmsphere.errors import ConfigError
from mmsphere.eval.evaluate import evaluate_retrieval
from mmsphere.models import create_model, load_run
from mmsphere.models.config import ModelConfig
from mmsphere.train import train
from mmsphere.train.config import config_from_dict

FRAMES = 3  # data.frames
CLIP = 5  # frames stored per sample


def decode_npy_clip(data: bytes, frames: int, options, rng) -> DecodedMedia:
    """The first ``frames`` frames of an ``.npy`` clip (fewer when it is shorter)."""
    clip = np.load(io.BytesIO(data), allow_pickle=False)
    return DecodedMedia(np.ascontiguousarray(clip[:frames]), list(range(min(frames, len(clip)))), len(clip), "npy")


@pytest.fixture
def npy_clip():
    register_modality(Modality("npy-clip", ("npy",), decode_npy_clip, encoder="frames"))
    yield
    MODALITY_REGISTRY.unregister("npy-clip")


def level(sample: int, frame: int) -> int:
    """The grey level of frame ``frame`` of sample ``sample``: a constant picture, so resizing keeps it."""
    return (37 * sample + 61 * frame) % 256


def write_npy_shards(directory: Path, prefix: str, shards: int, per_shard: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"{prefix}-{shard:06d}.tar")) as writer:
            for index in range(per_shard):
                sample = shard * per_shard + index
                clip = np.stack([np.full((24, 32, 3), level(sample, frame), np.uint8) for frame in range(CLIP)])
                buffer = io.BytesIO()
                np.save(buffer, clip, allow_pickle=False)
                writer.write({"__key__": f"{prefix}{sample:04d}", "npy": buffer.getvalue(),
                              "txt": f"clip number {sample} of level {level(sample, 0)}"})
    return str(directory / f"{prefix}-{{000000..{shards - 1:06d}}}.tar")


@pytest.fixture
def npy_shards(tmp_path, npy_clip) -> dict[str, str]:
    return {"train": write_npy_shards(tmp_path / "shards", "train", shards=2, per_shard=12),
            "val": write_npy_shards(tmp_path / "shards", "val", shards=1, per_shard=6)}


def expected_frames(sample: int, size: int, mean, std) -> torch.Tensor:
    """Model-ready frames of a sample, computed from its grey levels alone: ``[T, 3, S, S]``."""
    levels = torch.tensor([level(sample, frame) / 255.0 for frame in range(FRAMES)], dtype=torch.float64)
    channels = (levels[:, None] - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)
    return channels[:, :, None, None].expand(FRAMES, 3, size, size)


def test_the_training_stream_decodes_collates_and_encodes_a_registered_modality(npy_shards):
    model = create_model(ModelConfig(name="mmsphere-tiny"))
    data = DataConfig(train=[SourceConfig(urls=npy_shards["train"], modality="npy-clip")], frames=FRAMES,
                      shuffle_buffer=4, epoch_samples=24, workers=0)
    stream = build_train_stream(data.train, data, image_size=model.image_size, image_mean=model.image_mean,
                                image_std=model.image_std, tokenizer=model.tokenizer, batch_size=4, seed=0)
    batch = next(iter(stream))
    assert batch.modality == "npy-clip" and batch.media.shape == (4, FRAMES, 3, model.image_size, model.image_size)
    assert batch.frame_mask.all()
    for row, key in enumerate(batch.keys):
        reference = expected_frames(int(key.removeprefix("train")), model.image_size, model.image_mean, model.image_std)
        torch.testing.assert_close(batch.media[row].double(), reference, atol=1e-5, rtol=0)
    inputs = batch.encoder_inputs()
    assert set(inputs) == {"text", "frames", "frame_mask"}
    with torch.no_grad():
        torch.testing.assert_close(model.encode_visual(**batch.media_inputs()),
                                   model.encode_video(batch.media, batch.frame_mask))


def test_evaluation_reads_a_registered_modality(npy_shards):
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="mmsphere-tiny")).eval()
    loader = build_eval_loader(npy_shards["val"], "npy-clip", frames=FRAMES, image_size=model.image_size,
                               image_mean=model.image_mean, image_std=model.image_std, batch_size=4)
    keys = [key for batch in loader for key in batch.keys]
    assert keys == [f"val{index:04d}" for index in range(6)]
    results = evaluate_retrieval(model, npy_shards["val"], modality="npy-clip", frames=FRAMES, batch_size=4,
                                 progress=False)
    assert results["data"]["num_videos"] == 6 and results["data"]["modality"] == "npy-clip"
    # the ranks again, from frames built out of the grey levels and the plain encoders
    frames = torch.stack([expected_frames(index, model.image_size, model.image_mean, model.image_std)
                          for index in range(6)]).float()
    captions = [f"clip number {index} of level {level(index, 0)}" for index in range(6)]
    with torch.no_grad():
        sim = model.encode_text(model.tokenizer(captions)) @ model.encode_video(frames).T
    for direction, scores in (("t2v", sim), ("v2t", sim.T)):
        rank = (scores > scores.diagonal()[:, None]).sum(dim=1)
        for k in (1, 5):
            assert results["metrics"][direction][f"R@{k}"] == pytest.approx(100.0 * (rank < k).double().mean().item())


def test_a_registered_modality_trains_decoded_and_from_the_feature_cache_alike(npy_shards, tmp_path):
    raw = {
        "output_dir": str(tmp_path / "plain"), "seed": 0,
        "model": {"name": "mmsphere-tiny", "trainable": "heads"},
        "data": {"train": [{"urls": npy_shards["train"], "modality": "npy-clip"}], "frames": FRAMES,
                 "shuffle_buffer": 4, "epoch_samples": 24, "workers": 0,
                 "feature_cache_dir": str(tmp_path / "features")},
        "loss": {"terms": {"clip": {"weight": 1.0}}},
        "train": {"max_steps": 3, "batch_size": 6, "lr": 1e-2, "warmup_steps": 1, "checkpoint_every": 3,
                  "log_every": 1, "cpu": True},
    }
    plain = train(config_from_dict(raw))
    cached_raw = copy.deepcopy(raw)
    cached_raw["output_dir"] = str(tmp_path / "cached")
    cached_raw["data"]["feature_cache"] = True
    cached = train(config_from_dict(cached_raw))
    assert plain["steps"] == cached["steps"] == 3
    assert any((tmp_path / "features").rglob("*.safetensors"))
    trained = dict(load_run(tmp_path / "plain").named_parameters())
    from_cache = dict(load_run(tmp_path / "cached").named_parameters())
    torch.manual_seed(0)
    initial = dict(create_model(ModelConfig(name="mmsphere-tiny", trainable="heads")).named_parameters())
    moved = [name for name in trained if not torch.equal(trained[name], initial[name])]
    assert moved, "the heads did not train"
    for name in trained:
        torch.testing.assert_close(from_cache[name], trained[name], atol=1e-5, rtol=1e-4)


def test_the_config_check_and_the_registry_refuse_what_is_not_registered(npy_clip):
    SourceConfig(urls="x.tar", modality="npy-clip")
    DataConfig(train=[SourceConfig(urls="x.tar", modality="npy-clip")]).validate()
    with pytest.raises(ValueError, match="extension\\(s\\) mp4 already belong to video"):
        register_modality(Modality("clip2", ("mp4",), decode_npy_clip))
    with pytest.raises(ValueError, match="encoder='audio' must be one of"):
        Modality("sound", ("wav",), decode_npy_clip, encoder="audio")
    MODALITY_REGISTRY.unregister("npy-clip")
    with pytest.raises(ConfigError, match="data source 0: modality='npy-clip' must be one of video, image"):
        DataConfig(train=[SourceConfig(urls="x.tar", modality="npy-clip")]).validate()
