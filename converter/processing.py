"""Text and video preprocessing matching the original X-CLIP, built offline.

The tokenizer is OpenAI's CLIP BPE, built from the vocabulary shipped in ``converter/data`` (no hub
download); the image processor is transformers' VideoMAE processor configured the way the original
preprocesses (short side ``int(256 / 224 * size)``, centre crop ``size``, ImageNet mean/std).
transformers is imported inside functions because importing it costs about a second of CLI start-up.
"""

from __future__ import annotations

import functools
import gzip
import os
import ssl
import threading
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converter.errors import ConverterError

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer, VideoMAEImageProcessorPil, XCLIPProcessor

# The original normalises with ImageNet statistics; VideoMAE's defaults (0.5/0.5) would be wrong.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CLIP's text context length; the original pads every prompt to it.
MAX_TEXT_LENGTH = 77

BPE_VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_NUM_MERGES = 48894
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

SPAGHETTI_REPO = "hf-internal-testing/spaghetti-video"
SPAGHETTI_FILES = {
    8: "eating_spaghetti_8_frames.npy",
    16: "eating_spaghetti.npy",
    32: "eating_spaghetti_32_frames.npy",
}

_VIDEO_EXTRA_HINT = 'pip install "xclip-converter[video]"'


# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode character map used by CLIP's byte-level BPE."""
    # Printable latin-1 bytes map to themselves; the rest are shifted above 255 so that the BPE
    # never sees whitespace/control characters. The order defines the first 256 token ids.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def bpe_vocab_path() -> Path:
    """Path of the packaged OpenAI BPE vocabulary (``converter/data/bpe_simple_vocab_16e6.txt.gz``)."""
    return Path(str(resources.files("converter") / "data" / BPE_VOCAB_FILENAME))


def load_clip_bpe(path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (49408 tokens) and merges (48894) exactly as OpenAI's ``SimpleTokenizer`` builds them."""
    path = Path(path) if path is not None else bpe_vocab_path()
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, EOFError) as exc:
        raise ConverterError(
            f"cannot read the CLIP BPE vocabulary {path}: {exc}. Reinstall xclip-converter "
            f"(the file ships as package data in converter/data/)."
        ) from exc
    # Line 0 is a version header; OpenAI keeps exactly 49152 - 256 - 2 merges (the file has more).
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    if len(merges) != CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ConverterError(
            f"CLIP BPE vocabulary {path} is malformed (expected {CLIP_NUM_MERGES} merge pairs): "
            f"reinstall xclip-converter."
        )
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return vocab, merges  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def build_tokenizer() -> CLIPTokenizer:
    """CLIP tokenizer (49408 tokens, max length 77, pad = ``<|endoftext|>``) built offline from the BPE file.

    Cached: the returned object is shared, so do not mutate it.
    """
    from transformers import CLIPTokenizer

    vocab, merges = load_clip_bpe()
    # vocab=/merges= (not vocab_file=/merges_file=, which silently yields a 3-token tokenizer in
    # transformers 5). Merges must be (a, b) tuples: the tokenizers backend rejects "a b" strings.
    # Special tokens are CLIPTokenizer's defaults, which match openai/clip-vit-base-patch32.
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MAX_TEXT_LENGTH,
    )
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise ConverterError(
            f"built a CLIP tokenizer with {len(tokenizer)} tokens instead of {CLIP_VOCAB_SIZE}: "
            f"this transformers version builds CLIPTokenizer differently; report it with the version."
        )
    return tokenizer


def encode_texts(texts: list[str]) -> torch.Tensor:
    """Token ids ``[K, 77]`` (int64) for the model, padded to 77 with ``<|endoftext|>``.

    Padding differs from the original (which pads with 0) but the text model is causal and pools at
    the first end-of-text token, so the padding never reaches the output.
    """
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise ConverterError(f"texts must be a non-empty list of strings, got {texts!r}")
    tokenizer = build_tokenizer()
    ids = tokenizer(texts, padding="max_length", max_length=MAX_TEXT_LENGTH).input_ids
    # The original (clip.tokenize) refuses over-long prompts rather than silently truncating them.
    too_long = [(t, len(i)) for t, i in zip(texts, ids, strict=True) if len(i) > MAX_TEXT_LENGTH]
    if too_long:
        text, n = too_long[0]
        raise ConverterError(
            f"text {text[:60]!r} is {n} tokens long; CLIP allows at most {MAX_TEXT_LENGTH} "
            f"(including start/end tokens): shorten it."
        )
    import torch

    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- video frames


