"""The processor saved with a converted model, and the preprocessing entry points scripts import.

The original pipeline lives in its own modules: ``converter.tokenizer`` (CLIP BPE),
``converter.frames`` (Resize + CenterCrop + Normalize, ``preprocess_video``) and ``converter.video``
(frame sampling and decoding). This module builds the transformers ``XCLIPProcessor`` that
``AutoProcessor.from_pretrained`` loads from a converted folder, and states how far its image
processor is from the original (``PROCESSOR_DEVIATION``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from converter.frames import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_frames,
    check_image_size,
    preprocess_video,
    resize_short_side,
)
from converter.tokenizer import CLIP_VOCAB_SIZE, MAX_TEXT_LENGTH, build_tokenizer, encode_texts
from converter.video import load_video, sample_frame_indices

if TYPE_CHECKING:
    import torch
    from transformers import VideoMAEImageProcessorPil, XCLIPProcessor

__all__ = [
    "CLIP_VOCAB_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_TEXT_LENGTH",
    "PROCESSOR_DEVIATION",
    "build_image_processor",
    "build_processor",
    "original_settings",
    "build_tokenizer",
    "encode_texts",
    "load_video",
    "preprocess_video",
    "processor_pixel_values",
    "resize_short_side",
    "sample_frame_indices",
]

# How far the saved processor (build_image_processor) is from the original, after normalisation, on
# the real photos of tests/data/preprocessing/reference.npz: {image size: (largest per-frame mean |Δ|,
# largest |Δ|)}. One uint8 level is about 0.0175. tests/test_processing.py re-measures these figures
# and fails when they are off; `python benchmarks/preprocessing.py` prints them with preprocess_video's.
PROCESSOR_DEVIATION: dict[int, tuple[float, float]] = {
    224: (0.0624, 1.33),
    336: (0.0468, 1.52),
}


def original_settings(image_size: int) -> dict:
    """The original's test-time preprocessing as VideoMAE image processor settings: short side
    ``int(256 / 224 * size)``, centre crop ``size``, ImageNet mean/std. Bilinear is, of PIL's filters,
    the closest to the original's OpenCV INTER_LINEAR (measured on the reference photos and ~50 crops);
    both size and crop_size, since given only a size VideoMAE still centre-crops to 224."""
    check_image_size(image_size)
    return {
        "do_resize": True,
        "size": {"shortest_edge": resize_short_side(image_size)},
        "resample": 2,  # PIL.Image.Resampling.BILINEAR
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }


def build_image_processor(image_size: int) -> VideoMAEImageProcessorPil:
    """VideoMAE image processor (pillow backend) with `original_settings`: the closest to the original
    that plain ``AutoProcessor`` loads, not equal to it (``PROCESSOR_DEVIATION``): PIL antialiases when
    shrinking and transformers truncates the long side.
    """
    # The Pil class directly: `VideoMAEImageProcessor` needs torchvision (which does not import beside
    # this torch build) and otherwise falls back to this class with a warning. Pillow also keeps
    # results identical whether or not torchvision happens to be installed.
    from transformers import VideoMAEImageProcessorPil

    return VideoMAEImageProcessorPil(**original_settings(image_size))


def build_processor(image_size: int) -> XCLIPProcessor:
    """``XCLIPProcessor`` (VideoMAE image processor + CLIP tokenizer) to save next to a converted model."""
    from transformers import XCLIPProcessor

    return XCLIPProcessor(image_processor=build_image_processor(image_size), tokenizer=build_tokenizer())


def processor_pixel_values(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """Pixel values ``[1, T, 3, S, S]`` as the saved processor computes them (what users of
    ``AutoProcessor`` get), for ``[T, H, W, 3]`` uint8 frames. ``preprocess_video`` is the original."""
    frames = check_frames(frames, "video frames")
    # channels_last stated explicitly: inference is ambiguous for frames with a side of 3 pixels.
    out = build_image_processor(image_size)(
        list(frames), return_tensors="pt", input_data_format="channels_last"
    )
    return out["pixel_values"]
