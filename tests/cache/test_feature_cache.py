"""Feature caches (mmsphere.cache): frozen-trunk features stored once, read instead of decoding.

Every check compares against an independent computation: a run that decodes the shards, the
towers' own ``encode_*`` on freshly decoded samples, the tar files read with :mod:`tarfile`, and
the safetensors header parsed by hand.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
import yaml
from safetensors import safe_open

import mmsphere.cache.build
import mmsphere.data.eval_stream
import mmsphere.data.source_samples
import mmsphere.data.samples
from mmsphere.cache import build_config_caches, build_feature_cache, cache_for, config_caches, read_shard_features
from mmsphere.cli import main
from mmsphere.data.config import DataConfig
from mmsphere.models.config import ModelConfig
from mmsphere.train.config import config_from_dict
from mmsphere.data.mixing import build_train_stream
from mmsphere.data.samples import DecodeOptions, RawSample, decode_sample
from mmsphere.errors import ConfigError, DataError
from mmsphere.models import create_model, load_run
from mmsphere.train import train
from tests.scenarios.test_matrix import write_video_text_shards
from tests.train.conftest import tiny_config, write_image_text_shards

BAD_KEY = "bad"
BAD_POSITION = 2  # the undecodable sample's place in the first train shard


# --------------------------------------------------------------------------------------------
# shards and helpers


def _tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of a tar in member order, read with tarfile: [(key, {extension: bytes})]."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            key, _, extension = member.name.partition(".")
            samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return list(samples.items())


def _insert_bad_sample(path: Path) -> None:
    """Rewrite a shard with an undecodable ``bad.jpg`` + ``bad.txt`` at ``BAD_POSITION``."""
    samples = _tar_samples(path)
    samples.insert(BAD_POSITION, (BAD_KEY, {"jpg": b"\xff\xd8 this is not a jpeg " * 4, "txt": b"a broken picture"}))
    with wds.TarWriter(str(path)) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})


def _urls(pattern: str) -> list[str]:
    prefix, _, rest = pattern.partition("{")
    first, _, rest = rest.partition("..")
    last, _, suffix = rest.partition("}")
    return [f"{prefix}{index:0{len(first)}d}{suffix}" for index in range(int(first), int(last) + 1)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP's spinning threads make tiny convolutions ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    """Small image and video shard sets; the first train shard holds one undecodable sample."""
    root = tmp_path_factory.mktemp("cache_shards")
    found = {"train": write_image_text_shards(root / "train", "train", shards=2, per_shard=6, seed=0),
             "meta": write_image_text_shards(root / "meta", "meta", shards=2, per_shard=6, seed=1),
             "val": write_image_text_shards(root / "val", "val", shards=1, per_shard=12, seed=2),
             "video": write_video_text_shards(root / "video", "video", shards=2, per_shard=6, seed=3),
             "video_val": write_video_text_shards(root / "video_val", "videoval", shards=1, per_shard=6, seed=4)}
    _insert_bad_sample(Path(_urls(found["train"])[0]))
    return found


def _seeded_model(name: str = "mmsphere-tiny", seed: int = 0, **model):
    torch.manual_seed(seed)
    return create_model(ModelConfig(name=name, **{"trainable": "heads", **model}))


def _file_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        # copies: safetensors may map the file, and some tests damage it in place afterwards
        return {name: handle.get_tensor(name).clone() for name in handle.keys()}, dict(handle.metadata())


def _same_file(one: tuple[dict, dict], other: tuple[dict, dict]) -> bool:
    """Equal tensors (bit for bit) and metadata; the header's key order may differ between writes."""
    return (one[1] == other[1] and one[0].keys() == other[0].keys()
            and all(torch.equal(one[0][name], other[0][name]) for name in one[0]))


