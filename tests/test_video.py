"""Frame sampling (the original's test mode) and clip loading (.npy, PyAV): converter/processing.py."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import numpy as np
import pytest

from converter.errors import ConverterError
from converter.processing import load_video, sample_frame_indices


def numbered_clip(n: int, height: int = 6, width: int = 7) -> np.ndarray:
    """n frames whose pixels all hold the frame's index."""
    return np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, height, width, 3), np.uint8)


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("num_frames", [8, 16, 32])
def test_sampling_is_the_originals_formula(num_frames: int) -> None:
    t = num_frames
    for n in range(1, 1001):
        want = [int(i * n / t + n / (2 * t)) % n for i in range(t)]
        assert sample_frame_indices(n, t).tolist() == want, n


def test_sampling_takes_segment_centres() -> None:
    # The example: N=300, T=8 (an even spread with both ends would be 0, 43, ..., 299).
    assert sample_frame_indices(300, 8).tolist() == [18, 56, 93, 131, 168, 206, 243, 281]
    assert sample_frame_indices(8, 8).tolist() == list(range(8))
    assert sample_frame_indices(3, 8).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # short clips repeat frames
    assert sample_frame_indices(1, 32).tolist() == [0] * 32


@pytest.mark.parametrize(
    ("total", "num_frames", "match"),
    [(0, 8, "at least one frame"), (-3, 8, "at least one frame"), (10, 0, "positive integer")],
)
def test_sampling_rejects_empty_clips(total: int, num_frames: int, match: str) -> None:
    with pytest.raises(ConverterError, match=match):
        sample_frame_indices(total, num_frames)


# --------------------------------------------------------------------------- .npy clips


def test_npy_clip_is_sampled_like_the_original(tmp_path: Path) -> None:
    path = tmp_path / "clip.npy"
    np.save(path, numbered_clip(32))
    out = load_video(path, 8)
    assert out.shape == (8, 6, 7, 3) and out.dtype == np.uint8
    assert out[:, 0, 0, 0].tolist() == [2, 6, 10, 14, 18, 22, 26, 30]
    assert np.array_equal(load_video(path, 32), numbered_clip(32))
    np.save(path, numbered_clip(5))
    assert load_video(path, 8)[:, 0, 0, 0].tolist() == [0, 0, 1, 2, 2, 3, 4, 4]


def test_npy_bad_shape_names_file_and_shape(tmp_path: Path) -> None:
    path = tmp_path / "bad_clip.npy"
    np.save(path, np.zeros((8, 32, 32), np.uint8))
    with pytest.raises(ConverterError, match=r"bad_clip\.npy.*\(8, 32, 32\)"):
        load_video(path, 8)


def test_npy_bad_dtype_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "float_clip.npy"
    np.save(path, np.zeros((8, 4, 4, 3), np.float32))
    with pytest.raises(ConverterError, match=r"float_clip\.npy.*float32"):
        load_video(path, 8)
    with pytest.raises(ConverterError, match="does not exist"):
        load_video(tmp_path / "missing.npy", 8)


def test_npy_pickles_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConverterError, match=r"objects\.npy"):
        load_video(path, 8)


