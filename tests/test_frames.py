"""preprocess_video against the ORIGINAL pipeline's exact output on real photos (tests/data/preprocessing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter.errors import ConverterError
from converter.processing import preprocess_video, resize_and_crop, resized_shape
from tests.preprocessing_data import (
    MEAN_255,
    ONE_LEVEL,
    SIZES,
    STD_255,
    crop_cases,
    deviation,
    original_output,
    reference_frames,
)

# The target: within one uint8 level everywhere, and rarely a level off (OpenCV's fixed-point
# arithmetic rounds some pixels the other way; torch computes in float).
MAX_ABS = ONE_LEVEL + 1e-6
MEAN_ABS = 0.003

REFERENCE = [pytest.param(name, size, id=f"{name}-{size}") for name in reference_frames() for size in SIZES]
CROPS = [pytest.param(*case, id=case[0]) for case in crop_cases()]


def check_against_original(frame: np.ndarray, size: int, original: np.ndarray) -> None:
    pixels = preprocess_video(frame[None], size)
    assert pixels.shape == (1, 1, 3, size, size) and pixels.dtype == torch.float32
    mean, worst = deviation(pixels[0, 0], original)
    assert worst <= MAX_ABS and mean <= MEAN_ABS, f"mean |Δ| {mean:.4f}, max |Δ| {worst:.4f}"
    # Before normalisation: whole uint8 values, none more than one level from the original's.
    crop = resize_and_crop(frame[None], size)[0].numpy()
    assert np.array_equal(crop, np.round(crop)) and crop.min() >= 0 and crop.max() <= 255
    assert np.abs(crop - original.transpose(2, 0, 1).astype(np.float32)).max() <= 1


@pytest.mark.parametrize(("name", "size"), REFERENCE)
def test_reproduces_the_original_on_every_reference_photo(name: str, size: int) -> None:
    check_against_original(reference_frames()[name], size, original_output(name, size))


@pytest.mark.parametrize(("name", "frame", "size", "original"), CROPS)
def test_reproduces_the_original_on_other_shapes(name: str, frame: np.ndarray, size: int, original) -> None:
    """Crops of the photos at common video sizes and odd ones (made by data/preprocessing/make_crops.py):
    nothing here was used to choose the method."""
    check_against_original(frame, size, original)


def test_whole_clip_at_once_equals_frame_by_frame() -> None:
    photo = reference_frames()["retina_crop_1280x720"]
    clip = np.stack([photo, photo[::-1], photo[:, ::-1]])
    pixels = preprocess_video(clip, 224)
    assert pixels.shape == (1, 3, 3, 224, 224)
    for t in range(3):
        assert torch.equal(pixels[0, t], preprocess_video(clip[t : t + 1], 224)[0, 0])


def test_no_resize_is_crop_and_normalise_exactly() -> None:
    """Short side already 256: the crop offsets, RGB order and statistics alone decide the output."""
    frame = np.random.default_rng(0).integers(0, 256, (256, 301, 3), dtype=np.uint8)
    left, top = (301 - 224) // 2, (256 - 224) // 2  # 38, 16
    want = (frame[top : top + 224, left : left + 224] - MEAN_255) / STD_255
    got = preprocess_video(frame[None], 224)[0, 0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("height", "width", "short", "expected"),
    [
        (720, 1280, 384, (384, 683)),  # 682.67: transformers truncates to 682
        (1280, 720, 384, (683, 384)),
        (427, 640, 256, (256, 384)),  # 383.70
        (240, 320, 256, (256, 341)),  # 341.33
        (500, 741, 256, (256, 379)),  # 379.39
        (128, 171, 384, (384, 513)),  # enlarging
        (512, 512, 256, (256, 256)),
    ],
)
def test_resized_shape_rounds_as_mmcv(height: int, width: int, short: int, expected) -> None:
    assert resized_shape(height, width, short) == expected


def test_tiny_frames_are_not_mistaken_for_channels() -> None:
    assert preprocess_video(np.zeros((1, 3, 5, 3), np.uint8), 224).shape == (1, 1, 3, 224, 224)


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (np.zeros((8, 32, 32), np.uint8), r"shape \(8, 32, 32\)"),
        (np.zeros((8, 32, 32, 4), np.uint8), r"shape \(8, 32, 32, 4\)"),
        (np.zeros((8, 32, 32, 3), np.float32), "dtype float32"),
        ([np.zeros((32, 32, 3), np.uint8)], "numpy array"),
    ],
)
def test_rejects_bad_frames(frames, match: str) -> None:
    with pytest.raises(ConverterError, match=match):
        preprocess_video(frames, 224)


@pytest.mark.parametrize("size", [0, -224, 224.0, True])
def test_rejects_bad_image_size(size) -> None:
    with pytest.raises(ConverterError, match="image size must be a positive integer"):
        preprocess_video(np.zeros((1, 8, 8, 3), np.uint8), size)