def _run_pair(raw: dict, tmp_path: Path, monkeypatch) -> tuple[dict, dict, dict, dict]:
    """Train ``raw`` decoding the shards, then from a cache built beforehand with decoding forbidden."""
    raw_plain = copy.deepcopy(raw)
    raw_plain["output_dir"] = str(tmp_path / "plain")
    raw_plain["data"]["feature_cache"] = False
    plain = train(config_from_dict(raw_plain))

    raw_cached = copy.deepcopy(raw)
    raw_cached["output_dir"] = str(tmp_path / "cached")
    raw_cached["data"]["feature_cache"] = True
    config = config_from_dict(raw_cached)
    # the model the training loop creates (seeded likewise): its trunks are what the cache holds
    torch.manual_seed(config.seed)
    train_caches, val_cache = build_config_caches(create_model(config.model), config, progress=False)
    for source in [*config.data.train, *([config.data.val] if config.data.val else [])]:
        cache = val_cache if source is config.data.val else train_caches[source.modality]
        assert all(cache.path_for(url).is_file() for url in _urls(source.urls))

    def forbidden(*args, **kwargs):
        raise AssertionError("a sample was decoded during a feature-cache run")

    with monkeypatch.context() as patch:
        for module, name in [(mmsphere.data.source_samples, "decode_sample"), (mmsphere.data.eval_stream, "decode_samples"),
                             (mmsphere.data.samples, "decode_sample"), (mmsphere.cache.build, "decode_sample")]:
            patch.setattr(module, name, forbidden)
        cached = train(config)
    return plain, cached, dict(load_run(raw_plain["output_dir"]).named_parameters()), dict(
        load_run(raw_cached["output_dir"]).named_parameters())


def _sources_drawn(config, model, steps: int) -> set[int]:
    """The sources the first ``steps`` batches of epoch 0 come from."""
    stream = build_train_stream(config.data.train, config.data, image_size=model.image_size,
                                image_mean=model.image_mean, image_std=model.image_std, tokenizer=model.tokenizer,
                                batch_size=config.train.batch_size)
    return {stream.source_of(index, 0) for index in range(steps)}


def _assert_same_runs(plain, cached, plain_params, cached_params, model_name: str, trained: list[str]) -> None:
    assert plain["steps"] == cached["steps"] == 4
    assert sum(plain["skipped_samples"].values()) >= 1, plain["skipped_samples"]  # the bad sample was met
    assert cached["skipped_samples"] == plain["skipped_samples"]
    # ranks are equal; the geometry means differ by float32 summation order only
    assert plain["validation"] and cached["validation"] == pytest.approx(plain["validation"], rel=1e-5, abs=1e-6)
    assert plain_params.keys() == cached_params.keys()
    for name, value in plain_params.items():
        if name.endswith("attn.in_proj_bias") and cached_params[name].requires_grad:
            # the key bias shifts every logit of a query's row alike, so softmax ignores it: its exact
            # gradient is 0 and what autograd returns is rounding noise, which Adam scales to steps of ~lr.
            # The query and value biases are compared as strictly as everything else
            width = value.shape[0] // 3
            keys = slice(width, 2 * width)
            torch.testing.assert_close(cached_params[name][keys], value[keys], atol=1e-5, rtol=0)
            value, cached_value = torch.cat([value[:width], value[2 * width:]]), torch.cat(
                [cached_params[name][:width], cached_params[name][2 * width:]])
        else:
            cached_value = cached_params[name]
        torch.testing.assert_close(cached_value, value, atol=1e-6, rtol=1e-5, msg=lambda text: f"{name}: {text}")
    # the heads did move: equal parameters are not merely two untrained models
    initial = dict(_seeded_model(model_name).named_parameters())
    for name in trained:
        assert (plain_params[name] - initial[name]).abs().max() > 1e-5, name


# --------------------------------------------------------------------------------------------
# 1. a cached run trains exactly as an uncached one