def sparse_clip(path: Path, shape: tuple[int, int, int, int]) -> Path:
    """A uint8 .npy clip of `shape` whose frames take no disk space (a sparse file of zeros)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        f.truncate(f.tell() + int(np.prod(shape)))
    return path


def test_an_npy_clip_larger_than_memory_is_read_where_frames_are_taken(tmp_path: Path) -> None:
    """An 8.7 GB clip read in a process that may allocate 2 GiB: only the sampled frames are read, from
    the mapped file."""
    import os
    import subprocess
    import sys

    path = sparse_clip(tmp_path / "long.npy", (1400, 1080, 1920, 3))
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30)); "
        "from converter.processing import load_video; print(load_video(sys.argv[1], 8).shape)"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # their buffers count too
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout) == (0, "(8, 1080, 1920, 3)\n"), done.stderr[-500:]


def test_frames_too_large_to_read_are_refused_by_name(tmp_path: Path) -> None:
    path = sparse_clip(tmp_path / "huge.npy", (2, 16_385, 20_000, 3))  # one frame: 983 MB
    with pytest.raises(
        ConverterError, match=r"^.*huge.npy: frames of 20000x16385 pixels, more than the 16384 a"
    ):
        load_video(path, 8)


@pytest.mark.parametrize("shape", [(1, 1, 16_384, 3), (1, 100, 1, 3)])
def test_frames_too_thin_to_resize_are_refused_by_name(tmp_path: Path, shape: tuple[int, ...]) -> None:
    """Their short side resized to 256, a 1x16384 frame would be 4M pixels long: 12 GB as float."""
    np.save(tmp_path / "thin.npy", np.zeros(shape, np.uint8))
    with pytest.raises(
        ConverterError, match=r"thin\.npy: frames of \d+x\d+ pixels, one side more than 16 times"
    ):
        load_video(tmp_path / "thin.npy", 8)


@pytest.mark.parametrize("num_frames", [0, -1, 8.0, True])
def test_bad_frame_count(tmp_path: Path, num_frames) -> None:
    with pytest.raises(ConverterError, match="number of frames must be a positive integer"):
        load_video(tmp_path / "clip.npy", num_frames)


# --------------------------------------------------------------------------- video files (PyAV)


def test_without_pyav_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av" or name.startswith("av."):
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "av", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(ConverterError, match=r'pip install "xclip-converter\[video\]"'):
        load_video(tmp_path / "clip.mp4", 8)


STEP = 6  # grey level between consecutive frames; at a high bit rate flat frames decode within ~1


def write_video(path: Path, frames: int) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.bit_rate = 10_000_000
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * STEP, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_numbers(frames: np.ndarray) -> list[int]:
    return np.round(frames.reshape(len(frames), -1).mean(1) / STEP).astype(int).tolist()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the frames PyAV decodes (not merely demuxes), across every container opened."""
    av = pytest.importorskip("av")
    real_open = av.open
    count: list[int] = []

    class Counting:
        def __init__(self, container):
            self._container = container

        def __enter__(self):
            self._container.__enter__()
            return self

        def __exit__(self, *exc):
            return self._container.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self._container, name)

        def decode(self, *args, **kwargs):
            for frame in self._container.decode(*args, **kwargs):
                count.append(1)
                yield frame

    monkeypatch.setattr(av, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    return count


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])  # mp4 states the frame count; Matroska does not
def test_video_file_is_sampled_like_the_original_and_decoded_only_as_far_as_needed(
    tmp_path: Path, suffix: str, decoded: list[int]
) -> None:
    path = tmp_path / f"clip{suffix}"
    write_video(path, 40)
    out = load_video(path, 8)
    assert out.shape == (8, 48, 64, 3) and out.dtype == np.uint8
    assert frame_numbers(out) == sample_frame_indices(40, 8).tolist() == [2, 7, 12, 17, 22, 27, 32, 37]
    assert len(decoded) == 38  # up to frame 37, not the 40 of the clip


def test_overstated_frame_count_is_resampled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decoded: list[int]
) -> None:
    """A container claiming more frames than decode: sample from the frames that exist."""
    from converter import processing

    path = tmp_path / "clip.mp4"
    write_video(path, 20)
    monkeypatch.setattr(processing, "_count_frames", lambda av, p: 50)
    assert frame_numbers(load_video(path, 8)) == sample_frame_indices(20, 8).tolist()


def test_undecodable_video_names_the_file(tmp_path: Path) -> None:
    pytest.importorskip("av")
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"not a video at all" * 100)
    with pytest.raises(ConverterError, match=r"broken\.mp4"):
        load_video(path, 8)


def test_video_file_with_frames_too_large_is_refused_at_the_first_one(
    tmp_path: Path, decoded: list[int]
) -> None:
    """Not after T of them are held as RGB: at 16,384 px a side that is 768 MiB a frame."""
    import av

    path = tmp_path / "wide.mkv"
    with av.open(str(path), "w") as container:  # FFV1: lossless, and small for flat frames of any size
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16_400, 16, "yuv420p"
        for _ in range(4):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16_400, 3), np.uint8))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(ConverterError, match=r"wide\.mkv: frames of 16400x16 pixels, more than the 16384"):
        load_video(path, 8)
    assert len(decoded) == 1


# --------------------------------------------------------------------------- size limits, at the boundary


def flat_frames(height: int, width: int) -> np.ndarray:
    """One uint8 frame of any size that takes no memory (a broadcast view of one pixel)."""
    return np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (1, height, width, 3))


def test_frame_side_limit_is_16384_pixels_exactly() -> None:
    from converter.processing import check_frames

    assert check_frames(flat_frames(16_384, 16_384), "clip").shape == (1, 16_384, 16_384, 3)
    with pytest.raises(ConverterError, match=r"clip: frames of 16384x16385 pixels, more than the 16384"):
        check_frames(flat_frames(16_385, 16_384), "clip")


def test_aspect_ratio_limit_is_16_to_1_exactly() -> None:
    from converter.processing import check_frames

    assert check_frames(flat_frames(1, 16), "clip").shape == (1, 1, 16, 3)
    assert check_frames(flat_frames(16, 1), "clip").shape == (1, 16, 1, 3)
    for height, width in ((1, 17), (17, 1)):
        with pytest.raises(ConverterError, match=r"one side more than 16 times the other"):
            check_frames(flat_frames(height, width), "clip")


@pytest.mark.parametrize("shape", [(0, 6, 7, 3), (4, 0, 7, 3), (4, 6, 0, 3)])
def test_npy_clip_with_an_empty_axis_is_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    np.save(tmp_path / "empty.npy", np.zeros(shape, np.uint8))
    with pytest.raises(ConverterError, match=r"empty\.npy: expected frames of shape \[T, H, W, 3\]"):
        load_video(tmp_path / "empty.npy", 8)
