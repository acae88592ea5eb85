"""The original's test-time Resize and CenterCrop with torch alone, to one uint8 level of its OpenCV
(``cv2.resize(INTER_LINEAR)``: bilinear, half-pixel centres, no antialiasing, uint8 to uint8, whose
fixed-point arithmetic rounds a few pixels the other way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from converter.errors import ConverterError

if TYPE_CHECKING:
    import torch


def resize_short_side(image_size: int) -> int:
    """Short-side length the original resizes to before centre-cropping ``image_size``."""
    return int(256 / 224 * image_size)


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """``(new_height, new_width)`` as mmcv's ``rescale_size``: both sides rounded, where transformers
    truncates the long side (682 instead of 683 for a 16:9 frame at 336 px)."""
    factor = short_side / min(height, width)
    return int(height * factor + 0.5), int(width * factor + 0.5)


def check_positive_int(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConverterError(f"{what} must be a positive integer, got {value!r}")


def check_frames(frames: object, source: str) -> np.ndarray:
    """Validate a clip as ``[T, H, W, 3]`` uint8, naming ``source`` in the error."""
    if not isinstance(frames, np.ndarray):
        raise ConverterError(f"{source}: expected a numpy array of frames, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) == 0:
        raise ConverterError(
            f"{source}: expected frames of shape [T, H, W, 3] (RGB, T >= 1), got shape {tuple(frames.shape)}"
        )
    if frames.dtype != np.uint8:
        raise ConverterError(
            f"{source}: expected uint8 pixels (0-255), got dtype {frames.dtype} "
            f"with shape {tuple(frames.shape)}; convert the frames to uint8 first."
        )
    return frames


def resize_and_crop(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """The original's Resize + CenterCrop: ``[T, 3, S, S]`` float32 holding whole numbers 0-255."""
    import torch
    import torch.nn.functional as F

    frames = check_frames(frames, "video frames")
    check_positive_int(image_size, "image size")
    new_h, new_w = resized_shape(*frames.shape[1:3], resize_short_side(image_size))
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    out = []
    for frame in frames:  # one frame at a time: a 32-frame HD clip would need 350 MB as float at once
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
        x = x[0, :, top : top + image_size, left : left + image_size]
        # cv2 returns uint8 rounded half up (its fixed-point result); the crop only discards pixels.
        out.append(torch.floor(x + 0.5).clamp_(0, 255))
    return torch.stack(out)