def test_cached_heads_training_matches_decoding_image_meta_val(shards, tmp_path, monkeypatch):
    """Heads-only ViT training with meta weighting and validation: cached == decoded, nothing decoded."""
    raw = tiny_config(shards, tmp_path / "unused", model={"name": "mmsphere-tiny", "trainable": "heads"},
                      data={"val": {"urls": shards["val"], "modality": "image"}, "resampled": False},
                      meta={"enabled": True, "params": "all"}, train={"max_steps": 4, "val_every": 2})
    plain, cached, plain_params, cached_params = _run_pair(raw, tmp_path, monkeypatch)
    _assert_same_runs(plain, cached, plain_params, cached_params, "mmsphere-tiny",
                      ["clip.visual.proj", "clip.text_projection"])


def test_cached_heads_training_matches_decoding_mixed_resnet_accum(shards, tmp_path, monkeypatch):
    """Image + video sources, BatchNorm ResNet tower, accum_freq 2: cached == decoded, nothing decoded."""
    raw = tiny_config(shards, tmp_path / "unused", model={"name": "mmsphere-tiny-rn", "trainable": "heads"},
                      data={"train": [{"urls": shards["train"], "modality": "image"},
                                      {"urls": shards["video"], "modality": "video"}],
                            "val": {"urls": shards["video_val"], "modality": "video"},
                            "frames": 4, "feature_cache_dir": str(tmp_path / "features")},
                      train={"max_steps": 4, "accum_freq": 2})
    # precondition: the 4 steps draw from both sources (else this would not test mixing)
    config = config_from_dict(raw)
    torch.manual_seed(0)
    model = create_model(config.model)
    assert _sources_drawn(config, model, steps=4) == {0, 1}
    plain, cached, plain_params, cached_params = _run_pair(raw, tmp_path, monkeypatch)
    _assert_same_runs(plain, cached, plain_params, cached_params, "mmsphere-tiny-rn",
                      ["clip.visual.attnpool.c_proj.weight", "clip.text_projection"])
    # the frozen BatchNorm statistics did not drift in either run
    initial = dict(model.named_buffers())
    for name, value in load_run(tmp_path / "plain").named_buffers():
        if "running_" in name:
            torch.testing.assert_close(value, initial[name], atol=0, rtol=0)


