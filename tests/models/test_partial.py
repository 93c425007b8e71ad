"""A tower split at any block of its stack gives the tower's own output: open_clip ViT and text, ResNet, BERT, EfficientNet."""

from __future__ import annotations

import pytest
import torch

from mmsphere.models import create_model
from mmsphere.models.config import ModelConfig
from mmsphere.models.partial import block_input, from_block

from tests.models.test_offline_towers import tiny_towers  # noqa: F401  (a fixture)


def _split_points(model, tower: str):
    name, stack = model._block_stacks()[tower]
    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    return owner, attribute, stack


def _check_every_split(model, tower: str, inputs: torch.Tensor, dummy: torch.Tensor) -> int:
    """For every block, the tower run from that block's cached input (the blocks before it never called) equals the tower."""
    model.eval()
    encode = model.clip.encode_image if tower == "image" else model.clip.encode_text
    owner, attribute, stack = _split_points(model, tower)
    with torch.no_grad():
        full = encode(inputs)
        for start in range(len(stack)):
            cached = block_input(lambda: encode(inputs), stack, start)
            assert cached.shape[0] == inputs.shape[0]
            calls = []
            handles = [block.register_forward_hook(lambda *_, index=index: calls.append(index))
                       for index, block in enumerate(stack)]
            try:
                with from_block(owner, attribute, start, cached):
                    resumed = encode(dummy)
            finally:
                for handle in handles:
                    handle.remove()
            assert calls == list(range(start, len(stack))), (start, calls)
            torch.testing.assert_close(resumed, full, rtol=1e-5, atol=1e-6)
            # each sample's cached input is its own: computed alone it is the same
            alone = block_input(lambda: encode(inputs[1:2]), stack, start)
            torch.testing.assert_close(alone[0], cached[1], rtol=1e-5, atol=1e-6)
        assert getattr(owner, attribute) is stack  # the stack is restored
    return len(stack)


@pytest.mark.parametrize(("name", "blocks"), [("mmsphere-small", 2), ("mmsphere-tiny-rn", 1)])
def test_open_clip_towers_split_at_every_block(name, blocks):
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name))
    size = model.image_size
    images = torch.randn(3, 3, size, size)
    # the ResNet's stack is its last stage (the largest): its blocks, after three stages that stay in front
    assert _check_every_split(model, "image", images, torch.zeros(1, 3, size, size)) == blocks
    text = model.tokenizer(["a red square", "two blue circles on grass", "x"])
    assert _check_every_split(model, "text", text, text) == (2 if name == "mmsphere-small" else 1)


def test_offline_tower_kinds_split_at_every_block(tiny_towers, tmp_path, monkeypatch):  # noqa: F811
    """BERT (transformers) and EfficientNet-Lite0 (timm), the towers of the studies."""
    from mmsphere.models import offline_towers
    from mmsphere.models.offline_towers import export_offline_towers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(offline_towers, "minilm_directory", lambda: tiny_towers["text"])
    monkeypatch.setattr(offline_towers, "efficientnet_lite0_checkpoint", lambda: tiny_towers["image"])
    paths = export_offline_towers(tmp_path / "export", seed=3)
    model = create_model(ModelConfig(name=paths["name"], pretrained=paths["pretrained"]))
    images = torch.randn(3, 3, 96, 96)
    assert _check_every_split(model, "image", images, torch.zeros(1, 3, 96, 96)) == 7  # EfficientNet's stages
    text = model.tokenizer(["a dog on the beach", "a red bus", "the beach"])
    assert _check_every_split(model, "text", text, text) == 2  # BERT's layers
