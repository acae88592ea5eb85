"""The original's test-time preprocessing (frames sampled, decoded, resized, cropped and normalised with
torch alone, to one uint8 level of its OpenCV), OpenAI's CLIP tokenizer built offline from the vocabulary
in ``converter/data``, and the transformers ``XCLIPProcessor`` saved with a converted model, whose
distance from the original ``PROCESSOR_DEVIATION`` states. torch and transformers are imported inside
functions: importing them costs a second of CLI start-up.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converter.clip import CONTEXT_LENGTH as MAX_TEXT_LENGTH
from converter.clip import VOCAB_SIZE as CLIP_VOCAB_SIZE
from converter.errors import ConverterError
from converter.reader import check_regular, positive_int

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer, VideoMAEImageProcessorPil, XCLIPProcessor

CLIP_NUM_MERGES = 49152 - 256 - 2  # OpenAI keeps these first merges of the file (it has more)
MAX_FRAME_SIDE = 16384  # pixels: one such square frame is 768 MiB as uint8, 3 GiB as float
# Resizing the short side to 256 multiplies the long one as much: a 1x16384 frame would become 4M x 256.
MAX_ASPECT_RATIO = 16  # 32:9, the widest screens, is 3.6

# ImageNet statistics: transformers' processor takes them on 0-1, the original (img_norm_cfg) on 0-255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The saved processor's distance from the original after normalisation on tests/data/preprocessing's
# photos, {image size: (largest per-frame mean |Δ|, largest |Δ|)}; one uint8 level is about 0.0175.
# Measured by `python benchmarks/preprocessing.py`; tests/test_processing.py checks them.
PROCESSOR_DEVIATION: dict[int, tuple[float, float]] = {224: (0.0624, 1.33), 336: (0.0468, 1.52)}


def resize_short_side(image_size: int) -> int:
    """Short-side length the original resizes to before centre-cropping ``image_size``."""
    return int(256 / 224 * image_size)


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """As mmcv's ``rescale_size``: both sides rounded (transformers truncates the long side: 682, not 683)."""
    factor = short_side / min(height, width)
    return int(height * factor + 0.5), int(width * factor + 0.5)


def check_positive_int(value: object, what: str) -> None:
    if not positive_int(value):
        raise ConverterError(f"{what} must be a positive integer, got {value!r}")


def check_frames(frames: object, source: str) -> np.ndarray:
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
    _check_frame_size(frames.shape[2], frames.shape[1], source)
    return frames


