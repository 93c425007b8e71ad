"""Temporal heads against loop-based float64 transcriptions of CLIP4Clip's meanP and seqTransf; the head registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmsphere.errors import ConfigError
from mmsphere.models.config import ModelConfig
from mmsphere.models import (
    TEMPORAL_HEADS,
    MeanTemporalHead,
    TemporalHead,
    TransformerTemporalHead,
    build_temporal_head,
    load_run,
    masked_mean,
    register_temporal_head,
    save_run,
)
from mmsphere.models.export import export_run, load_temporal_head
from mmsphere.models.temporal import check_temporal_head
from mmsphere.train.config import Config

WIDTH, HEADS, MAX_FRAMES = 32, 2, 8


def features_and_mask(batch: int = 4, length: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(batch, length, WIDTH, generator=generator), dim=-1)
    lengths = [length, 1, 3, length - 1][:batch]
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return features, mask


def reference_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = []
    for row, valid in zip(features.double(), mask):
        rows.append(torch.stack([row[t] for t in range(len(valid)) if valid[t]]).sum(0) / int(valid.sum()))
    return torch.stack(rows)


def reference_seq_transformer(
    head: TransformerTemporalHead, features: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """seqTransf written out: position embeddings, pre-LN blocks with masked attention, residual, mean."""
    p = {name: value.double() for name, value in head.state_dict().items()}
    layers = len(head.blocks)
    head_width = WIDTH // HEADS
    pooled = []
    for x, valid in zip(features.double(), mask):
        length = x.shape[0]
        h = x + p["frame_position_embedding"][:length]
        for i in range(layers):
            block = f"blocks.{i}."
            a = F.layer_norm(h, (WIDTH,), p[block + "norm1.weight"], p[block + "norm1.bias"], eps=1e-5)
            qkv = a @ p[block + "self_attn.in_proj_weight"].T + p[block + "self_attn.in_proj_bias"]
            q, k, v = qkv.split(WIDTH, dim=-1)
            per_head = []
            for j in range(HEADS):
                cols = slice(j * head_width, (j + 1) * head_width)
                scores = q[:, cols] @ k[:, cols].T / math.sqrt(head_width)
                scores[:, ~valid] = -math.inf
                per_head.append(scores.softmax(dim=-1) @ v[:, cols])
            attended = torch.cat(per_head, dim=-1)
            h = h + attended @ p[block + "self_attn.out_proj.weight"].T + p[block + "self_attn.out_proj.bias"]
            m = F.layer_norm(h, (WIDTH,), p[block + "norm2.weight"], p[block + "norm2.bias"], eps=1e-5)
            hidden = F.gelu(m @ p[block + "linear1.weight"].T + p[block + "linear1.bias"])
            h = h + hidden @ p[block + "linear2.weight"].T + p[block + "linear2.bias"]
        r = F.layer_norm(h, (WIDTH,), p["ln_post.weight"], p["ln_post.bias"], eps=1e-5)
        y = x + r @ p["output_projection.weight"].T + p["output_projection.bias"]
        pooled.append(y[valid].mean(dim=0))
    return torch.stack(pooled)


def test_masked_mean_matches_loop():
    features, mask = features_and_mask()
    torch.testing.assert_close(masked_mean(features, mask).double(), reference_mean(features, mask))
    torch.testing.assert_close(MeanTemporalHead()(features, mask).double(), reference_mean(features, mask))


def test_masked_mean_ignores_non_finite_padding():
    features, mask = features_and_mask()
    poisoned = features.masked_fill(~mask[..., None], float("inf"))
    assert torch.equal(masked_mean(poisoned, mask), masked_mean(features, mask))


def test_transformer_head_equals_mean_head_at_init():
    torch.manual_seed(0)
    head = TransformerTemporalHead(WIDTH, layers=2, heads=HEADS, max_frames=MAX_FRAMES)
    features, mask = features_and_mask()
    torch.testing.assert_close(head(features, mask), masked_mean(features, mask), rtol=0, atol=1e-7)


def test_transformer_head_output_projection_learns_from_init():
    torch.manual_seed(0)
    head = TransformerTemporalHead(WIDTH, layers=1, heads=HEADS, max_frames=MAX_FRAMES)
    features, mask = features_and_mask()
    head(features, mask).pow(2).sum().backward()
    assert head.output_projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layers", [1, 2])
def test_transformer_head_matches_float64_transcription(perturb, training, layers):
    torch.manual_seed(0)
    head = TransformerTemporalHead(WIDTH, layers=layers, heads=HEADS, max_frames=MAX_FRAMES)
    perturb(head)
    head.train(training)
    features, mask = features_and_mask()
    with torch.no_grad():
        actual = head(features, mask)
    torch.testing.assert_close(actual.double(), reference_seq_transformer(head, features, mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_transformer_head_padded_frames_change_nothing(perturb, training):
    torch.manual_seed(0)
    head = TransformerTemporalHead(WIDTH, layers=2, heads=HEADS, max_frames=MAX_FRAMES)
    perturb(head)
    head.train(training)
    features, mask = features_and_mask(batch=4, length=6)
    other_padding = torch.where(mask[..., None], features, torch.randn_like(features) * 10)
    with torch.no_grad():
        padded = head(features, mask)
        repadded = head(other_padding, mask)
        # the second video has one valid frame: equal to running it alone, without padding
        alone = head(features[1:2, :1], torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(padded, repadded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1:2], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(padded, masked_mean(features, mask), atol=1e-3)  # the head is not a no-op


def test_transformer_head_rejects_more_frames_than_positions():
    head = TransformerTemporalHead(WIDTH, layers=1, heads=HEADS, max_frames=4)
    features = torch.randn(2, 5, WIDTH)
    with pytest.raises(ValueError, match="max_frames=4"):
        head(features, torch.ones(2, 5, dtype=torch.bool))


def test_build_temporal_head_heads_from_width():
    head = build_temporal_head(ModelConfig(temporal_head="transformer", temporal_layers=2, max_frames=8), 128)
    assert isinstance(head, TransformerTemporalHead)
    assert head.blocks[0].self_attn.num_heads == 2 and len(head.blocks) == 2  # 128 // 64
    narrow = build_temporal_head(ModelConfig(temporal_head="transformer"), 32)
    assert narrow.blocks[0].self_attn.num_heads == 1  # at least one head
    assert isinstance(build_temporal_head(ModelConfig(temporal_head="mean"), 32), MeanTemporalHead)


@pytest.mark.parametrize("heads, message", [(3, "temporal_heads=3 must divide"), (-1, "temporal_heads=-1")])
def test_build_temporal_head_rejects_bad_heads(heads, message):
    with pytest.raises(ConfigError, match=message):
        build_temporal_head(ModelConfig(temporal_head="transformer", temporal_heads=heads), 32)


# --------------------------------------------------------------------------------------------
# adding a head is one registered definition: a max-pool head registered here only


class MaxPoolHead(torch.nn.Module):
    """Element-wise max over the valid frames (no parameters)."""

    def forward(self, frame_features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        return frame_features.masked_fill(~frame_mask.unsqueeze(-1), float("-inf")).amax(dim=1)


@pytest.fixture
def max_pool():
    register_temporal_head(TemporalHead("max-pool", lambda settings, width: MaxPoolHead()))
    yield
    TEMPORAL_HEADS.unregister("max-pool")


def reference_max_pool_video(model, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each frame through the image tower alone, then a loop max over the valid frames, normalised (float64)."""
    videos = []
    for clip, valid in zip(frames, mask):
        per_frame = [model.encode_image(clip[t:t + 1])[0].double() for t in range(len(valid)) if valid[t]]
        pooled = [max(values) for values in zip(*(row.tolist() for row in per_frame))]
        norm = math.sqrt(sum(value * value for value in pooled))
        videos.append([value / norm for value in pooled])
    return torch.tensor(videos, dtype=torch.float64)


