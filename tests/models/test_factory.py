"""create_model: architectures by name or JSON file, pretrained weights from local files and directories."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from mmsphere.errors import ConfigError, MmsphereError
from mmsphere.models.config import ModelConfig
from mmsphere.train.config import Config
from mmsphere.models import create_model, save_run


class NotATensor:
    """A picklable object that torch.load(weights_only=True) must refuse."""


def assert_same_parameters(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    expected_state = expected.state_dict()
    actual_state = actual.state_dict()
    assert actual_state.keys() == expected_state.keys()
    for name, value in expected_state.items():
        assert torch.equal(actual_state[name], value), name


@pytest.fixture
def source(make_model):
    """A tiny model whose weights are written out; models built from them must equal it."""
    return make_model(seed=11)


def write_checkpoint(kind: str, state_dict: dict[str, torch.Tensor], directory: Path) -> Path:
    if kind == "safetensors":
        path = directory / "weights.safetensors"
        save_file({name: value.contiguous() for name, value in state_dict.items()}, str(path))
    elif kind == "pt":
        path = directory / "weights.pt"
        torch.save(state_dict, path)
    elif kind == "wrapped-ddp":
        # open_clip's training checkpoints: {"epoch", "state_dict": {"module.<key>": ...}, ...}
        path = directory / "epoch_3.pt"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    elif kind == "directory":
        path = directory / "hub-layout"
        path.mkdir()
        tensors = {name: value.contiguous() for name, value in state_dict.items()}
        save_file(tensors, str(path / "open_clip_model.safetensors"))
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind", ["safetensors", "pt", "wrapped-ddp", "directory"])
def test_pretrained_local_checkpoint_round_trips_exactly(source, make_model, tmp_path, kind):
    path = write_checkpoint(kind, source.clip.state_dict(), tmp_path)
    model = make_model(seed=12, pretrained=str(path))
    assert_same_parameters(model.clip, source.clip)
    assert not torch.equal(make_model(seed=12).clip.visual.proj, source.clip.visual.proj)  # seeds differ


def test_pretrained_directory_takes_preprocessing_from_open_clip_config(source, make_model, tmp_path):
    path = write_checkpoint("directory", source.clip.state_dict(), tmp_path)
    (path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": open_clip.get_model_config("mmsphere-tiny"),
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }))
    model = make_model(pretrained=str(path))
    assert model.image_mean == (0.5, 0.5, 0.5) and model.image_std == (0.25, 0.25, 0.25)


def test_pretrained_previous_run_weights_include_the_temporal_head(make_model, perturb, tmp_path):
    source = make_model(seed=11, temporal_head="transformer")
    perturb(source.temporal)
    save_run(source, Config(model=source.config), tmp_path / "run")
    model = make_model(seed=12, temporal_head="transformer", pretrained=str(tmp_path / "run" / "model.safetensors"))
    assert_same_parameters(model, source)


def test_checkpoint_of_another_architecture_names_offending_keys(make_model, write_architecture, tmp_path):
    wider = make_model(name=write_architecture("tiny-wide", vision={"width": 48}))
    path = write_checkpoint("safetensors", wider.clip.state_dict(), tmp_path)
    message = r"weights\.safetensors.*mmsphere-tiny.*shape mismatch.*visual\.conv1\.weight \[48, 3, 8, 8\] vs \[32, 3,"
    with pytest.raises(MmsphereError, match=message):
        make_model(pretrained=str(path))


def test_checkpoint_with_missing_and_unexpected_keys_names_them(source, make_model, tmp_path):
    state_dict = dict(source.clip.state_dict())
    del state_dict["visual.proj"]
    state_dict["visual.extra_head"] = torch.zeros(3)
    path = write_checkpoint("pt", state_dict, tmp_path)
    message = r"1 missing key\(s\) such as visual\.proj; 1 unexpected key\(s\) such as visual\.extra_head"
    with pytest.raises(MmsphereError, match=message):
        make_model(pretrained=str(path))


@pytest.mark.parametrize("name", ["broken.safetensors", "broken.pt"])
def test_unreadable_checkpoint_is_named(make_model, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(MmsphereError, match=f"cannot read checkpoint .*{name}"):
        make_model(pretrained=str(path))


def test_checkpoint_holding_objects_is_refused_not_unpickled(make_model, tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"state_dict": NotATensor()}, path)
    message = r"objects.pt.*holds more than tensors \(Unsupported global: GLOBAL .*NotATensor\)"
    with pytest.raises(MmsphereError, match=message):
        make_model(pretrained=str(path))


def test_checkpoint_holding_non_tensors_is_refused(make_model, tmp_path):
    path = tmp_path / "numbers.pt"
    torch.save({"visual.proj": torch.zeros(1), "step": 3}, path)
    with pytest.raises(MmsphereError, match="numbers.pt.*entries step are not tensors"):
        make_model(pretrained=str(path))


def test_missing_checkpoint_and_empty_directory(make_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/weights.pt"):
        make_model(pretrained=str(tmp_path / "nowhere" / "weights.pt"))
    with pytest.raises(FileNotFoundError, match="holds none of open_clip_model.safetensors"):
        make_model(pretrained=str(tmp_path))


def test_unknown_pretrained_tag_lists_the_known_ones(make_model):
    with pytest.raises(ConfigError, match=r"model.pretrained='laion9000'.*ViT-B-32 \(its tags: .*openai"):
        create_model(ModelConfig(name="ViT-B-32", pretrained="laion9000"))
    with pytest.raises(ConfigError, match="mmsphere-tiny \\(it has no open_clip tags\\)"):
        make_model(pretrained="openai")


def test_unknown_architecture_lists_close_matches():
    with pytest.raises(ConfigError, match=r"model.name='ViT-B-33'.*close matches: .*ViT-B-32"):
        create_model(ModelConfig(name="ViT-B-33"))


def test_openai_spelling_of_architecture_names():
    from mmsphere.models import resolve_architecture

    assert resolve_architecture("ViT-B/32") == "ViT-B-32"


def test_architecture_from_json_file(make_model, write_architecture):
    path = write_architecture("tiny-deeper", vision={"layers": 2}, text={"layers": 2, "context_length": 12})
    model = make_model(name=path)
    assert len(model.clip.visual.transformer.resblocks) == 2 and len(model.clip.transformer.resblocks) == 2
    assert model.context_length == 12 and model.tokenizer(["a cat"]).shape == (1, 12)


def test_bad_architecture_files(tmp_path, write_architecture):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        create_model(ModelConfig(name=str(tmp_path / "absent.json")))
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(ConfigError, match="cannot read architecture config .*broken.json"):
        create_model(ModelConfig(name=str(broken)))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"embed_dim": 32}))
    with pytest.raises(ConfigError, match="partial.json' lacks vision_cfg, text_cfg"):
        create_model(ModelConfig(name=str(partial)))
    # a file named like a shipped architecture must not silently replace it
    impostor = write_architecture("ViT-B-32")
    with pytest.raises(ConfigError, match="would replace the shipped architecture 'ViT-B-32'"):
        create_model(ModelConfig(name=impostor))
    assert open_clip.get_model_config("ViT-B-32")["embed_dim"] == 512


def test_shipped_configs_are_registered():
    for name in ("mmsphere-tiny", "mmsphere-small"):
        assert name in open_clip.list_models()
    tiny = open_clip.get_model_config("mmsphere-tiny")
    assert tiny["embed_dim"] == 32 and tiny["vision_cfg"]["image_size"] == 32
    assert tiny["text_cfg"]["context_length"] == 16


def test_model_moves_to_the_requested_device():
    model = create_model(ModelConfig(name="mmsphere-tiny", temporal_head="transformer"), device="meta")
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}


def test_timm_vision_tower_offline(make_model, tmp_path, random_frames):
    path = tmp_path / "tiny-timm-vit.json"
    path.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "linear", "image_size": 32},
        "text_cfg": open_clip.get_model_config("mmsphere-tiny")["text_cfg"],
    }))
    model = make_model(name=str(path))
    features = model.encode_video(random_frames(2, 3))
    assert features.shape == (2, 32)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
    names = [name for name, _ in model.named_parameters()]
    blocks = len(model.clip.visual.trunk.blocks)
    last_block = {name for name in names if name.startswith(f"clip.visual.trunk.blocks.{blocks - 1}.")}
    assert set(model.meta_parameter_names("heads")) == {"clip.text_projection", "clip.visual.head.proj.weight"}
    assert last_block
    assert last_block < set(model.meta_parameter_names("last_blocks"))


def test_checkpoint_at_another_image_size_loads_with_a_resized_grid(source, make_model, write_architecture, tmp_path):
    path = write_checkpoint("safetensors", source.clip.state_dict(), tmp_path)
    larger = make_model(name=write_architecture("tiny-48px", vision={"image_size": 48}), pretrained=str(path))
    assert larger.image_size == 48
    assert larger.clip.visual.positional_embedding.shape == (37, 32)  # 6 x 6 patches + class token
    assert torch.equal(larger.clip.visual.conv1.weight, source.clip.visual.conv1.weight)
    assert torch.equal(larger.clip.visual.positional_embedding[0], source.clip.visual.positional_embedding[0])


@pytest.mark.parametrize("kind", ["open_clip", "run"])
def test_clip_checkpoint_without_logit_bias_loads_for_siglip_fine_tuning(source, make_model, tmp_path, kind):
    """A checkpoint with no logit_bias (any CLIP, or a run trained without it) starts SigLIP's bias at init_logit_bias."""
    if kind == "open_clip":
        path = write_checkpoint("safetensors", source.clip.state_dict(), tmp_path)
    else:
        save_run(source, Config(model=source.config), tmp_path / "run")
        path = tmp_path / "run" / "model.safetensors"
    model = make_model(seed=12, pretrained=str(path), init_logit_bias=-10.0)
    assert model.clip.logit_bias.item() == -10.0 and model.clip.logit_bias.requires_grad
    assert torch.equal(model.clip.visual.proj, source.clip.visual.proj)
    assert torch.equal(model.clip.logit_scale, source.clip.logit_scale)