def _check_frame_size(width: int, height: int, source: str) -> None:
    if max(width, height) > MAX_FRAME_SIDE:
        raise ConverterError(
            f"{source}: frames of {width}x{height} pixels, more than the {MAX_FRAME_SIDE} a side this reads "
            "(a frame of 8K video has 7680); downscale the clip first."
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ConverterError(
            f"{source}: frames of {width}x{height} pixels, one side more than {MAX_ASPECT_RATIO} times the "
            "other (resizing the short side would blow up the long one); crop the clip first."
        )


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
        x = torch.tensor(frame).permute(2, 0, 1)[None].float()  # a copy: a mapped clip is read-only
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
        x = x[0, :, top : top + image_size, left : left + image_size]
        # cv2 returns uint8 rounded half up (its fixed-point result); the crop only discards pixels.
        out.append(torch.floor(x + 0.5).clamp_(0, 255))
    return torch.stack(out)


def sample_frame_indices(total: int, num_frames: int) -> np.ndarray:
    """The original's test-time sample of ``num_frames`` from ``total``: ``int(i * N/T + N/(2T)) % N``
    (mmaction's ``_get_test_clips``, same float order); a clip shorter than T repeats frames."""
    if isinstance(total, bool) or not isinstance(total, int | np.integer) or total < 1:
        raise ConverterError(f"a clip needs at least one frame to sample from, got {total!r} frames")
    check_positive_int(num_frames, "number of frames")
    interval = total / float(num_frames)
    offsets = (np.arange(num_frames) * interval + interval / 2.0).astype(np.int64)
    return offsets % total  # the original's out_of_bound_opt="loop"


def load_video(path: str | Path, num_frames: int) -> np.ndarray:
    """``num_frames`` RGB frames sampled as the original does, from a ``.npy`` array or a video (PyAV)."""
    check_positive_int(num_frames, "number of frames")
    path = Path(path)
    if path.exists():  # a folder, FIFO or device is named, never opened (reading a FIFO would block)
        check_regular(path, f"video file {path}")
    if path.suffix.lower() == ".npy":
        frames = load_npy(path)
        return np.array(frames[sample_frame_indices(len(frames), num_frames)])  # read from the mapped file
    try:
        import av
    except ImportError as exc:
        raise ConverterError(
            f"reading video file {path} needs PyAV, which is not installed: run "
            'pip install "xclip-converter[video]" (or pass a .npy array of frames [T, H, W, 3] uint8).'
        ) from exc
    if not path.is_file():
        raise ConverterError(f"video file {path} does not exist")
    try:
        total = _count_frames(av, path)
        while total:  # twice at most: a container may state more frames than really decode
            indices = sample_frame_indices(total, num_frames).tolist()
            kept: dict[int, np.ndarray] = {}
            decoded = 0
            with av.open(str(path)) as container:  # decoding no further than the last wanted frame
                for frame in container.decode(video=0):
                    if decoded in indices:  # checked before T such frames are kept as RGB
                        _check_frame_size(frame.width, frame.height, str(path))
                        kept[decoded] = frame.to_ndarray(format="rgb24")
                    decoded += 1
                    if decoded > indices[-1]:  # the indices ascend
                        break
            if len(kept) == len(set(indices)):  # np.stack: a ValueError if the resolution changes
                return check_frames(np.stack([kept[i] for i in indices]), str(path))
            total = decoded
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise ConverterError(f"cannot decode video file {path}: {exc}") from exc
    raise ConverterError(f"video file {path} contains no decodable frames")


def load_npy(path: str | Path) -> np.ndarray:
    """Frames from a ``.npy`` file, validated, and mapped: a clip larger than memory is read only where
    frames are taken. No pickles (they can run code)."""
    try:
        frames = np.load(path, allow_pickle=False, mmap_mode="r")
    except FileNotFoundError as exc:
        raise ConverterError(f"video file {path} does not exist") from exc
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
        raise ConverterError(
            f"cannot read {path} as a .npy array of frames [T, H, W, 3] uint8: {exc}"
        ) from exc
    return check_frames(frames, str(path))


def _count_frames(av, path: Path) -> int:
    # Matroska/WebM often omit the count; a packet holds one frame, and demuxing costs a fraction of decoding.
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ConverterError(f"video file {path} has no video stream")
        stream = container.streams.video[0]
        return stream.frames or sum(1 for packet in container.demux(stream) if packet.size)


def preprocess_video(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """Pixel values ``[1, T, 3, S, S]`` as the original computes them, to one uint8 level (~0.0175)."""
    return normalize(resize_and_crop(frames, image_size))[None]


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels ``[..., 3, H, W]`` on 0-255 normalised with the original's mean and std."""
    import torch

    mean, std = (torch.tensor([255 * c for c in v]).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (pixels - mean) / std


def original_settings(image_size: int) -> dict:
    """The original's preprocessing as VideoMAE image processor settings; crop_size is given too, since
    with only a size VideoMAE still centre-crops to 224."""
    check_positive_int(image_size, "image size")
    return {
        "do_resize": True,
        "size": {"shortest_edge": resize_short_side(image_size)},
        "resample": 2,  # PIL's BILINEAR, of its filters the closest to OpenCV's INTER_LINEAR (measured)
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }


def bpe_vocab_path() -> Path:
    """The packaged OpenAI BPE vocabulary, ``converter/data/bpe_simple_vocab_16e6.txt.gz``."""
    return Path(str(resources.files("converter") / "data" / "bpe_simple_vocab_16e6.txt.gz"))


@functools.lru_cache(maxsize=1)
def load_clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (49408 tokens) and merges (48894) as OpenAI's ``SimpleTokenizer`` builds them, read once
    per process (plain data that no caller changes)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # OpenAI's byte-level alphabet

    path = bpe_vocab_path()
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError) as exc:
        raise ConverterError(f"cannot read {path} ({exc}): reinstall xclip-converter") from exc
    merges = [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges)]
    vocab = {token: i for i, token in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    return vocab, merges  # type: ignore[return-value]


def build_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer (49408 tokens, max length 77, pad ``<|endoftext|>``), a new one each call: padding
    changes its backend's state, which a saved processor would carry (``"padding": {"Fixed": 77}``)."""
    from transformers import CLIPTokenizer

    vocab, merges = load_clip_bpe()
    # vocab=/merges=, not vocab_file=/merges_file=, which silently give a 3-token tokenizer in
    # transformers 5. CLIPTokenizer's default special tokens are openai/clip-vit-base-patch32's.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_LENGTH)
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise ConverterError(
            f"built a CLIP tokenizer with {len(tokenizer)} tokens instead of {CLIP_VOCAB_SIZE}: this "
            "transformers version builds CLIPTokenizer differently; report it with the version."
        )
    return tokenizer


def encode_texts(texts: list[str]) -> torch.Tensor:
    """Token ids ``[K, 77]`` int64, padded with ``<|endoftext|>`` where the original pads with 0: the text
    model is causal and pools at the first end-of-text token, so the padding never reaches the output."""
    import torch

    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise ConverterError(f"texts must be a non-empty list of strings, got {texts!r}")
    ids = build_tokenizer()(texts, padding="max_length", max_length=MAX_TEXT_LENGTH).input_ids
    # The original (clip.tokenize) refuses over-long prompts rather than silently truncating them.
    for text, text_ids in zip(texts, ids, strict=True):
        if len(text_ids) > MAX_TEXT_LENGTH:
            raise ConverterError(
                f"text {text[:60]!r} is {len(text_ids)} tokens long; CLIP allows at most {MAX_TEXT_LENGTH} "
                "(including start/end tokens): shorten it."
            )
    return torch.tensor(ids, dtype=torch.long)


def build_image_processor(image_size: int) -> VideoMAEImageProcessorPil:
    """The closest to the original that plain ``AutoProcessor`` loads (PIL antialiases); the Pillow class,
    since the torchvision one does not import beside this torch build and gives the same result."""
    from transformers import VideoMAEImageProcessorPil

    return VideoMAEImageProcessorPil(**original_settings(image_size))


def build_processor(image_size: int) -> XCLIPProcessor:
    """``XCLIPProcessor`` with the original's settings: what a converted folder's processor files load as."""
    from transformers import XCLIPProcessor

    return XCLIPProcessor(image_processor=build_image_processor(image_size), tokenizer=build_tokenizer())


def processor_pixel_values(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """Pixel values ``[1, T, 3, S, S]`` as the saved processor computes them."""
    images = list(check_frames(frames, "video frames"))
    # channels_last stated: inference is ambiguous for frames with a side of 3 pixels.
    out = build_image_processor(image_size)(images, return_tensors="pt", input_data_format="channels_last")
    return out["pixel_values"]
