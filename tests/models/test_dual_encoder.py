"""DualEncoder: features against open_clip's own encoders, video pooling, checks at the seam, parameter groups."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from mmsphere.config import ConfigError

CAPTIONS = ["a cat on a mat", "a red car", "two dogs playing in the snow", "an empty street"]


@pytest.fixture
def reference(make_model):
    """The tiny model and an independent open_clip model holding the same weights."""
    model = make_model(temporal_head="mean").eval()
    clip = open_clip.create_model("mmsphere-tiny")
    clip.load_state_dict(model.clip.state_dict())
    return model, clip.eval()


def test_forward_shapes_unit_norm_and_logit_scale(make_model, random_frames):
    model = make_model()
    text = model.tokenizer(CAPTIONS)
    for visual in ({"frames": random_frames(4, 3)}, {"images": random_frames(4, 1)[:, 0]}):
        output = model(text, **visual)
        assert set(output) == {"image_features", "text_features", "logit_scale", "image_norms", "text_norms"}
        for name in ("image_features", "text_features"):
            assert output[name].shape == (4, model.embed_dim)
            torch.testing.assert_close(output[name].norm(dim=-1), torch.ones(4))
        assert output["logit_scale"].ndim == 0
        assert output["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
        assert model.log_logit_scale is model.clip.logit_scale


def test_features_equal_open_clip_normalised(reference, random_frames):
    model, clip = reference
    images = random_frames(4, 1)[:, 0]
    text = open_clip.tokenize(CAPTIONS, context_length=16)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), clip.encode_image(images, normalize=True))
        torch.testing.assert_close(model.encode_text(text), clip.encode_text(text, normalize=True))


def test_the_norms_are_those_of_open_clips_features_before_normalisation(reference, random_frames):
    """``image_norms``/``text_norms`` (what SphereFace-R's none/soft read): open_clip's unnormalised features' norms,
    for images, frames (the temporal head's output: the masked mean of unit frame features) and cached trunks."""
    model, clip = reference
    images = random_frames(4, 1)[:, 0]
    text = open_clip.tokenize(CAPTIONS, context_length=16)
    with torch.no_grad():
        output = model(text, images=images)
        torch.testing.assert_close(output["image_norms"], clip.encode_image(images).norm(dim=-1))
        torch.testing.assert_close(output["text_norms"], clip.encode_text(text).norm(dim=-1))
        frames = random_frames(4, 3, seed=2)
        mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False], [True, True, True]])
        unit = torch.nn.functional.normalize(clip.encode_image(frames.flatten(0, 1)), dim=-1).view(4, 3, -1)
        pooled = torch.stack([unit[row][mask[row]].mean(dim=0) for row in range(4)])
        torch.testing.assert_close(model(text, frames=frames, frame_mask=mask)["image_norms"], pooled.norm(dim=-1))
        trunks = model(text_trunk=model.text_trunk_features(text), image_trunk=model.image_trunk_features(images))
        torch.testing.assert_close(trunks["image_norms"], output["image_norms"])
        torch.testing.assert_close(trunks["text_norms"], output["text_norms"])


def test_tokenizer_is_open_clip_bpe_at_context_length(make_model):
    model = make_model()
    tokens = model.tokenizer(CAPTIONS)
    assert tokens.shape == (len(CAPTIONS), 16) and tokens.dtype == torch.long
    assert model.context_length == 16
    assert torch.equal(tokens, open_clip.tokenize(CAPTIONS, context_length=16))


