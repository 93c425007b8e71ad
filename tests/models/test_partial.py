"""A tower split at any block of its stack gives the tower's own output: open_clip ViT and text, ResNet, BERT, EfficientNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmsphere.models import create_model
from mmsphere.models.config import ModelConfig
from mmsphere.models.partial import block_input, from_block, modules_from

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
            # each sample's cached input is its own: computed alone it is the same, up to the rounding of the
            # kernels a batch of one selects (a CNN's convolutions: a few 1e-6 on values of order 1, depending on
            # the thread count); another sample's input would differ by the values themselves
            alone = block_input(lambda: encode(inputs[1:2]), stack, start)
            torch.testing.assert_close(alone[0], cached[1], rtol=1e-4, atol=1e-5 * float(cached[1].abs().max()))
            assert not torch.allclose(cached[0], cached[1], rtol=1e-2, atol=1e-3)
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
    torch.manual_seed(0)  # the same inputs whatever the test order
    images = torch.randn(3, 3, 96, 96)
    assert _check_every_split(model, "image", images, torch.zeros(1, 3, 96, 96)) == 7  # EfficientNet's stages
    text = model.tokenizer(["a dog on the beach", "a red bus", "the beach"])
    assert _check_every_split(model, "text", text, text) == 2  # BERT's layers


def test_modules_from_a_block_are_the_block_stack_tail_and_what_follows():
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="mmsphere-small")).eval()
    visual = model.clip.visual
    after = modules_from(lambda: model.clip.encode_image(torch.zeros(1, 3, 64, 64)), visual,
                         visual.transformer.resblocks, 1)
    assert after[0] is visual.transformer.resblocks[1] and visual.ln_post in after
    for before in (visual.conv1, visual.ln_pre, visual.transformer.resblocks[0]):
        assert before not in after
    text = model.tokenizer(["a red square"])
    after = modules_from(lambda: model.clip.encode_text(text), model.clip, model.clip.transformer.resblocks, 0)
    assert model.clip.ln_final in after and model.clip.token_embedding not in after


@pytest.mark.parametrize("count", [1, 2])
def test_training_from_cached_block_inputs_equals_the_full_forward(count):
    """model.trainable=last_blocks=K: loss and every trainable gradient from cached block inputs equal the full forward's."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="mmsphere-small", trainable=f"last_blocks={count}")).train()
    images = torch.randn(4, 3, 64, 64)
    text = model.tokenizer(["a red square", "two blue circles", "a green line", "x y z"])

    def loss_and_grads(image_features, text_features):
        logits = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T * model.clip.logit_scale.exp()
        loss = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
        return loss, {name: grad for (name, _), grad in zip(trainable, grads)}

    full_loss, full_grads = loss_and_grads(model.clip.encode_image(images), model.clip.encode_text(text))
    cached_image, cached_text = model.block_inputs("image", images), model.block_inputs("text", text)
    assert not cached_image.requires_grad
    loss, grads = loss_and_grads(model.encode_from_blocks("image", cached_image),
                                 model.encode_from_blocks("text", cached_text, text))
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == full_grads.keys() and any(".resblocks." in name for name in grads)
    for name, grad in full_grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
