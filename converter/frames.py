"""The original X-CLIP's test-time frame preprocessing: Resize, CenterCrop, Normalize.

VideoX runs mmaction-style transforms on mmcv: ``Resize(scale=(-1, int(256 / 224 * S)))`` resizes the
short side with ``cv2.resize(INTER_LINEAR)`` (bilinear, half-pixel centres, no antialiasing) uint8 to
uint8, rounding each new side as ``int(side * factor + 0.5)``; ``CenterCrop(S)`` takes left
``(W - S) // 2``, top ``(H - S) // 2``; ``Normalize`` uses ImageNet statistics on 0-255 RGB.
This module reproduces that with torch alone: within one uint8 level of OpenCV, whose fixed-point
arithmetic rounds a few pixels the other way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from converter.errors import ConverterError

if TYPE_CHECKING:
    import torch

# ImageNet statistics as fractions of 1 (transformers' processor) ...
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ... and as the original states them, on 0-255 (VideoX datasets/build.py, img_norm_cfg).
ORIGINAL_MEAN_255 = (123.675, 116.28, 103.53)
ORIGINAL_STD_255 = (58.395, 57.12, 57.375)


def resize_short_side(image_size: int) -> int:
    """Short-side length the original resizes to before centre-cropping ``image_size``."""
    return int(256 / 224 * image_size)


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """``(new_height, new_width)`` with the short side at ``short_side``, as mmcv's ``rescale_size``.

    Both sides are rounded (``int(side * factor + 0.5)``): transformers truncates the long side, which
    gives 682 instead of 683 for a 16:9 frame at 336 px.
    """
    factor = short_side / min(height, width)
    return int(height * factor + 0.5), int(width * factor + 0.5)


def check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ConverterError(f"image size must be a positive integer (224 or 336), got {image_size!r}")


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
    check_image_size(image_size)
    height, width = frames.shape[1:3]
    new_h, new_w = resized_shape(height, width, resize_short_side(image_size))
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    out = []
    for frame in frames:  # one frame at a time: a 32-frame HD clip would need 350 MB as float at once
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
        # Plain bilinear with half-pixel centres, no antialiasing: what cv2.INTER_LINEAR computes.
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
        x = x[0, :, top : top + image_size, left : left + image_size]
        # cv2 returns uint8 rounded half up (its fixed-point result); the crop only discards pixels.
        out.append(torch.floor(x + 0.5).clamp_(0, 255))
    return torch.stack(out)


def preprocess_video(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """Pixel values ``[1, T, 3, S, S]`` (float32) for ``[T, H, W, 3]`` uint8 RGB frames, as the original.

    Within one uint8 level (about 0.0175 after normalisation) of the original pipeline; transformers'
    processor saved with a model only approximates it (see ``converter.processing.PROCESSOR_DEVIATION``).
    """
    import torch

    pixels = resize_and_crop(frames, image_size)
    mean = torch.tensor(ORIGINAL_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(ORIGINAL_STD_255).view(1, 3, 1, 1)
    return ((pixels - mean) / std)[None]