@pytest.mark.parametrize(("meta", "video"), [(False, False), (True, False), (False, True)])
def test_cached_last_block_training_matches_decoding(shards, tmp_path, monkeypatch, meta, video):
    """model.trainable=last_blocks=1: the cache holds each tower's last block input (every frame's, for video);
    cached == decoded, nothing decoded."""
    data = {"val": {"urls": shards["val"], "modality": "image"}, "resampled": False}
    if video:  # image and video sources mixed, a video validation set
        data = {"train": [{"urls": shards["train"], "modality": "image"}, {"urls": shards["video"], "modality": "video"}],
                "val": {"urls": shards["video_val"], "modality": "video"}, "frames": 4, "resampled": False}
    raw = tiny_config(shards, tmp_path / "unused", model={"name": "mmsphere-small", "trainable": "last_blocks=1"},
                      data=data, meta={"enabled": meta, "params": "all"}, train={"max_steps": 4, "val_every": 2})
    if video:  # precondition: the 4 steps draw from both sources
        config = config_from_dict(raw)
        model = _seeded_model("mmsphere-small", trainable="last_blocks=1")
        assert _sources_drawn(config, model, steps=4) == {0, 1}
    plain, cached, plain_params, cached_params = _run_pair(raw, tmp_path, monkeypatch)
    _assert_same_runs(plain, cached, plain_params, cached_params, "mmsphere-small",
                      ["clip.visual.proj", "clip.text_projection", "clip.visual.transformer.resblocks.1.mlp.c_fc.weight",
                       "clip.transformer.resblocks.1.attn.in_proj_weight", "clip.visual.ln_post.weight",
                       "clip.ln_final.weight"])
    # the blocks before the last stayed as they were (they are what the cache holds)
    initial = dict(_seeded_model("mmsphere-small").named_parameters())
    for name in ("clip.visual.transformer.resblocks.0.mlp.c_fc.weight", "clip.transformer.resblocks.0.attn.in_proj_weight",
                 "clip.visual.conv1.weight", "clip.token_embedding.weight"):
        torch.testing.assert_close(plain_params[name], initial[name], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# 2. the file format, as documented in mmsphere/data/feature_files.py


def test_image_shard_file_matches_documented_format_and_encoders(shards):
    """An image shard's file: names, dtypes, shapes, records in tar order; rows reproduce encode_image/encode_text."""
    model = _seeded_model().eval()
    url = _urls(shards["train"])[0]
    cache = cache_for(model, DataConfig(), "image")
    build_feature_cache(model, cache, [url], batch_size=4, progress=False)  # rows span two encode batches
    path = Path(url).parent / "features" / cache.fingerprint / (Path(url).name + ".safetensors")
    assert cache.path_for(url) == path and path.is_file()
    description = json.loads((path.parent / "cache.json").read_text())
    assert description["fingerprint"] == cache.fingerprint

    # a plain safetensors file: 8-byte little-endian header length, then a JSON header (no pickle anywhere)
    blob = path.read_bytes()
    (header_length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_length])
    assert {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"} == {
        "trunk": "F32", "text_trunk": "F32", "caption_rows": "I64", "caption_offsets": "I64"}

    tar = _tar_samples(Path(url))
    good = [(key, members) for key, members in tar if key != BAD_KEY]
    tensors, metadata = _file_tensors(path)
    width = model.clip.visual.proj.shape[0]
    captions = [members["txt"].decode() for _, members in good]
    distinct = list(dict.fromkeys(captions))
    assert tensors["trunk"].dtype == torch.float32 and tensors["trunk"].shape == (len(good), width)
    assert tensors["text_trunk"].dtype == torch.float32
    assert tensors["text_trunk"].shape == (len(distinct), model.clip.text_projection.shape[0])
    assert tensors["caption_rows"].dtype == torch.int64 and tensors["caption_rows"].shape == (len(good),)
    assert tensors["caption_offsets"].tolist() == list(range(len(good) + 1))  # one caption (.txt) each

    assert metadata["format"] == "2" and metadata["fingerprint"] == cache.fingerprint and metadata["url"] == url
    # the shard's identity: size, mtime and the SHA-256 of every member's header blocks (pax records
    # included: webdataset writes each member's float mtime into one), located here with tarfile
    with tarfile.open(url) as archive:
        headers = [(member.offset, member.offset_data) for member in archive.getmembers()]
    shard_bytes = Path(url).read_bytes()
    index = hashlib.sha256(b"".join(shard_bytes[start:stop] for start, stop in headers)).hexdigest()
    assert json.loads(metadata["source"]) == {"size": len(shard_bytes), "mtime_ns": Path(url).stat().st_mtime_ns,
                                              "tar_index_sha256": index}
    assert len(metadata["checksum"]) == 64
    records = json.loads(metadata["records"])
    assert [record["key"] for record in records] == [key for key, _ in tar]
    assert BAD_KEY == tar[BAD_POSITION][0] and "row" not in records[BAD_POSITION] and records[BAD_POSITION]["skip"]
    decoded = [record for record in records if record["key"] != BAD_KEY]
    assert [record["row"] for record in decoded] == list(range(len(good)))
    assert [record["captions"] for record in decoded] == [[caption] for caption in captions]

    options = DecodeOptions(frames=1, image_size=model.image_size, image_mean=model.image_mean,
                            image_std=model.image_std, modality="image")
    with torch.no_grad():
        for row, (key, members) in enumerate(good):
            pixels = decode_sample(RawSample(key, url, dict(members)), options).frames  # [1, 3, S, S]
            torch.testing.assert_close(F.normalize(tensors["trunk"][row:row + 1] @ model.clip.visual.proj, dim=-1),
                                       model.encode_image(pixels), atol=1e-5, rtol=1e-4)
            start, stop = tensors["caption_offsets"][row:row + 2].tolist()
            text_rows = tensors["text_trunk"][tensors["caption_rows"][start:stop]]
            assert distinct[int(tensors["caption_rows"][start])] == captions[row]
            torch.testing.assert_close(F.normalize(text_rows @ model.clip.text_projection, dim=-1),
                                       model.encode_text(model.tokenizer([captions[row]])), atol=1e-5, rtol=1e-4)


