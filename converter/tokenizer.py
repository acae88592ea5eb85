"""OpenAI's CLIP BPE tokenizer, built offline from the vocabulary shipped in ``converter/data``
(transformers is imported inside functions: importing it costs a second of CLI start-up)."""

from __future__ import annotations

import functools
import gzip
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from converter.clip import CONTEXT_LENGTH as MAX_TEXT_LENGTH
from converter.clip import VOCAB_SIZE as CLIP_VOCAB_SIZE
from converter.errors import ConverterError

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer

CLIP_NUM_MERGES = 49152 - 256 - 2  # OpenAI keeps these first merges of the file (it has more)


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
