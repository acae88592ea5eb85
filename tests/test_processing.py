"""converter.processing: the processor saved with a model, its stated deviation, the names scripts import."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from converter import processing as P
from tests.preprocessing_data import SIZES, measure


@pytest.fixture
def clip() -> np.ndarray:
    """Synthetic 8-frame 240x320 uint8 clip (smooth gradients + noise so the resampling filter matters)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    base = np.stack([xx * 255 / 319, yy * 255 / 239, (xx + yy) * 255 / 558], axis=-1)
    frames = [base + rng.normal(0, 20, base.shape) + 10 * t for t in range(8)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def test_names_other_modules_import() -> None:
    for name in (
        "sample_frame_indices",
        "preprocess_video",
        "load_video",
        "encode_texts",
        "build_tokenizer",
        "build_image_processor",
        "build_processor",
        "CLIP_VOCAB_SIZE",
        "MAX_TEXT_LENGTH",
        "IMAGENET_MEAN",
        "IMAGENET_STD",
        "resize_short_side",
        "PROCESSOR_DEVIATION",
    ):
        assert hasattr(P, name), name
    assert (P.CLIP_VOCAB_SIZE, P.MAX_TEXT_LENGTH) == (49408, 77)
    assert (P.resize_short_side(224), P.resize_short_side(336)) == (256, 384)


@pytest.mark.parametrize(("image_size", "short_side"), [(224, 256), (336, 384)])
def test_image_processor_config(image_size: int, short_side: int) -> None:
    ip = P.build_image_processor(image_size)
    assert type(ip).__name__ == "VideoMAEImageProcessorPil"
    assert tuple(ip.image_mean) == pytest.approx((0.485, 0.456, 0.406))
    assert tuple(ip.image_std) == pytest.approx((0.229, 0.224, 0.225))
    assert dict(ip.size)["shortest_edge"] == short_side
    assert dict(ip.crop_size)["height"] == dict(ip.crop_size)["width"] == image_size
    # The closest PIL filter to the original (benchmarks/preprocessing.py --filters measures them all).
    assert int(ip.resample) == int(Image.Resampling.BILINEAR)
    assert ip.rescale_factor == pytest.approx(1 / 255)
    assert ip.do_center_crop and ip.do_resize and ip.do_rescale and ip.do_normalize


@pytest.mark.parametrize("image_size", SIZES)
def test_stated_processor_deviation_is_measured(image_size: int) -> None:
    """PROCESSOR_DEVIATION (quoted in README and model cards) is what the processor does on the
    reference photos, to its three stated digits."""
    stated_mean, stated_max = P.PROCESSOR_DEVIATION[image_size]
    measured_mean, measured_max = measure(P.processor_pixel_values, image_size)
    assert (stated_mean, stated_max) == pytest.approx((measured_mean, measured_max), rel=5e-3), (
        f"measured mean |Δ| {measured_mean:.4f}, max |Δ| {measured_max:.4f}: update PROCESSOR_DEVIATION"
    )
    # And it is an approximation: the processor is worse than preprocess_video by far.
    assert measured_max > 10 * measure(P.preprocess_video, image_size)[1]


def test_processor_round_trip_offline(clip: np.ndarray, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoProcessor, XCLIPProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = ["eating spaghetti", "playing sports", "go shopping"]
    processor = P.build_processor(336)
    assert isinstance(processor, XCLIPProcessor)
    kwargs = {"padding": "max_length", "max_length": 77, "return_tensors": "pt"}
    before = processor(text=texts, videos=list(clip), **kwargs)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, XCLIPProcessor)
    assert len(loaded.tokenizer) == 49408
    after = loaded(text=texts, videos=list(clip), **kwargs)
    assert set(before) == set(after) == {"input_ids", "attention_mask", "pixel_values"}
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert after["pixel_values"].shape == (1, 8, 3, 336, 336)
    # What users get from AutoProcessor is processor_pixel_values; the tokenizer is encode_texts.
    assert torch.equal(after["input_ids"], P.encode_texts(texts))
    assert torch.equal(after["pixel_values"], P.processor_pixel_values(clip, 336))
    # ... and it differs from the original's preprocessing (only within PROCESSOR_DEVIATION's order).
    diff = (after["pixel_values"] - P.preprocess_video(clip, 336)).abs()
    assert 0 < diff.max() < 2 * P.PROCESSOR_DEVIATION[336][1]