def test_encode_video_is_masked_mean_of_per_frame_features(reference, random_frames):
    model, clip = reference
    frames = random_frames(3, 4)
    mask = torch.tensor([[True, True, True, True], [True, False, False, False], [True, True, False, False]])
    with torch.no_grad():
        actual = model.encode_video(frames, mask)
        expected = []
        for video, valid in zip(frames, mask):
            # one frame at a time through open_clip, pooled in float64
            per_frame = [clip.encode_image(video[t : t + 1], normalize=True)[0].double() for t in range(4) if valid[t]]
            expected.append(F.normalize(torch.stack(per_frame).mean(0), dim=-1))
    torch.testing.assert_close(actual.double(), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_padded_frames_do_not_change_video_features(make_model, random_frames, perturb):
    model = make_model(temporal_head="transformer", max_frames=8).eval()
    perturb(model.temporal)
    frames = random_frames(2, 4)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    garbage = frames.clone()
    garbage[0, 2:] = random_frames(1, 2, seed=5)[0] * 3
    with torch.no_grad():
        padded = model.encode_video(frames, mask)
        torch.testing.assert_close(model.encode_video(garbage, mask), padded, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode_video(frames[:1, :2]), padded[:1], rtol=1e-5, atol=1e-6)


def test_no_mask_means_every_frame_is_valid(make_model, random_frames):
    model = make_model().eval()
    frames = random_frames(2, 3)
    with torch.no_grad():
        all_valid = torch.ones(2, 3, dtype=torch.bool)
        torch.testing.assert_close(model.encode_video(frames), model.encode_video(frames, all_valid))


def test_image_is_a_one_frame_video_for_the_mean_head(make_model, random_frames):
    model = make_model(temporal_head="mean").eval()
    images = random_frames(4, 1)[:, 0]
    with torch.no_grad():
        as_video = model.encode_video(images[:, None])
        torch.testing.assert_close(as_video, model.encode_image(images), rtol=1e-6, atol=1e-6)


def test_transformer_head_model_starts_as_mean_head_model(make_model, random_frames):
    mean_model = make_model(seed=3, temporal_head="mean").eval()
    transformer_model = make_model(seed=3, temporal_head="transformer").eval()
    frames = random_frames(3, 5)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [True, False, False, False, False]])
    with torch.no_grad():
        torch.testing.assert_close(transformer_model.encode_video(frames, mask), mean_model.encode_video(frames, mask))


def test_bf16_autocast_gives_finite_unit_features(make_model, random_frames):
    model = make_model(temporal_head="transformer")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask = torch.tensor([[True, True, False], [True, True, True]])
        output = model(model.tokenizer(CAPTIONS[:2]), frames=random_frames(2, 3), frame_mask=mask)
    for name in ("image_features", "text_features"):
        assert torch.isfinite(output[name]).all()
        torch.testing.assert_close(output[name].float().norm(dim=-1), torch.ones(2), atol=2e-2, rtol=0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, t, f: m(t), "exactly one of images"),
        (lambda m, t, f: m(t, images=f[:, 0], frames=f), "exactly one of images"),
        (lambda m, t, f: m(t, images=f[:, 0], frame_mask=torch.ones(4, 2).bool()), "frame_mask goes with frames"),
        (lambda m, t, f: m(t[:3], frames=f), r"text of shape \(3, 16\) and frames of shape \(4, 2, 3, 32, 32\)"),
        (lambda m, t, f: m.encode_video(f[:, 0]), r"frames must have shape \[B, T, 3, H, W\], got \(4, 3, 32, 32\)"),
        (lambda m, t, f: m.encode_image(f), r"images must have shape \[B, 3, H, W\], got \(4, 2, 3, 32, 32\)"),
        (lambda m, t, f: m.encode_image(f[:, 0, :2]), "3 channels"),
        (lambda m, t, f: m.encode_image(f[:, 0, :, :16, :16]), r"must be \(32, 32\) pixels"),
        (lambda m, t, f: m.encode_image((f[:, 0] * 255).to(torch.uint8)), "floating-point"),
        (lambda m, t, f: m.encode_video(f, torch.ones(4, 3, dtype=torch.bool)), r"frame_mask of shape \(4, 3\)"),
        (lambda m, t, f: m.encode_video(f, torch.ones(4, 2)), "frame_mask must be a bool tensor"),
        (lambda m, t, f: m.encode_video(f, torch.tensor([[1, 1], [0, 0], [1, 0], [0, 0]]).bool()),
         r"rows \[1, 3\] have no valid frame"),
        (lambda m, t, f: m.encode_text(t[:, :8]), "context length 16"),
        (lambda m, t, f: m.encode_text(t.float()), "integer token ids"),
    ],
    ids=["neither", "both", "mask-with-images", "batch", "frames-ndim", "images-ndim", "channels",
         "vit-size", "uint8", "mask-shape", "mask-dtype", "empty-row", "context", "float-text"],
)
def test_bad_inputs_raise_value_error_naming_shapes(make_model, random_frames, call, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        call(model, model.tokenizer(CAPTIONS), random_frames(4, 2))


def test_tower_of_partitions_parameters(make_model):
    model = make_model(temporal_head="transformer")
    clip = model.clip
    expected = {
        "image": {f"clip.visual.{name}" for name, _ in clip.visual.named_parameters()},
        "temporal": {f"temporal.{name}" for name, _ in model.temporal.named_parameters()},
        "logit_scale": {"clip.logit_scale"},
        "text": {"clip.positional_embedding", "clip.text_projection"}
        | {f"clip.{module}.{name}" for module in ("token_embedding", "transformer", "ln_final")
           for name, _ in getattr(clip, module).named_parameters()},
    }
    actual: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        actual.setdefault(model.tower_of(name), set()).add(name)
    assert actual == expected
    with pytest.raises(ValueError, match="'visual.proj' is not a parameter name"):
        model.tower_of("visual.proj")


@pytest.mark.parametrize("tower", ["image", "text"])
def test_freezing_a_tower(make_model, random_frames, tower):
    model = make_model(**{f"freeze_{tower}": True})
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters() if model.tower_of(name) == tower}
    output = model(model.tokenizer(CAPTIONS), frames=random_frames(4, 2))
    (output["image_features"] * output["text_features"]).sum().mul(output["logit_scale"]).backward()
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert parameter.grad is None, name
        elif model.tower_of(name) != "temporal":  # the mean head has no parameters
            assert parameter.grad is not None, name
    assert not set(model.meta_parameter_names("all")) & frozen


