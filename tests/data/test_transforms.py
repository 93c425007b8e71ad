"""Frame sampling and preprocessing against independent computations (exact fractions, open_clip's PIL transform)."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from mmsphere.data.transforms import resize_center_crop, sample_frame_indices, to_model_frames

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("num_frames,frames", [(12, 8), (6, 3), (100, 8), (9, 9), (300, 16), (2, 1), (41, 5)])
def test_uniform_indices_are_linspace_rounded_half_up(num_frames, frames):
    if num_frames <= frames:
        expected = list(range(num_frames))
    elif frames == 1:
        expected = [0]
    else:
        expected = []
        for step in range(frames):
            exact = Fraction(step * (num_frames - 1), frames - 1)
            expected.append(int(exact + Fraction(1, 2)))  # half up, exactly
    assert sample_frame_indices(num_frames, frames) == expected
    if frames > 1 and num_frames > frames:
        assert expected[0] == 0 and expected[-1] == num_frames - 1


def test_short_clip_gives_every_frame():
    assert sample_frame_indices(3, 8) == [0, 1, 2]
    assert sample_frame_indices(3, 8, random_offset=True, rng=np.random.default_rng(0)) == [0, 1, 2]


def test_random_offset_draws_one_frame_inside_each_segment():
    num_frames, frames = 50, 8
    seen = set()
    for seed in range(20):
        indices = sample_frame_indices(num_frames, frames, random_offset=True, rng=np.random.default_rng(seed))
        for segment, index in enumerate(indices):
            low, high = (segment * num_frames) // frames, ((segment + 1) * num_frames) // frames
            assert low <= index < high
        seen.add(tuple(indices))
    assert len(seen) > 1  # it is random
    again = sample_frame_indices(num_frames, frames, random_offset=True, rng=np.random.default_rng(3))
    assert again == sample_frame_indices(num_frames, frames, random_offset=True, rng=np.random.default_rng(3))


@pytest.mark.parametrize("num_frames,frames,match", [(0, 8, "num_frames"), (5, 0, "frames")])
def test_bad_frame_counts_raise(num_frames, frames, match):
    with pytest.raises(ValueError, match=match):
        sample_frame_indices(num_frames, frames)


def test_random_offset_needs_rng():
    with pytest.raises(ValueError, match="rng"):
        sample_frame_indices(40, 8, random_offset=True)


@pytest.mark.parametrize("width,height", [(40, 30), (30, 50), (37, 23), (16, 12), (32, 32), (97, 32)])
def test_preprocessing_matches_open_clip_within_one_grey_level(width, height):
    rng = np.random.default_rng(width * height)
    pixels = np.asarray(
        Image.fromarray(rng.integers(0, 256, (max(2, height // 4), max(2, width // 4), 3), dtype=np.uint8)).resize(
            (width, height), Image.BILINEAR
        )
    )
    reference = image_transform(32, is_train=False, mean=MEAN, std=STD)(Image.fromarray(pixels))
    ours, mask = to_model_frames(pixels[None], num_frames=1, image_size=32, mean=MEAN, std=STD)
    assert ours.shape == (1, 3, 32, 32) and mask.tolist() == [True]
    one_grey_level = 1.0 / 255.0 / min(STD)
    assert (ours[0] - reference).abs().max().item() <= one_grey_level * 1.01


def test_resize_center_crop_keeps_the_centre():
    frame = torch.zeros(1, 3, 20, 60, dtype=torch.uint8)
    frame[..., 20:40] = 255  # the middle third of a wide frame
    cropped = resize_center_crop(frame, 20)
    assert cropped.shape == (1, 3, 20, 20)
    assert (cropped == 255).all()


def test_to_model_frames_pads_and_masks_short_clips():
    frames = np.stack([np.full((24, 40, 3), value, dtype=np.uint8) for value in (0, 128, 255)])
    output, mask = to_model_frames(frames, num_frames=5, image_size=16, mean=MEAN, std=STD)
    assert output.shape == (5, 3, 16, 16) and output.dtype == torch.float32
    assert mask.tolist() == [True, True, True, False, False]
    assert (output[3:] == 0).all()
    expected = (255 / 255.0 - MEAN[1]) / STD[1]
    assert torch.allclose(output[2, 1], torch.full((16, 16), expected), atol=1e-6)


def test_to_model_frames_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        to_model_frames(np.zeros((2, 8, 8, 3), dtype=np.float32), num_frames=2, image_size=8, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="3 frames for num_frames=2"):
        to_model_frames(np.zeros((3, 8, 8, 3), dtype=np.uint8), num_frames=2, image_size=8, mean=MEAN, std=STD)
