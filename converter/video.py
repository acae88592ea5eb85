"""Clips for ``--video``: a ``.npy`` array of frames or a video file (PyAV), sampled as the original tests.

The original's test-time ``SampleFrames(clip_len=1, frame_interval=1, num_clips=T, test_mode=True)``
takes the centre frame of each of T equal segments of the clip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converter.errors import ConverterError
from converter.frames import check_frames

_VIDEO_EXTRA_HINT = 'pip install "xclip-converter[video]"'


def sample_frame_indices(total: int, num_frames: int) -> np.ndarray:
    """Indices of the ``num_frames`` frames the original samples from a clip of ``total`` frames.

    ``int(i * N/T + N/(2T)) % N`` for i in 0..T-1 (mmaction's ``_get_test_clips``, same float order):
    the centre of each of T equal segments. A clip shorter than T repeats frames.
    """
    if isinstance(total, bool) or not isinstance(total, int | np.integer) or total < 1:
        raise ConverterError(f"a clip needs at least one frame to sample from, got {total!r} frames")
    _check_num_frames(num_frames)
    interval = total / float(num_frames)
    offsets = (np.arange(num_frames) * interval + interval / 2.0).astype(np.int64)
    return offsets % total  # the original's out_of_bound_opt="loop"


def _check_num_frames(num_frames: int) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
        raise ConverterError(f"number of frames must be a positive integer, got {num_frames!r}")


def load_npy(path: str | Path) -> np.ndarray:
    """Frames ``[T, H, W, 3]`` uint8 from a ``.npy`` file (no pickles), validated."""
    path = Path(path)
    try:
        # allow_pickle=False: a clip is plain numbers; pickled .npy files can execute code.
        frames = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise ConverterError(f"video file {path} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise ConverterError(
            f"cannot read {path} as a .npy array of frames [T, H, W, 3] uint8: {exc}"
        ) from exc
    return check_frames(frames, str(path))


def _count_frames(av, path: Path) -> int:
    """Frame count of the first video stream: the container's, else by demuxing (no decoding)."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ConverterError(f"video file {path} has no video stream")
        stream = container.streams.video[0]
        if stream.frames > 0:
            return stream.frames
        # Matroska/WebM and raw streams often omit the count: a packet holds one frame, and reading
        # packets costs a fraction of decoding them. Empty packets only flush the demuxer.
        return sum(1 for packet in container.demux(stream) if packet.size)


def _decode_indices(av, path: Path, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """The wanted frames as RGB, decoding no further than the last of them; and the frames decoded."""
    kept: dict[int, np.ndarray] = {}
    last = max(wanted)
    decoded = 0
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            decoded = index + 1
            if index in wanted:
                kept[index] = frame.to_ndarray(format="rgb24")
            if index >= last:
                break
    return kept, decoded


def _decode_with_pyav(path: Path, num_frames: int) -> np.ndarray:
    try:
        import av
    except ImportError as exc:
        raise ConverterError(
            f"reading video file {path} needs PyAV, which is not installed: run {_VIDEO_EXTRA_HINT} "
            f"(or pass a .npy array of frames [T, H, W, 3] uint8)."
        ) from exc
    try:
        if not path.is_file():
            raise ConverterError(f"video file {path} does not exist")
        total = _count_frames(av, path)
        if total == 0:
            raise ConverterError(f"video file {path} contains no decodable frames")
        indices = sample_frame_indices(total, num_frames)
        kept, decoded = _decode_indices(av, path, set(indices.tolist()))
        if len(kept) < len(set(indices.tolist())):
            # The stated count was too high: sample again from the frames that really decode.
            if decoded == 0:
                raise ConverterError(f"video file {path} contains no decodable frames")
            indices = sample_frame_indices(decoded, num_frames)
            kept, _ = _decode_indices(av, path, set(indices.tolist()))
        frames = np.stack([kept[i] for i in indices.tolist()])  # ValueError if the resolution changes
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise ConverterError(f"cannot decode video file {path}: {exc}") from exc
    return check_frames(frames, str(path))


def load_video(path: str | Path, num_frames: int) -> np.ndarray:
    """``num_frames`` RGB frames ``[T, H, W, 3]`` uint8 from a ``.npy`` array of frames or a video file,
    sampled as the original does at test time (``sample_frame_indices``).

    Video files (mp4, avi, webm, ...) are decoded with PyAV (``pip install "xclip-converter[video]"``),
    only up to the last frame needed.
    """
    _check_num_frames(num_frames)
    path = Path(path)
    if path.suffix.lower() == ".npy":
        frames = load_npy(path)
        return frames[sample_frame_indices(len(frames), num_frames)]
    return _decode_with_pyav(path, num_frames)