def test_video_shard_file_holds_every_frame_and_caption(shards):
    """A video shard's file: trunk [N, T, ...] + bool frame_mask [N, T]; rows reproduce encode_video/encode_text."""
    model = _seeded_model().eval()
    url = _urls(shards["video"])[0]
    cache = cache_for(model, DataConfig(frames=4), "video")
    build_feature_cache(model, cache, [url], batch_size=4, progress=False)
    tensors, metadata = _file_tensors(cache.path_for(url))
    tar = _tar_samples(Path(url))
    assert set(tensors) == {"trunk", "frame_mask", "text_trunk", "caption_rows", "caption_offsets"}
    assert tensors["trunk"].shape == (len(tar), 4, model.clip.visual.proj.shape[0])
    assert tensors["frame_mask"].dtype == torch.bool and tensors["frame_mask"].shape == (len(tar), 4)
    assert [record["key"] for record in json.loads(metadata["records"])] == [key for key, _ in tar]
    options = DecodeOptions(frames=4, image_size=model.image_size, image_mean=model.image_mean,
                            image_std=model.image_std, modality="video")
    with torch.no_grad():
        for row, (key, members) in enumerate(tar):
            sample = decode_sample(RawSample(key, url, dict(members)), options)
            assert torch.equal(tensors["frame_mask"][row], sample.frame_mask)
            frames = F.normalize(tensors["trunk"][row] @ model.clip.visual.proj, dim=-1)[None]
            torch.testing.assert_close(F.normalize(model.temporal(frames, sample.frame_mask[None]), dim=-1),
                                       model.encode_video(sample.frames[None], sample.frame_mask[None]),
                                       atol=1e-5, rtol=1e-4)
            captions = json.loads(members["json"])["captions"]
            start, stop = tensors["caption_offsets"][row:row + 2].tolist()
            assert stop - start == len(captions) == 2
            torch.testing.assert_close(
                F.normalize(tensors["text_trunk"][tensors["caption_rows"][start:stop]] @ model.clip.text_projection,
                            dim=-1),
                model.encode_text(model.tokenizer(captions)), atol=1e-5, rtol=1e-4)


