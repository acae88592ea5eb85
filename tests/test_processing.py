"""Offline tests of converter.processing: tokenizer, image processor, processor round trip, clips."""

from __future__ import annotations

import builtins
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from converter import processing as P
from converter.errors import ConverterError


@pytest.fixture
def clip() -> np.ndarray:
    """Synthetic 8-frame 240x320 uint8 clip (smooth gradients + noise so the resampling filter matters)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    base = np.stack([xx * 255 / 319, yy * 255 / 239, (xx + yy) * 255 / 558], axis=-1)
    frames = [base + rng.normal(0, 20, base.shape) + 10 * t for t in range(8)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- tokenizer


def test_packaged_bpe_vocab_and_licence_exist() -> None:
    path = P.bpe_vocab_path()
    assert path.is_file()
    licence = path.with_name("LICENSE-CLIP.txt").read_text()
    assert "MIT License" in licence and "OpenAI" in licence


def test_bpe_vocab_and_merges_counts() -> None:
    vocab, merges = P.load_clip_bpe()
    assert len(vocab) == 49408
    assert len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_tokenizer_ids_are_stable() -> None:
    tokenizer = P.build_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer("eating spaghetti").input_ids == [49406, 4371, 18440, 49407]
    assert tokenizer("playing sports").input_ids == [49406, 1629, 2054, 49407]
    assert tokenizer("go shopping").input_ids == [49406, 861, 4266, 49407]
    # Case, whitespace and punctuation handled like OpenAI's SimpleTokenizer.
    assert tokenizer("Hello,  World!").input_ids == tokenizer("hello, world!").input_ids
    assert P.build_tokenizer() is tokenizer  # cached


def test_encode_texts_pads_to_77() -> None:
    ids = P.encode_texts(["eating spaghetti", "playing sports", "go shopping"])
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert ids[0, :4].tolist() == [49406, 4371, 18440, 49407]
    assert (ids[:, 4:] == 49407).all()  # padded with <|endoftext|>
    # The model pools at the first end-of-text token (argmax finds the first 49407).
    assert ids.argmax(-1).tolist() == [3, 3, 3]


@pytest.mark.parametrize("bad", [[], "eating spaghetti", [1, 2]])
def test_encode_texts_rejects_non_lists(bad: object) -> None:
    with pytest.raises(ConverterError, match="non-empty list of strings"):
        P.encode_texts(bad)  # type: ignore[arg-type]


def test_encode_texts_rejects_overlong_text() -> None:
    with pytest.raises(ConverterError, match="tokens long"):
        P.encode_texts(["word " * 100])


# --------------------------------------------------------------------------- image processor


@pytest.mark.parametrize(("image_size", "short_side"), [(224, 256), (336, 384)])
def test_image_processor_config(image_size: int, short_side: int) -> None:
    ip = P.build_image_processor(image_size)
    assert type(ip).__name__ == "VideoMAEImageProcessorPil"
    assert tuple(ip.image_mean) == pytest.approx((0.485, 0.456, 0.406))
    assert tuple(ip.image_std) == pytest.approx((0.229, 0.224, 0.225))
    assert dict(ip.size)["shortest_edge"] == short_side
    assert dict(ip.crop_size)["height"] == dict(ip.crop_size)["width"] == image_size
    assert int(ip.resample) == int(Image.Resampling.BILINEAR)
    assert ip.rescale_factor == pytest.approx(1 / 255)
    assert ip.do_center_crop and ip.do_resize and ip.do_rescale and ip.do_normalize


def _reference(frames: np.ndarray, image_size: int) -> np.ndarray:
    """Independent PIL/numpy version of the original preprocessing: [T, 3, S, S] float32."""
    short = int(256 / 224 * image_size)
    out = []
    for frame in frames:
        h, w = frame.shape[:2]
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = Image.fromarray(frame).resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
        x = np.asarray(img, dtype=np.float64) / 255.0
        x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        out.append(x.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("image_size", [224, 336])
def test_preprocess_video_matches_reference(clip: np.ndarray, image_size: int) -> None:
    pixels = P.preprocess_video(clip, image_size)
    assert pixels.shape == (1, 8, 3, image_size, image_size)
    assert pixels.dtype == torch.float32
    np.testing.assert_allclose(pixels[0].numpy(), _reference(clip, image_size), atol=1e-5, rtol=0)


def test_preprocess_video_portrait_and_tiny_frames() -> None:
    rng = np.random.default_rng(1)
    portrait = rng.integers(0, 256, (2, 300, 200, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        P.preprocess_video(portrait, 224)[0].numpy(), _reference(portrait, 224), atol=1e-5
    )
    # A side of 3 pixels must not be mistaken for the channel axis.
    assert P.preprocess_video(np.zeros((1, 3, 5, 3), np.uint8), 224).shape == (1, 1, 3, 224, 224)


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (np.zeros((8, 32, 32), np.uint8), r"shape \(8, 32, 32\)"),
        (np.zeros((8, 32, 32, 4), np.uint8), r"shape \(8, 32, 32, 4\)"),
        (np.zeros((8, 32, 32, 3), np.float32), "dtype float32"),
    ],
)
def test_preprocess_video_rejects_bad_frames(frames: np.ndarray, match: str) -> None:
    with pytest.raises(ConverterError, match=match):
        P.preprocess_video(frames, 224)


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
    # The processor and the helpers agree.
    assert torch.equal(after["input_ids"], P.encode_texts(texts))
    assert torch.equal(after["pixel_values"], P.preprocess_video(clip, 336))


# --------------------------------------------------------------------------- clips


def test_load_video_npy_samples_evenly(tmp_path) -> None:
    frames = np.arange(32, dtype=np.uint8)[:, None, None, None] * np.ones((1, 6, 7, 3), np.uint8)
    path = tmp_path / "clip.npy"
    np.save(path, frames)
    out = P.load_video(path, 8)
    assert out.shape == (8, 6, 7, 3) and out.dtype == np.uint8
    picked = out[:, 0, 0, 0].tolist()
    assert picked == np.linspace(0, 31, 8).round().astype(int).tolist() == [0, 4, 9, 13, 18, 22, 27, 31]
    assert np.ptp(np.diff(picked)) <= 1  # evenly spaced
    assert P.load_video(path, 32) is not None and np.array_equal(P.load_video(path, 32), frames)


def test_load_video_npy_bad_shape_names_file_and_shape(tmp_path) -> None:
    path = tmp_path / "bad_clip.npy"
    np.save(path, np.zeros((8, 32, 32), np.uint8))
    with pytest.raises(ConverterError, match=r"bad_clip\.npy.*\(8, 32, 32\)"):
        P.load_video(path, 8)


def test_load_video_npy_bad_dtype_and_missing_file(tmp_path) -> None:
    path = tmp_path / "float_clip.npy"
    np.save(path, np.zeros((8, 4, 4, 3), np.float32))
    with pytest.raises(ConverterError, match=r"float_clip\.npy.*float32"):
        P.load_video(path, 8)
    with pytest.raises(ConverterError, match="does not exist"):
        P.load_video(tmp_path / "missing.npy", 8)


def test_load_video_without_pyav_says_what_to_install(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av" or name.startswith("av."):
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "av", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(ConverterError, match=r'pip install "xclip-converter\[video\]"'):
        P.load_video(tmp_path / "clip.mp4", 8)


def test_load_video_with_pyav(tmp_path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mkv"  # Matroska usually declares no frame count: exercises the counting pass
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 12, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = P.load_video(path, 8)
    assert out.shape == (8, 48, 64, 3) and out.dtype == np.uint8
    expected = P.sample_frame_indices(20, 8) * 12
    np.testing.assert_allclose(out.reshape(8, -1).mean(1), expected, atol=8)  # lossy codec


def test_spaghetti_filenames() -> None:
    assert P.spaghetti_clip_filename(8) == "eating_spaghetti_8_frames.npy"
    assert P.spaghetti_clip_filename(16) == "eating_spaghetti.npy"
    assert P.spaghetti_clip_filename(32) == "eating_spaghetti_32_frames.npy"
    with pytest.raises(ConverterError, match="available frame counts"):
        P.spaghetti_clip_filename(12)


def test_hub_reachable_honours_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    assert P.hub_reachable() is False
    assert time.monotonic() - start < 0.5


def test_spaghetti_unreachable_hub_fails_fast(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(P, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # huggingface_hub reads HF_HOME at import time: point its already-imported cache there too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(
        ConverterError, match=r"spaghetti clip eating_spaghetti\.npy not in the local HF cache"
    ):
        P.load_spaghetti_clip(16)
    assert time.monotonic() - start < 5


def test_spaghetti_from_local_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clip already in the cache loads without the network (fake cache entry)."""
    monkeypatch.setattr(P, "hub_reachable", lambda timeout=3.0: False)
    frames = np.zeros((8, 4, 4, 3), np.uint8)
    repo_dir = tmp_path / "datasets--hf-internal-testing--spaghetti-video"
    commit = "0" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    np.save(snapshot / "eating_spaghetti_8_frames.npy", frames)
    assert np.array_equal(P.load_spaghetti_clip(8, cache_dir=tmp_path), frames)
    with pytest.raises(ConverterError, match="eating_spaghetti_32_frames.npy not in the local HF cache"):
        P.load_spaghetti_clip(32, cache_dir=tmp_path)
