"""The collate makes one typed Batch: its media layout, encoder inputs and group ids are decided there, once."""

from __future__ import annotations

import hashlib

import pytest
import torch

from mmsphere.data import Batch
from mmsphere.data.batching import collate_eval, collate_train, resolve_group_ids
from mmsphere.data.cached import CachedSample
from mmsphere.data.samples import Sample
from mmsphere.errors import MmsphereError

SIZE = 8


def _sample(key: str, modality: str, group: str, frames: int = 3, seed: int = 0) -> Sample:
    generator = torch.Generator().manual_seed(seed)
    count = frames if modality == "video" else 1
    pixels = torch.randn(count, 3, SIZE, SIZE, generator=generator)
    mask = torch.ones(count, dtype=torch.bool)
    return Sample(key, modality, pixels, mask, [f"caption of {key}", f"another of {key}"], count,
                  list(range(count)), "test", group)


def _tokenizer(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[len(caption), sum(map(ord, caption)) % 97] for caption in captions])


def _collate(samples, positives="diagonal", modality="image", source="photos"):
    captions = [sample.captions[0] for sample in samples]
    return collate_train(samples, captions, [0] * len(samples), source=source, modality=modality,
                         tokenizer=_tokenizer, skipped={}, positives=positives)


def _blake_id(name: str) -> int:
    """The documented stable id of a group name: BLAKE2b-64, little endian, top bit dropped (written out here)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def test_group_positives_become_ids_equal_exactly_for_samples_of_one_group():
    groups = ["cat", "dog", "cat", "k3", "dog"]
    samples = [_sample(f"k{index}", "image", group, seed=index) for index, group in enumerate(groups)]
    batch = _collate(samples, positives="group")
    ids = batch.group_ids.tolist()
    assert [[a == b for b in ids] for a in ids] == [[a == b for b in groups] for a in groups]
    assert ids == [_blake_id(group) for group in groups]  # stable across processes, unlike hash()
    assert batch.groups == groups and batch.keys == [f"k{index}" for index in range(5)]


def test_diagonal_positives_carry_no_group_ids():
    samples = [_sample(f"k{index}", "image", "cat", seed=index) for index in range(3)]
    assert _collate(samples).group_ids is None
    assert resolve_group_ids("diagonal", ["a", "a"], ["k0", "k1"], "photos") is None


def test_group_positives_without_groups_name_the_source():
    samples = [_sample(f"k{index}", "image", f"k{index}", seed=index) for index in range(3)]  # group = key
    with pytest.raises(MmsphereError, match="samples of data source 'photos' carry no group ids"):
        _collate(samples, positives="group")
    with pytest.raises(ValueError, match="positives='nearest'"):
        resolve_group_ids("nearest", ["a"], ["k"], "photos")


def test_image_batches_hold_images_and_video_batches_frames_with_their_mask():
    images = [_sample(f"i{index}", "image", "g", seed=index) for index in range(2)]
    batch = _collate(images)
    assert batch.media.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(batch.media[1], images[1].frames[0], rtol=0, atol=0)
    inputs = batch.encoder_inputs()
    assert set(inputs) == {"text", "images"} and inputs["images"] is batch.media
    assert torch.equal(inputs["text"], _tokenizer([sample.captions[0] for sample in images]))

    clips = [_sample(f"v{index}", "video", "g", seed=index) for index in range(2)]
    clips[0].frame_mask[2] = False
    batch = _collate(clips, modality="video", source="clips")
    assert batch.media.shape == (2, 3, 3, SIZE, SIZE) and batch.source == "clips"
    inputs = batch.encoder_inputs()
    assert set(inputs) == {"text", "frames", "frame_mask"}
    assert inputs["frame_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch.valid.tolist() == [True, True]


def test_cached_batches_hold_trunks_and_the_drawn_captions_text_trunk():
    trunks = [torch.full((4,), float(index)) for index in range(2)]
    caption_trunks = [torch.arange(6, dtype=torch.float32).view(2, 3) + 10 * index for index in range(2)]
    samples = [CachedSample(f"c{index}", "image", trunks[index], torch.ones(1, dtype=torch.bool),
                            ["first", "second"], caption_trunks[index], "g") for index in range(2)]
    batch = collate_train(samples, ["second", "first"], [1, 0], source="cached", modality="image",
                          tokenizer=_tokenizer, skipped={})
    assert batch.cached and batch.text is None
    inputs = batch.encoder_inputs()
    assert set(inputs) == {"image_trunk", "text_trunk"}
    assert torch.equal(inputs["image_trunk"], torch.stack(trunks))
    assert torch.equal(inputs["text_trunk"], torch.stack([caption_trunks[0][1], caption_trunks[1][0]]))
    evaluation = collate_eval(samples, modality="image", skipped={})
    assert set(evaluation.media_inputs()) == {"image_trunk"} and len(evaluation.caption_trunk) == 2
    with pytest.raises(ValueError, match="no encoder inputs"):
        evaluation.encoder_inputs()


def test_to_moves_every_tensor_and_keeps_the_fields():
    samples = [_sample(f"k{index}", "video", "cat" if index else "dog", seed=index) for index in range(2)]
    batch = _collate(samples, positives="group", modality="video")
    moved = batch.to("meta")
    assert all(tensor.device.type == "meta"
               for tensor in (moved.media, moved.frame_mask, moved.text, moved.group_ids, moved.valid))
    assert moved.keys == batch.keys and moved.modality == "video" and batch.media.device.type == "cpu"


def test_a_batch_made_by_hand_fills_its_mask_keys_and_validity():
    batch = Batch("video", torch.zeros(3, 2, 3, SIZE, SIZE), text=torch.zeros(3, 4, dtype=torch.long))
    assert batch.frame_mask.shape == (3, 2) and batch.frame_mask.all()
    assert batch.keys == ["0", "1", "2"] and len(batch) == 3
    with pytest.raises(ValueError, match="modality='audio'"):
        Batch("audio", torch.zeros(1, 3))