def test_meta_parameter_names_subsets(make_model, write_architecture):
    architecture = write_architecture("tiny-two-layers", vision={"layers": 2}, text={"layers": 2})
    model = make_model(name=architecture, temporal_head="transformer")
    names = [name for name, _ in model.named_parameters()]

    def under(*prefixes: str) -> set[str]:
        return {name for name in names if any(name == p or name.startswith(p + ".") for p in prefixes)}

    heads = under("clip.visual.proj", "clip.text_projection", "temporal")
    assert set(model.meta_parameter_names("heads")) == heads
    assert "clip.logit_scale" not in heads and len(under("temporal")) > 0
    last = under("clip.visual.transformer.resblocks.1", "clip.transformer.resblocks.1")
    assert set(model.meta_parameter_names("last_blocks", last_blocks=1)) == heads | last
    both = last | under("clip.visual.transformer.resblocks.0", "clip.transformer.resblocks.0")
    assert set(model.meta_parameter_names("last_blocks", last_blocks=2)) == heads | both
    assert set(model.meta_parameter_names("last_blocks", last_blocks=9)) == heads | both
    assert model.meta_parameter_names("all") == names
    with pytest.raises(ConfigError, match="meta.params='some'"):
        model.meta_parameter_names("some")
    with pytest.raises(ConfigError, match="meta.last_blocks=0"):
        model.meta_parameter_names("last_blocks", last_blocks=0)