def test_a_head_registered_in_a_test_runs_in_the_factory_built_dual_encoder(max_pool, make_model, random_frames):
    model = make_model(seed=4, temporal_head="max-pool").eval()
    assert isinstance(model.temporal, MaxPoolHead)
    frames = random_frames(3, 4, seed=5)
    mask = torch.tensor([[True, True, True, True], [True, False, False, False], [True, True, True, False]])
    with torch.no_grad():
        videos = model.encode_video(frames, mask)
        expected = reference_max_pool_video(model, frames, mask)
    torch.testing.assert_close(videos.double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(videos.double(), F.normalize(reference_mean(
        F.normalize(model.clip.encode_image(frames.flatten(0, 1)), dim=-1).view(3, 4, -1), mask), dim=-1), atol=1e-3)


def test_a_registered_head_is_saved_and_loaded_through_the_run_directory(max_pool, make_model, random_frames,
                                                                         tmp_path):
    model = make_model(seed=6, temporal_head="max-pool").eval()
    save_run(model, Config(output_dir=str(tmp_path / "out"), model=model.config), tmp_path / "run")
    restored = load_run(tmp_path / "run")
    assert isinstance(restored.temporal, MaxPoolHead) and restored.config.temporal_head == "max-pool"
    frames = random_frames(2, 3, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(restored.encode_video(frames), model.encode_video(frames))


def test_the_config_check_and_the_factory_look_heads_up_in_the_registry(max_pool):
    assert check_temporal_head(ModelConfig(temporal_head="max-pool", max_frames=2), frames=8) == []
    assert check_temporal_head(ModelConfig(temporal_head="transformer", max_frames=2), frames=8) == [
        "data.frames=8 exceeds model.max_frames=2"]
    assert check_temporal_head(ModelConfig(temporal_head="max_pool")) == [
        "model.temporal_head='max_pool' must be one of mean, transformer, max-pool"]
    ModelConfig(temporal_head="max-pool").validate()  # the model section's own check reads the registry
    Config(model=ModelConfig(temporal_head="max-pool", max_frames=2)).validate()  # max-pool has no frame limit
    with pytest.raises(ConfigError, match=r"data.frames=\d+ exceeds model.max_frames=2"):
        Config(model=ModelConfig(temporal_head="transformer", max_frames=2)).validate()
    TEMPORAL_HEADS.unregister("max-pool")
    with pytest.raises(ConfigError, match="model.temporal_head='max-pool' must be one of mean, transformer"):
        ModelConfig(temporal_head="max-pool").validate()
    with pytest.raises(ConfigError, match="unknown temporal head 'max-pool'; known: mean, transformer"):
        build_temporal_head(ModelConfig(temporal_head="max-pool"), WIDTH)


class GatedMaxHead(torch.nn.Module):
    """Max over the valid frames times a learned gate per feature: a registered head with parameters."""

    def __init__(self, width: int):
        super().__init__()
        self.gate = torch.nn.Parameter(torch.ones(width))

    def forward(self, frame_features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        return MaxPoolHead()(frame_features, frame_mask) * self.gate


def test_a_registered_head_with_parameters_is_exported_with_its_weights(make_model, random_frames, tmp_path):
    register_temporal_head(TemporalHead("gated-max", lambda settings, width: GatedMaxHead(width)))
    try:
        model = make_model(seed=8, temporal_head="gated-max").eval()
        with torch.no_grad():
            model.temporal.gate.copy_(torch.linspace(0.5, 2.0, model.embed_dim))
        save_run(model, Config(output_dir=str(tmp_path / "out"), model=model.config), tmp_path / "run")
        export_run(tmp_path / "run", tmp_path / "export")
        assert (tmp_path / "export" / "temporal_head.safetensors").is_file()
        assert "`gated-max` temporal head" in (tmp_path / "export" / "README.md").read_text()
        head = load_temporal_head(tmp_path / "export")
        features = F.normalize(torch.randn(2, 3, model.embed_dim, generator=torch.Generator().manual_seed(9)), dim=-1)
        mask = torch.tensor([[True, True, False], [True, True, True]])
        expected = features.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1) * torch.linspace(
            0.5, 2.0, model.embed_dim)
        with torch.no_grad():
            torch.testing.assert_close(head(features, mask), expected)
    finally:
        TEMPORAL_HEADS.unregister("gated-max")