def test_validation_cache_holds_exactly_decoded_frames_under_fast_decode(shards):
    """With data.fast_decode=true (a training-only speed-up) the validation cache still holds exact decodes."""
    model = _seeded_model().eval()
    raw = tiny_config(shards, Path("unused"), model={"name": "mmsphere-tiny", "trainable": "heads"},
                      data={"fast_decode": True, "frames": 4, "feature_cache": True,
                            "val": {"urls": shards["video_val"], "modality": "video"}})
    val_cache = config_caches(model, config_from_dict(raw))[1]
    url = _urls(shards["video_val"])[0]
    build_feature_cache(model, val_cache, url, progress=False)
    cached = read_shard_features(val_cache, url).trunk
    # what the uncached validation (mmsphere.data.eval_stream.build_eval_loader) decodes: exact frames
    options = DecodeOptions(frames=4, image_size=model.image_size, image_mean=model.image_mean,
                            image_std=model.image_std, modality="video")
    frames = torch.stack([decode_sample(RawSample(key, url, dict(members)), options).frames
                          for key, members in _tar_samples(Path(url))])
    with torch.no_grad():
        exact = model.image_trunk_features(frames.flatten(0, 1)).view(*frames.shape[:2], -1)
    torch.testing.assert_close(cached, exact, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# 3. resumable builds; the fingerprint follows the trunks, not the heads


def test_rebuild_encodes_only_the_missing_shard(tmp_path):
    """A deleted shard file (and a stray temporary) is rebuilt alone, bit for bit; complete files stay untouched."""
    pattern = write_image_text_shards(tmp_path, "part", shards=3, per_shard=4, seed=5)
    urls = _urls(pattern)
    model = _seeded_model()
    cache = cache_for(model, DataConfig(), "image")
    first = build_feature_cache(model, cache, pattern, batch_size=8, progress=False)
    assert (first.shards_built, first.shards_found, first.samples) == (3, 0, 12)
    before = {url: _file_tensors(cache.path_for(url)) for url in urls}
    mtimes = {url: cache.path_for(url).stat().st_mtime_ns for url in urls}

    victim = cache.path_for(urls[1])
    victim.unlink()
    stray = victim.with_name(f".{victim.name}.123.tmp")
    stray.write_bytes(b"half a file")
    second = build_feature_cache(model, cache, pattern, batch_size=8, progress=False)
    assert (second.shards_built, second.shards_found) == (1, 2)
    assert all(_same_file(_file_tensors(cache.path_for(url)), before[url]) for url in urls)
    assert [cache.path_for(url).stat().st_mtime_ns == mtimes[url] for url in urls] == [True, False, True]
    third = build_feature_cache(model, cache, pattern, batch_size=8, progress=False)
    assert (third.shards_built, third.shards_found) == (0, 3)


@pytest.mark.parametrize("name, changes_fingerprint", [
    ("clip.visual.conv1.weight", True),  # ViT patch embedding: image trunk
    ("clip.token_embedding.weight", True),  # text trunk
    ("clip.visual.proj", False),  # image head
    ("clip.text_projection", False),  # text head
    ("clip.logit_scale", False),
])
def test_fingerprint_follows_trunk_weights_only(name, changes_fingerprint):
    """Changing a trunk weight moves the cache to another folder; changing a head weight does not."""
    model = _seeded_model()
    data = DataConfig()
    reference = cache_for(model, data, "image")
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] += 0.5
    changed = cache_for(model, data, "image")
    assert (changed.fingerprint != reference.fingerprint) is changes_fingerprint
    assert (changed.path_for("/d/a.tar") != reference.path_for("/d/a.tar")) is changes_fingerprint


def test_fingerprint_follows_batchnorm_statistics():
    """A frozen BatchNorm's running statistics belong to the trunk: changing them changes the fingerprint."""
    model = _seeded_model("mmsphere-tiny-rn")
    reference = cache_for(model, DataConfig(), "image")
    head = cache_for(model, DataConfig(), "video")
    with torch.no_grad():
        model.clip.visual.bn1.running_mean += 0.1
    assert cache_for(model, DataConfig(), "image").fingerprint != reference.fingerprint
    assert head.fingerprint != reference.fingerprint  # the modality is part of the identity too


# --------------------------------------------------------------------------------------------
# 4. bad input: one clear error each


def test_trainable_trunks_are_rejected(shards, tmp_path):
    """model.trainable=all with data.feature_cache=true is a ConfigError naming model.trainable."""
    raw = tiny_config(shards, tmp_path / "run", model={"name": "mmsphere-tiny", "trainable": "all"},
                      data={"feature_cache": True, "feature_cache_dir": str(tmp_path / "features")})
    with pytest.raises(ConfigError, match=r"model\.trainable"):
        train(config_from_dict(raw))
    assert not (tmp_path / "features").exists()