def resize_short_side(image_size: int) -> int:
    """Short-side length the original resizes to before centre-cropping ``image_size``."""
    return int(256 / 224 * image_size)


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ConverterError(f"image size must be a positive integer (224 or 336), got {image_size!r}")


def build_image_processor(image_size: int) -> VideoMAEImageProcessorPil:
    """VideoMAE image processor (pillow backend) preprocessing frames like the original X-CLIP."""
    _check_image_size(image_size)
    # The Pil class directly: `VideoMAEImageProcessor` needs torchvision (which does not import beside
    # this torch build) and otherwise falls back to this class with a warning. Pillow also keeps
    # results identical whether or not torchvision happens to be installed.
    from PIL import Image
    from transformers import VideoMAEImageProcessorPil

    return VideoMAEImageProcessorPil(
        do_resize=True,
        # Both size and crop_size: given only a size, VideoMAE still centre-crops to 224.
        size={"shortest_edge": resize_short_side(image_size)},
        # The original resizes with its mmaction-style `Resize` at its default interpolation, bilinear.
        resample=Image.Resampling.BILINEAR,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def build_processor(image_size: int) -> XCLIPProcessor:
    """``XCLIPProcessor`` (VideoMAE image processor + CLIP tokenizer) to save next to a converted model."""
    from transformers import XCLIPProcessor

    return XCLIPProcessor(image_processor=build_image_processor(image_size), tokenizer=build_tokenizer())


def _check_frames(frames: object, source: str) -> np.ndarray:
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


def preprocess_video(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """Pixel values ``[1, T, 3, S, S]`` (float32) for a clip of ``[T, H, W, 3]`` uint8 frames."""
    frames = _check_frames(frames, "video frames")
    processor = build_image_processor(image_size)
    # channels_last stated explicitly: inference is ambiguous for frames with a side of 3 pixels.
    out = processor(list(frames), return_tensors="pt", input_data_format="channels_last")
    return out["pixel_values"]


# --------------------------------------------------------------------------- clips


def sample_frame_indices(total: int, num_frames: int) -> np.ndarray:
    """``num_frames`` indices spread evenly over ``total`` frames, first and last included.

    A clip shorter than ``num_frames`` repeats frames rather than failing.
    """
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def _check_num_frames(num_frames: int) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
        raise ConverterError(f"number of frames must be a positive integer, got {num_frames!r}")


def _load_npy(path: Path) -> np.ndarray:
    try:
        # allow_pickle=False: a clip is plain numbers; pickled .npy files can execute code.
        frames = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise ConverterError(f"video file {path} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise ConverterError(
            f"cannot read {path} as a .npy array of frames [T, H, W, 3] uint8: {exc}"
        ) from exc
    return _check_frames(frames, str(path))


def _decode_with_pyav(path: Path, num_frames: int) -> np.ndarray:
    try:
        import av
    except ImportError as exc:
        raise ConverterError(
            f"reading video file {path} needs PyAV, which is not installed: run {_VIDEO_EXTRA_HINT} "
            f"(or pass a .npy array of frames [T, H, W, 3] uint8)."
        ) from exc

    def decode(keep: set[int] | None) -> tuple[int, dict[int, np.ndarray]]:
        # Keep only the sampled frames so long clips do not need all frames in memory.
        kept: dict[int, np.ndarray] = {}
        count = 0
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ConverterError(f"video file {path} has no video stream")
            for count, frame in enumerate(container.decode(video=0), start=1):
                if keep is not None and count - 1 in keep:
                    kept[count - 1] = frame.to_ndarray(format="rgb24")
        return count, kept

    try:
        if not path.is_file():
            raise ConverterError(f"video file {path} does not exist")
        with av.open(str(path)) as container:
            declared = container.streams.video[0].frames if container.streams.video else 0
        # Containers often omit the frame count (0) or state it approximately: count by decoding when
        # it is missing, and re-sample below if decoding finds a different count.
        total = declared if declared > 0 else decode(None)[0]
        indices = sample_frame_indices(total, num_frames) if total else np.zeros(0, dtype=np.int64)
        actual, kept = decode(set(indices.tolist()))
        if actual and actual != total:
            indices = sample_frame_indices(actual, num_frames)
            actual, kept = decode(set(indices.tolist()))
        if actual == 0:
            raise ConverterError(f"video file {path} contains no decodable frames")
        frames = np.stack([kept[i] for i in indices.tolist()])  # ValueError if the resolution changes
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise ConverterError(f"cannot decode video file {path}: {exc}") from exc
    return _check_frames(frames, str(path))


def load_video(path: str | Path, num_frames: int) -> np.ndarray:
    """``num_frames`` RGB frames ``[T, H, W, 3]`` uint8 from a ``.npy`` array of frames or a video file.

    Frames are sampled evenly over the clip when it has a different frame count. Video files (mp4,
    avi, webm, ...) are decoded with PyAV (``pip install "xclip-converter[video]"``).
    """
    _check_num_frames(num_frames)
    path = Path(path)
    if path.suffix.lower() == ".npy":
        frames = _load_npy(path)
        if len(frames) == num_frames:
            return frames
        return frames[sample_frame_indices(len(frames), num_frames)]
    return _decode_with_pyav(path, num_frames)


def spaghetti_clip_filename(num_frames: int) -> str:
    """File in ``SPAGHETTI_REPO`` holding the "eating spaghetti" clip with ``num_frames`` frames."""
    try:
        return SPAGHETTI_FILES[num_frames]
    except (KeyError, TypeError):
        raise ConverterError(
            f"no spaghetti test clip with {num_frames!r} frames: available frame counts are "
            f"{sorted(SPAGHETTI_FILES)}; pass your own clip with a matching frame count instead."
        ) from None


def _env_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


@functools.cache
def _probe(url: str, timeout: float) -> bool:
    result: list[bool] = []

    def head() -> None:
        try:
            # urllib honours HTTPS_PROXY like the hub client does, so a proxied hub counts as reachable.
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:
            result.append(True)  # the server answered (even 4xx/5xx): the network path works
        except urllib.error.URLError as exc:
            # A TLS failure still means the host answered; let the hub client report its own error.
            result.append(isinstance(exc.reason, ssl.SSLError))
        except (OSError, ValueError):
            result.append(False)

    # A thread because name resolution ignores socket timeouts and can hang for tens of seconds.
    worker = threading.Thread(target=head, name="xclip-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(result and result[0])


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` s (False under ``HF_HUB_OFFLINE=1``).

    Probed once per process and endpoint: callers use it to skip hf_hub_download's ~23 s retries.
    """
    if _env_offline():
        return False
    return _probe(_hub_endpoint(), float(timeout))


def load_spaghetti_clip(num_frames: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """The "eating spaghetti" test clip ``[T, H, W, 3]`` uint8 with ``num_frames`` in {8, 16, 32}.

    Downloaded from the hub (``SPAGHETTI_REPO``, a dataset) or, when the hub is unreachable, taken
    from the local HF cache only.
    """
    filename = spaghetti_clip_filename(num_frames)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    online = hub_reachable()
    try:
        local = hf_hub_download(
            SPAGHETTI_REPO,
            filename,
            repo_type="dataset",
            cache_dir=cache_dir,
            # Offline: look in the cache only, skipping the client's long connection retries.
            local_files_only=not online,
        )
    except (OSError, EntryNotFoundError) as exc:
        if not online:
            raise ConverterError(
                f"spaghetti clip {filename} not in the local HF cache and the hub is unreachable: "
                f"connect to the internet once (or run where {SPAGHETTI_REPO} was downloaded before), "
                f"or use your own clip (a .npy array of frames or a video file) instead."
            ) from exc
        raise ConverterError(
            f"could not download spaghetti clip {filename} from the dataset {SPAGHETTI_REPO}: {exc}"
        ) from exc
    frames = _load_npy(Path(local))
    if len(frames) != num_frames:
        raise ConverterError(
            f"spaghetti clip {local} has {len(frames)} frames, expected {num_frames} "
            f"(shape {tuple(frames.shape)}): delete it from the HF cache and retry."
        )
    return frames