def test_gradient_checkpointing_gives_the_same_gradients(make_model, random_frames):
    plain = make_model(seed=4)
    checkpointed = make_model(seed=4, gradient_checkpointing=True)
    assert checkpointed.clip.visual.transformer.grad_checkpointing and checkpointed.clip.transformer.grad_checkpointing
    text, frames = plain.tokenizer(CAPTIONS), random_frames(4, 2)
    for model in (plain, checkpointed):
        output = model(text, frames=frames)
        (output["image_features"] @ output["text_features"].T).diagonal().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_attributes_follow_the_contract(make_model):
    model = make_model()
    assert model.image_size == 32 and model.embed_dim == 32
    assert model.image_mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert model.image_std == tuple(open_clip.OPENAI_DATASET_STD)
    assert model.config.name == "mmsphere-tiny" and model.run_config is None
    assert math.isclose(model.log_logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


@pytest.mark.parametrize("mode", ["heads", "last_blocks"])
def test_meta_parameters_carry_an_exact_second_order_gradient(make_model, random_frames, perturb, mode):
    """Meta-Weight-Net's virtual step through the meta parameters, checked against finite differences.

    Attention has no double backward in the fused kernels, so the meta step runs under the math one.
    """
    model = make_model(temporal_head="transformer").double()
    perturb(model.temporal, std=0.05)
    names = model.meta_parameter_names(mode)
    parameters = dict(model.named_parameters())
    text, frames = model.tokenizer(CAPTIONS), random_frames(4, 2).double()

    def meta_loss(weight_logits: torch.Tensor) -> torch.Tensor:
        output = torch.func.functional_call(model, parameters, (text,), {"frames": frames})
        logits = output["logit_scale"] * output["image_features"] @ output["text_features"].T
        per_sample = F.cross_entropy(logits, torch.arange(4), reduction="none")
        weighted = (torch.sigmoid(weight_logits) * per_sample).mean()
        grads = torch.autograd.grad(weighted, [parameters[name] for name in names], create_graph=True)
        stepped = {**parameters, **{name: parameters[name] - 0.5 * g for name, g in zip(names, grads)}}
        after = torch.func.functional_call(model, stepped, (text,), {"frames": frames})
        return -(after["image_features"] * after["text_features"]).sum()

    weight_logits = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64, requires_grad=True)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        (meta_gradient,) = torch.autograd.grad(meta_loss(weight_logits), weight_logits)
        # directional derivative along a fixed direction, by central differences
        direction = torch.tensor([0.5, -1.0, 0.25, 0.75], dtype=torch.float64)
        step = 1e-5
        ahead, behind = meta_loss(weight_logits + step * direction), meta_loss(weight_logits - step * direction)
        finite_difference = (ahead - behind) / (2 * step)
    assert meta_gradient.abs().max() > 1e-6
    torch.testing.assert_close(meta_gradient @ direction, finite_difference.detach(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("temporal_head", ["mean", "transformer"])
def test_trainable_heads_trains_only_projections_temporal_head_and_logit_scale(make_model, random_frames,
                                                                               temporal_head):
    model = make_model(trainable="heads", temporal_head=temporal_head)
    # open_clip's CLIP names of the two projections (ViT image tower, native text tower)
    expected = {"clip.visual.proj", "clip.text_projection", "clip.logit_scale"}
    expected |= {f"temporal.{name}" for name, _ in model.temporal.named_parameters()}
    assert {name for name, parameter in model.named_parameters() if parameter.requires_grad} == expected
    output = model(model.tokenizer(CAPTIONS), frames=random_frames(4, 2))
    (output["image_features"] * output["text_features"]).sum().mul(output["logit_scale"]).backward()
    assert {name for name, parameter in model.named_parameters() if parameter.grad is not None} == expected


def test_frozen_trunk_stays_in_eval_mode(random_frames):
    """BatchNorm of a frozen ResNet trunk keeps its running statistics under model.train(); the heads train."""
    from mmsphere.models.config import ModelConfig
    from mmsphere.models import create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(name="mmsphere-tiny-rn", trainable="heads"))
    model.train()
    norms = [module for module in model.clip.visual.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert norms and not any(norm.training for norm in norms)
    assert model.clip.visual.attnpool.training and model.training
    before = [norm.running_mean.clone() for norm in norms]
    images = random_frames(4, 1, size=32)[:, 0] * 3
    eval_features = model.eval().encode_image(images)
    train_features = model.train().encode_image(images)
    for norm, mean in zip(norms, before):
        torch.testing.assert_close(norm.running_mean, mean, rtol=0, atol=0)
    # the attention-pool head has no dropout: train and eval features of a frozen trunk agree
    torch.testing.assert_close(train_features, eval_features)
    # a fully trainable model's BatchNorm does update (the check above can fail)
    torch.manual_seed(0)
    trainable = create_model(ModelConfig(name="mmsphere-tiny-rn")).train()
    trainable.encode_image(images)
    assert any(not torch.equal(norm.running_mean, mean) for norm, mean in zip(
        [module for module in trainable.clip.visual.modules() if isinstance(module, torch.nn.BatchNorm2d)], before))


def test_trainable_must_be_all_or_heads():
    from mmsphere.train.config import load_config

    with pytest.raises(ConfigError, match="model.trainable='towers' must be 'all', 'heads' or 'last_blocks=K'"):
        load_config(None, ["model.trainable=towers"])