def test_random_offset_is_rejected(shards, tmp_path):
    """data.random_offset=true with data.feature_cache=true is a ConfigError naming data.random_offset."""
    raw = tiny_config(shards, tmp_path / "run", model={"name": "mmsphere-tiny", "trainable": "heads"},
                      data={"feature_cache": True, "random_offset": True, "feature_cache_dir": str(tmp_path / "f")})
    with pytest.raises(ConfigError, match=r"data\.random_offset"):
        train(config_from_dict(raw))
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_cache_file_is_a_data_error_naming_it(tmp_path, damage):
    """A truncated, garbage or empty shard file is a DataError naming the file; a rebuild repairs it."""
    pattern = write_image_text_shards(tmp_path, "dmg", shards=1, per_shard=4, seed=6)
    url = _urls(pattern)[0]
    model = _seeded_model()
    cache = cache_for(model, DataConfig(), "image")
    build_feature_cache(model, cache, url, progress=False)
    path = cache.path_for(url)
    good = _file_tensors(path)
    damaged = path.read_bytes()
    path.write_bytes({"truncated": damaged[:len(damaged) // 2], "garbage": b"\x00garbage" * 100, "empty": b""}[damage])
    with pytest.raises(DataError) as caught:
        read_shard_features(cache, url)
    assert str(path) in str(caught.value)
    assert build_feature_cache(model, cache, url, progress=False).shards_built == 1
    assert _same_file(_file_tensors(path), good)


def test_missing_cache_file_names_it_and_the_command(tmp_path):
    """Reading a shard that was never cached is a DataError naming the file and `mmsphere cache`."""
    pattern = write_image_text_shards(tmp_path, "none", shards=1, per_shard=2, seed=7)
    url = _urls(pattern)[0]
    cache = cache_for(_seeded_model(), DataConfig(), "image")
    with pytest.raises(DataError) as caught:
        read_shard_features(cache, url)
    assert str(cache.path_for(url)) in str(caught.value) and "mmsphere cache" in str(caught.value)


def test_remote_shard_needs_a_cache_folder():
    """A pipe: shard URL without data.feature_cache_dir is a DataError naming data.feature_cache_dir."""
    model = _seeded_model()
    url = "pipe:curl -s https://example.invalid/shard-000000.tar"
    cache = cache_for(model, DataConfig(), "image")
    with pytest.raises(DataError, match=r"data\.feature_cache_dir"):
        read_shard_features(cache, url)
    with pytest.raises(DataError, match=r"data\.feature_cache_dir"):
        build_feature_cache(model, cache, url, progress=False)
    folder = cache_for(model, DataConfig(feature_cache_dir="/fast/cache"), "image").path_for(url)
    assert folder.parts[:3] == ("/", "fast", "cache") and folder.name == "shard-000000.tar.safetensors"


# --------------------------------------------------------------------------------------------
# 5. the `mmsphere cache` command


def _yaml_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cache_command_builds_every_source(tmp_path, capsys):
    """`mmsphere cache --config X` encodes train and val shards beside them and prints where they lie."""
    shard_sets = {"train": write_image_text_shards(tmp_path / "cli", "cli", shards=2, per_shard=3, seed=8),
                  "meta": write_image_text_shards(tmp_path / "cli_val", "clival", shards=1, per_shard=3, seed=9)}
    raw = tiny_config(shard_sets, tmp_path / "run", model={"name": "mmsphere-tiny", "trainable": "heads"},
                      data={"feature_cache": True, "val": {"urls": shard_sets["meta"], "modality": "image"}})
    assert main(["cache", "--config", str(_yaml_config(tmp_path, raw))]) == 0
    printed = json.loads(capsys.readouterr().out)
    for name, folder in (("train0", tmp_path / "cli" / "features"), ("val", tmp_path / "cli_val" / "features")):
        (fingerprint,) = [entry.name for entry in folder.iterdir()]
        assert printed["caches"][name] == {"fingerprint": fingerprint, "directory": str(folder / fingerprint)}
        assert json.loads((folder / fingerprint / "cache.json").read_text())["fingerprint"] == fingerprint
    built = sorted(path.name for path in (tmp_path / "cli" / "features").glob("*/*.safetensors"))
    assert built == ["cli-000000.tar.safetensors", "cli-000001.tar.safetensors"]
    assert len(list((tmp_path / "cli_val" / "features").glob("*/*.safetensors"))) == 1
    assert not (tmp_path / "run").exists()  # building caches trains nothing


@pytest.mark.parametrize("override, message", [
    ("data.no_such_key=1", "data.no_such_key"),
    ("model.trainable=all", "model.trainable"),
])
def test_cache_command_bad_input_is_one_line(shards, tmp_path, capsys, override, message):
    """A bad key or an uncacheable model: exit code 2 and one line on stderr naming it."""
    raw = tiny_config(shards, tmp_path / "run", model={"name": "mmsphere-tiny", "trainable": "heads"},
                      data={"feature_cache_dir": str(tmp_path / "features")})
    assert main(["cache", "--config", str(_yaml_config(tmp_path, raw)), override]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("mmsphere cache: error: ") and message in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "features").exists()


def test_the_cached_layer_is_part_of_the_fingerprint():
    """heads, last_blocks=1 and last_blocks=2 store different layers' inputs: three caches; with last_blocks=1 the
    fingerprint follows the frozen block 0 and not the trained block 1."""
    fingerprints = {trainable: cache_for(_seeded_model("mmsphere-small", trainable=trainable), DataConfig(),
                                         "image").fingerprint for trainable in ("heads", "last_blocks=1", "last_blocks=2")}
    assert len(set(fingerprints.values())) == 3, fingerprints
    for block, changes in ((0, True), (1, False)):
        model = _seeded_model("mmsphere-small", trainable="last_blocks=1")
        with torch.no_grad():
            model.clip.visual.transformer.resblocks[block].mlp.c_fc.weight.add_(0.01)
        assert (cache_for(model, DataConfig(), "image").fingerprint != fingerprints["last_blocks=1"]) == changes, block


def test_float16_storage_halves_the_files_and_reads_back_as_float32(shards, tmp_path):
    """data.feature_cache_dtype=float16: its own cache (own fingerprint), half-size tensors holding the float32
    features rounded to float16, read back as float32 (what it does to training: BENCHMARKS.md)."""
    model = _seeded_model("mmsphere-small", trainable="last_blocks=1")
    wide = cache_for(model, DataConfig(feature_cache_dir=str(tmp_path / "f32")), "image")
    half = cache_for(model, DataConfig(feature_cache_dir=str(tmp_path / "f16"), feature_cache_dtype="float16"), "image")
    assert wide.fingerprint != half.fingerprint and half.identity["storage"] == "float16"
    assert "storage" not in wide.identity  # float32 caches keep the fingerprints they had
    for cache in (wide, half):
        build_feature_cache(model, cache, shards["val"], batch_size=8, progress=False)
    url = _urls(shards["val"])[0]
    (wide_tensors, _), (half_tensors, _) = _file_tensors(wide.path_for(url)), _file_tensors(half.path_for(url))
    for name in ("trunk", "text_trunk"):
        assert wide_tensors[name].dtype == torch.float32 and half_tensors[name].dtype == torch.float16
        assert torch.equal(half_tensors[name], wide_tensors[name].half())
    read = read_shard_features(half, url)
    assert read.trunk.dtype == torch.float32 and torch.equal(read.trunk, wide_tensors["trunk"].half().float())
    assert read.text_trunk.dtype == torch.float32


def test_bad_feature_cache_dtype_is_refused():
    with pytest.raises(ConfigError, match="data.feature_cache_dtype='bfloat16' must be one of float32, float16"):
        DataConfig(feature_cache_dtype="bfloat16").validate()
