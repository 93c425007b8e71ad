"""A feature cache is never read stale nor damaged (mmsphere/data/feature_files.py, "A stale file is never read").

Each thing a stored feature depends on is changed alone, and the next build must encode the shard
again (counted at the seam that encodes one shard) while an unchanged setup encodes nothing. A
damaged file is rebuilt by the build, with one log line naming it, and refused by the reader with a
one-line error naming it.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import mmsphere.cache.build
import mmsphere.data.feature_files
from mmsphere.cache import build_feature_cache, cache_for, config_caches, read_shard_features, trunk_digest
from mmsphere.data.feature_files import write_shard_features
from mmsphere.cli import main
from mmsphere.data.config import DataConfig
from mmsphere.models.config import ModelConfig
from mmsphere.train.config import config_from_dict
from mmsphere.data.reader import read_tar_samples
from mmsphere.data.samples import decode_sample
from mmsphere.data.stats import SkipCounter
from mmsphere.errors import DataError
from mmsphere.models import create_model, load_run
from mmsphere.train import train
from tests.scenarios.test_matrix import write_video_text_shards
from tests.train.conftest import tiny_config, write_image_text_shards

TINY = Path(mmsphere.cache.build.__file__).parents[1] / "model_configs" / "mmsphere-tiny.json"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP's spinning threads make tiny models far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def encodes(monkeypatch) -> list[str]:
    """The shard URLs the build encodes, in order (every call of the one function that encodes a shard)."""
    encoded: list[str] = []
    real = mmsphere.cache.build._encode_shard

    def counting(model, url, *args, **kwargs):
        encoded.append(url)
        return real(model, url, *args, **kwargs)

    monkeypatch.setattr(mmsphere.cache.build, "_encode_shard", counting)
    return encoded


def _model(name: str | Path = "mmsphere-tiny", seed: int = 0, **fields) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(ModelConfig(name=str(name), trainable="heads", **fields))


def _write_shard(path: Path, captions: list[str], mtime: float | None = None) -> str:
    """One image-text shard, a fixed 16 px JPEG per sample and the given captions; ``mtime``: of every member."""
    pixels = np.random.default_rng(0).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=mtime) as writer:
        for index, caption in enumerate(captions):
            writer.write({"__key__": f"s{index:04d}", "jpg": buffer.getvalue(), "txt": caption})
    return str(path)


def _one_line_naming(error: BaseException, path: Path) -> bool:
    return "\n" not in str(error) and str(path) in str(error)


# --------------------------------------------------------------------------------------------
# 1. the shards: one rewritten under its old name is encoded again, and only that one


def _rewrite(path: Path) -> None:
    """New captions of the same length: the file keeps its size."""
    _write_shard(path, ["a blue circle", "a green disc", "a red square"])


def _rewrite_keeping_mtime(path: Path) -> None:
    """A caption of another length (its member's header changes), the file's size and mtime kept."""
    stat = path.stat()
    _write_shard(path, ["a red square!", "a green disc", "a blue circle"], mtime=1.0)
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _edit_in_place(path: Path) -> None:
    """One caption byte changed where it lies: every header, the size and the member index stay, the mtime moves."""
    data = bytearray(path.read_bytes())
    where = bytes(data).index(b"a red square")
    data[where + 2:where + 5] = b"tan"
    with open(path, "r+b") as handle:  # in place, as a tool patching a file would
        handle.write(bytes(data))


def _cut_short_keeping_mtime(path: Path) -> None:
    """The last member's data cut off (a partial copy): every header that is left stays, and so does the mtime."""
    stat = path.stat()
    data = path.read_bytes()
    end = data.index(b"a blue circle") + 4
    path.write_bytes(data[:end])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _gzip_edited_keeping_mtime(path: Path) -> None:
    """A compressed shard (hashed whole) with one byte changed, its size and mtime kept."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("change", [_rewrite, _rewrite_keeping_mtime, _edit_in_place, _cut_short_keeping_mtime,
                                    _gzip_edited_keeping_mtime], ids=lambda change: change.__name__.strip("_"))
def test_a_changed_shard_is_encoded_again_alone(tmp_path, encodes, change):
    """A shard changed under its old name: its file is refused as stale, then rebuilt; the other shard is kept."""
    compressed = change is _gzip_edited_keeping_mtime
    urls = [_write_shard(tmp_path / f"part-{index}.tar", ["a red square", "a green disc", "a blue circle"], 1.0)
            for index in range(2)]
    if compressed:
        urls = [str(Path(url).rename(url + ".gz")) for url in urls]
        for url in urls:
            Path(url).write_bytes(gzip.compress(Path(url).read_bytes(), mtime=0))
    model = _model()
    cache = cache_for(model, DataConfig(), "image")
    build_feature_cache(model, cache, urls, progress=False)
    assert encodes == urls
    kept = cache.path_for(urls[1]).stat().st_mtime_ns

    change(Path(urls[0]))
    with pytest.raises(DataError, match="stale") as caught:
        read_shard_features(cache, urls[0])
    assert _one_line_naming(caught.value, cache.path_for(urls[0]))
    assert build_feature_cache(model, cache, urls, progress=False).shards_built == 1
    assert encodes == [*urls, urls[0]]
    assert cache.path_for(urls[1]).stat().st_mtime_ns == kept
    read_shard_features(cache, urls[0])  # current again
    assert build_feature_cache(model, cache, urls, progress=False).shards_built == 0


def test_a_rewritten_shard_gets_its_new_content(tmp_path, encodes):
    """After the rebuild the cache holds the new captions, not the old ones."""
    url = _write_shard(tmp_path / "part.tar", ["a red square", "a green disc", "a blue circle"])
    model = _model()
    cache = cache_for(model, DataConfig(), "image")
    build_feature_cache(model, cache, url, progress=False)
    _rewrite(Path(url))
    build_feature_cache(model, cache, url, progress=False)
    records = read_shard_features(cache, url).records
    assert [record["captions"] for record in records] == [["a blue circle"], ["a green disc"], ["a red square"]]


def test_an_unchanged_setup_reuses_the_cache(tmp_path, encodes):
    """The same config rebuilt from scratch (model, caches) encodes nothing and leaves every file untouched."""
    pattern = write_image_text_shards(tmp_path, "same", shards=2, per_shard=3, seed=0)
    raw = tiny_config({"train": pattern, "meta": pattern}, tmp_path / "run",
                      model={"name": "mmsphere-tiny", "trainable": "heads"},
                      data={"feature_cache": True, "val": {"urls": pattern, "modality": "image"}})
    config = config_from_dict(raw)
    first_train, first_val = mmsphere.cache.build_config_caches(_model(), config, progress=False)
    assert len(encodes) == 2  # training decodes as validation does here: one cache serves both
    files = sorted((tmp_path / "features").rglob("*.safetensors"))
    mtimes = [path.stat().st_mtime_ns for path in files]
    second_train, second_val = mmsphere.cache.build_config_caches(_model(), config_from_dict(raw), progress=False)
    assert len(encodes) == 2
    assert second_train == first_train and second_val == first_val
    assert [path.stat().st_mtime_ns for path in files] == mtimes


# --------------------------------------------------------------------------------------------
# 2. the model: the architecture's content and the weights


@pytest.mark.parametrize("change", [{"quick_gelu": True}, {"vision_cfg": {"pool_type": "avg"}},
                                    {"text_cfg": {"pool_type": "last"}}], ids=["quick_gelu", "image_pool", "text_pool"])
def test_an_edited_architecture_json_is_encoded_again(tmp_path, encodes, change):
    """The same JSON file, edited: same trunk weights (the old key), another fingerprint, other features."""
    url = _write_shard(tmp_path / "part.tar", ["a red square", "a green disc"])
    architecture = json.loads(TINY.read_text())
    arch = tmp_path / "cache-arch.json"
    arch.write_text(json.dumps(architecture))
    before = _model(arch)
    cache = cache_for(before, DataConfig(), "image")
    build_feature_cache(before, cache, url, progress=False)

    for key, value in change.items():
        architecture[key] = {**architecture[key], **value} if isinstance(value, dict) else value
    arch.write_text(json.dumps(architecture))
    after = _model(arch)
    assert trunk_digest(after) == trunk_digest(before)  # the weights alone cannot tell
    changed = cache_for(after, DataConfig(), "image")
    assert changed.fingerprint != cache.fingerprint
    assert build_feature_cache(after, changed, url, progress=False).shards_built == 1
    assert len(encodes) == 2
    old, new = read_shard_features(cache, url), read_shard_features(changed, url)
    assert not (torch.allclose(old.trunk, new.trunk) and torch.allclose(old.text_trunk, new.text_trunk))


def test_the_architecture_is_keyed_by_content_not_name(tmp_path, encodes):
    """The same architecture under another file name reuses the cache."""
    url = _write_shard(tmp_path / "part.tar", ["a red square"])
    first, second = tmp_path / "cache-arch-one.json", tmp_path / "cache-arch-two.json"
    first.write_text(TINY.read_text())
    second.write_text(TINY.read_text())
    model = _model(first)
    build_feature_cache(model, cache_for(model, DataConfig(), "image"), url, progress=False)
    again = _model(second)
    assert build_feature_cache(again, cache_for(again, DataConfig(), "image"), url, progress=False).shards_built == 0


@pytest.mark.parametrize("tensor, rebuilds", [("clip.visual.conv1.weight", True), ("clip.text_projection", False)])
def test_rewritten_pretrained_weights_are_encoded_again(tmp_path, encodes, tensor, rebuilds):
    """model.pretrained rewritten under its name: a changed trunk weight rebuilds; a changed head weight does not."""
    url = _write_shard(tmp_path / "part.tar", ["a red square", "a green disc"])
    weights = {name: value.detach().clone().contiguous() for name, value in _model(seed=1).state_dict().items()}
    checkpoint = tmp_path / "weights.safetensors"
    save_file(weights, str(checkpoint))
    model = _model(pretrained=str(checkpoint))
    cache = cache_for(model, DataConfig(), "image")
    build_feature_cache(model, cache, url, progress=False)

    weights[tensor].view(-1)[0] += 1.0
    save_file(weights, str(checkpoint))
    reloaded = _model(pretrained=str(checkpoint))
    assert build_feature_cache(reloaded, cache_for(reloaded, DataConfig(), "image"), url,
                               progress=False).shards_built == int(rebuilds)
    assert len(encodes) == 1 + int(rebuilds)


# --------------------------------------------------------------------------------------------
# 3. preprocessing, precision and versions: each alone changes the folder


def _changed_image_size(model, data, monkeypatch):
    return model, DataConfig(frames=data.frames, image_size=64)


def _changed_mean(model, data, monkeypatch):
    monkeypatch.setattr(model, "image_mean", (0.5, 0.5, 0.5))
    return model, data


def _changed_std(model, data, monkeypatch):
    monkeypatch.setattr(model, "image_std", (0.25, 0.25, 0.25))
    return model, data


def _changed_fast_decode(model, data, monkeypatch):
    return model, DataConfig(frames=data.frames, fast_decode=True)


def _changed_max_image_pixels(model, data, monkeypatch):
    real = mmsphere.cache.build.cache_decode_options

    def fewer_pixels(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), max_image_pixels=1000)

    monkeypatch.setattr(mmsphere.cache.build, "cache_decode_options", fewer_pixels)
    return model, data


def _changed_resize_mode(model, data, monkeypatch):
    monkeypatch.setattr(mmsphere.cache.build, "RESIZE_MODE", "squash to image_size")
    return model, data


def _changed_frames(model, data, monkeypatch):
    return model, DataConfig(frames=3)


def _changed_frame_sampling(model, data, monkeypatch):
    monkeypatch.setattr(mmsphere.cache.build, "FRAME_SAMPLING", "the middle frame of each of T segments")
    return model, data


def _changed_torch_version(model, data, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    return model, data


def _changed_open_clip_version(model, data, monkeypatch):
    monkeypatch.setattr(open_clip, "__version__", "0.0.1")
    return model, data


def _changed_cache_format(model, data, monkeypatch):
    monkeypatch.setattr(mmsphere.data.feature_files, "FORMAT_VERSION", "0-test")
    return model, data


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    """One image shard and one video shard of two samples each."""
    root = tmp_path_factory.mktemp("identity_media")
    image = write_image_text_shards(root / "image", "img", shards=1, per_shard=2, seed=0)
    video = write_video_text_shards(root / "video", "vid", shards=1, per_shard=2, seed=1)
    return {"image": image.replace("{000000..000000}", "000000"), "video": video.replace("{000000..000000}", "000000")}


@pytest.mark.parametrize("change, modality", [
    (_changed_image_size, "image"), (_changed_mean, "image"), (_changed_std, "image"),
    (_changed_fast_decode, "image"), (_changed_max_image_pixels, "image"), (_changed_resize_mode, "image"),
    (_changed_frames, "video"), (_changed_frame_sampling, "video"), (_changed_torch_version, "image"),
    (_changed_open_clip_version, "image"), (_changed_cache_format, "image"),
], ids=lambda value: value.__name__[len("_changed_"):] if callable(value) else value)
def test_each_setting_alone_makes_another_cache(media, encodes, monkeypatch, change, modality):
    """One preprocessing field, a version or the format changed: a new fingerprint, and the shard encoded again."""
    # the ResNet tower takes any input size (a ViT only its own), so data.image_size can change too
    model, data = _model("mmsphere-tiny-rn"), DataConfig(frames=2)
    reference = cache_for(model, data, modality)
    build_feature_cache(model, reference, media[modality], progress=False)  # or found from an earlier case
    assert build_feature_cache(model, reference, media[modality], progress=False).shards_built == 0
    before = len(encodes)
    changed_model, changed_data = change(model, data, monkeypatch)
    changed = cache_for(changed_model, changed_data, modality)
    assert changed.fingerprint != reference.fingerprint
    assert build_feature_cache(changed_model, changed, media[modality], progress=False).shards_built == 1
    assert len(encodes) == before + 1


def test_the_modality_alone_makes_another_cache():
    """A shard may hold a clip and a still per sample: read as images or as one-frame videos, two caches."""
    model, data = _model(), DataConfig(frames=1)
    assert cache_for(model, data, "image").fingerprint != cache_for(model, data, "video").fingerprint


def test_the_precision_makes_another_cache_computed_in_it(media, encodes):
    """train.precision=bf16: the trunks run under bf16 autocast while building, in a cache of its own."""
    model = _model().eval()
    url = media["image"]
    float32 = cache_for(model, DataConfig(), "image")
    bfloat16 = cache_for(model, DataConfig(), "image", precision="bf16")
    assert bfloat16.fingerprint != float32.fingerprint
    build_feature_cache(model, float32, url, progress=False)
    assert build_feature_cache(model, bfloat16, url, progress=False).shards_built == 1
    stored = {name: read_shard_features(cache, url).trunk for name, cache in [("fp32", float32), ("bf16", bfloat16)]}
    options = mmsphere.cache.build.decode_options(float32)
    pixels = torch.stack([decode_sample(raw, options).frames[0] for raw in read_tar_samples([url], SkipCounter())])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = model.image_trunk_features(pixels).float()
    torch.testing.assert_close(stored["bf16"], in_bf16, atol=0, rtol=0)
    assert not torch.equal(stored["bf16"], stored["fp32"])
    # a run's training caches follow train.precision; its validation cache is float32, as validation computes
    raw = tiny_config({"train": url, "meta": url}, Path("unused"),
                      model={"name": "mmsphere-tiny", "trainable": "heads"},
                      data={"feature_cache": True, "val": {"urls": url, "modality": "image"}},
                      train={"precision": "bf16"})
    train_caches, val_cache = config_caches(model, config_from_dict(raw))
    assert train_caches["image"] == bfloat16 and val_cache.identity["precision"] == "fp32"


# --------------------------------------------------------------------------------------------
# 4. damaged files: rebuilt by the build, refused by the reader, one line naming the file each


def _tensor_span(path: Path, name: str) -> tuple[int, int]:
    """The byte range of tensor ``name``'s data in a safetensors file (its header read by hand)."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    start, stop = json.loads(blob[8:8 + length])[name]["data_offsets"]
    return 8 + length + start, 8 + length + stop


def _flip_trunk_byte(path: Path) -> None:
    start, stop = _tensor_span(path, "trunk")
    _flip(path, (start + stop) // 2)


def _flip_offset_byte(path: Path) -> None:
    start, _ = _tensor_span(path, "caption_offsets")
    _flip(path, start + 8)  # the low byte of offset 1


def _edit_record(path: Path) -> None:
    data = path.read_bytes()
    where = data.index(b"a red square") if b"a red square" in data else data.index(b"square")
    _flip(path, where + 2, value=ord("b") if data[where + 2] != ord("b") else ord("c"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _flip(path: Path, position: int, value: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[position] = value if value is not None else data[position] ^ 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [(_flip_trunk_byte, "checksum"), (_flip_offset_byte, "checksum"),
                                             (_edit_record, "checksum"), (_truncate, "cannot be read")],
                         ids=["trunk_byte", "offset_byte", "record", "truncated"])
def test_a_damaged_file_is_refused_then_rebuilt(tmp_path, encodes, caplog, damage, message):
    """A flipped feature or offset byte, an edited record, a truncated file: refused in one line, rebuilt alike."""
    url = _write_shard(tmp_path / "part.tar", ["a red square", "a green disc", "a blue circle"])
    model = _model()
    cache = cache_for(model, DataConfig(), "image")
    build_feature_cache(model, cache, url, progress=False)
    path = cache.path_for(url)
    good = _contents(path)
    damage(path)
    with pytest.raises(DataError, match=message) as caught:
        read_shard_features(cache, url)
    assert _one_line_naming(caught.value, path)
    with caplog.at_level(logging.WARNING, logger="mmsphere.cache.build"):
        assert build_feature_cache(model, cache, url, progress=False).shards_built == 1
    (line,) = [record.getMessage() for record in caplog.records if record.name == "mmsphere.cache.build"]
    assert str(path) in line and message in line and "\n" not in line
    assert _contents(path) == good


def _contents(path: Path) -> tuple[dict[str, str], dict[str, list]]:
    """A feature file's metadata and tensors (as lists); the header's key order may differ between writes."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata()), {name: handle.get_tensor(name).tolist() for name in handle.keys()}


def _non_monotone_offsets(features):
    features.caption_offsets = torch.tensor([0, 2, 1, 3])


def _offsets_past_the_captions(features):
    features.caption_offsets = torch.tensor([0, 1, 2, 9])


def _offsets_not_from_zero(features):
    features.caption_offsets = torch.tensor([1, 1, 2, 3])


def _caption_rows_out_of_range(features):
    features.caption_rows = torch.tensor([0, 1, 7])


def _missing_trunk_row(features):
    features.trunk = features.trunk[:2]


def _rows_out_of_order(features):
    features.records[0]["row"], features.records[1]["row"] = 1, 0


@pytest.mark.parametrize("garble", [_non_monotone_offsets, _offsets_past_the_captions, _offsets_not_from_zero,
                                    _caption_rows_out_of_range, _missing_trunk_row, _rows_out_of_order],
                         ids=lambda garble: garble.__name__.strip("_"))
def test_garbage_structure_with_a_valid_checksum_is_refused(tmp_path, encodes, garble):
    """A file written with garbage offsets or rows (a writer's bug, checksum intact): one line, then rebuilt."""
    url = _write_shard(tmp_path / "part.tar", ["a red square", "a green disc", "a blue circle"])
    model = _model()
    cache = cache_for(model, DataConfig(), "image")
    build_feature_cache(model, cache, url, progress=False)
    features = read_shard_features(cache, url)
    garble(features)
    path = cache.path_for(url)
    write_shard_features(path, features, cache.fingerprint)
    with pytest.raises(DataError, match="inconsistent") as caught:
        read_shard_features(cache, url)
    assert _one_line_naming(caught.value, path)
    assert build_feature_cache(model, cache, url, progress=False).shards_built == 1
    read_shard_features(cache, url)


def test_a_damaged_file_under_a_training_run_is_rebuilt(tmp_path, encodes):
    """A run over a cache with a flipped byte rebuilds that shard's file and trains as over an intact cache."""
    pattern = write_image_text_shards(tmp_path, "run", shards=2, per_shard=8, seed=0)
    raw = tiny_config({"train": pattern, "meta": pattern}, tmp_path / "first",
                      model={"name": "mmsphere-tiny", "trainable": "heads"}, data={"feature_cache": True},
                      train={"max_steps": 2, "checkpoint_every": 2})
    train(config_from_dict(raw))
    assert len(encodes) == 2
    (victim, *_) = sorted((tmp_path / "features").rglob("*.safetensors"))
    _flip_trunk_byte(victim)
    train(config_from_dict({**raw, "output_dir": str(tmp_path / "second")}))
    assert encodes[2:] == [encodes[0]]
    first, second = dict(load_run(tmp_path / "first").named_parameters()), load_run(tmp_path / "second")
    for name, value in second.named_parameters():
        assert torch.equal(value, first[name]), name


# --------------------------------------------------------------------------------------------
# 5. `mmsphere cache` builds the model as training does


def test_cache_command_builds_the_cache_a_randomly_initialised_run_reads(tmp_path, encodes, monkeypatch, capsys):
    """`mmsphere cache` on randomly initialised towers (seed 3), then train: the run encodes nothing."""
    pattern = write_image_text_shards(tmp_path, "ahead", shards=2, per_shard=4, seed=0)
    raw = tiny_config({"train": pattern, "meta": pattern}, tmp_path / "run",
                      model={"name": "mmsphere-tiny", "trainable": "heads"}, seed=3,
                      data={"feature_cache": True, "val": {"urls": pattern, "modality": "image"}},
                      train={"max_steps": 2, "checkpoint_every": 2})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    torch.manual_seed(12345)  # whatever the process drew before, the command seeds
    assert main(["cache", "--config", str(path)]) == 0
    built = len(encodes)
    assert built == 2  # two shards (training and validation share the cache)
    printed = json.loads(capsys.readouterr().out)
    assert train(config_from_dict(raw))["steps"] == 2
    assert len(encodes) == built  # every shard was read from the cache built ahead
    assert {cache["fingerprint"] for cache in printed["caches"].values()} == {
        path.parent.name for path in (tmp_path / "features").glob("*/*.safetensors")}
