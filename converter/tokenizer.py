"""OpenAI's CLIP BPE tokenizer, built offline from the vocabulary shipped in ``converter/data``.

transformers is imported inside functions because importing it costs about a second of CLI start-up.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from converter.clip import CONTEXT_LENGTH, VOCAB_SIZE
from converter.errors import ConverterError

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer

# CLIP's text context length (the original pads every prompt to it) and vocabulary size.
MAX_TEXT_LENGTH = CONTEXT_LENGTH
CLIP_VOCAB_SIZE = VOCAB_SIZE

BPE_VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_NUM_MERGES = 48894
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


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


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The packaged vocabulary, read once per process (plain data: sharing it is safe)."""
    return load_clip_bpe()


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


def build_tokenizer() -> CLIPTokenizer:
    """CLIP tokenizer (49408 tokens, max length 77, pad = ``<|endoftext|>``) built offline from the BPE file.

    A new one each call: calling a tokenizer with padding changes its backend's state, which a
    saved processor would then carry (``"padding": {"Fixed": 77}`` in tokenizer.json).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
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
