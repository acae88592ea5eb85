"""The CLIP BPE tokenizer built offline (converter/processing.py)."""

from __future__ import annotations

import pytest
import torch

from converter import processing as T
from converter.errors import ConverterError


def test_packaged_bpe_vocab_and_licence_exist() -> None:
    path = T.bpe_vocab_path()
    assert path.is_file()
    licence = path.with_name("LICENSE-CLIP.txt").read_text()
    assert "MIT License" in licence and "OpenAI" in licence


def test_bpe_vocab_and_merges_counts() -> None:
    vocab, merges = T.load_clip_bpe()
    assert len(vocab) == 49408
    assert len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_tokenizer_ids_are_stable() -> None:
    tokenizer = T.build_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer("eating spaghetti").input_ids == [49406, 4371, 18440, 49407]
    assert tokenizer("playing sports").input_ids == [49406, 1629, 2054, 49407]
    assert tokenizer("go shopping").input_ids == [49406, 861, 4266, 49407]
    # Case, whitespace and punctuation handled like OpenAI's SimpleTokenizer.
    assert tokenizer("Hello,  World!").input_ids == tokenizer("hello, world!").input_ids


def test_a_saved_processor_carries_no_state_from_an_earlier_run(tmp_path) -> None:
    """encode_texts pads to 77 (as --video does); a processor saved afterwards must not say so."""
    import json

    from converter.processing import build_processor

    T.encode_texts(["eating spaghetti"])
    build_processor(224).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["padding"] is None


def test_encode_texts_pads_to_77() -> None:
    ids = T.encode_texts(["eating spaghetti", "playing sports", "go shopping"])
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert ids[0, :4].tolist() == [49406, 4371, 18440, 49407]
    assert (ids[:, 4:] == 49407).all()  # padded with <|endoftext|>
    # The model pools at the first end-of-text token (argmax finds the first 49407).
    assert ids.argmax(-1).tolist() == [3, 3, 3]


@pytest.mark.parametrize("bad", [[], "eating spaghetti", [1, 2]])
def test_encode_texts_rejects_non_lists(bad: object) -> None:
    with pytest.raises(ConverterError, match="non-empty list of strings"):
        T.encode_texts(bad)  # type: ignore[arg-type]


def test_encode_texts_rejects_overlong_text() -> None:
    with pytest.raises(ConverterError, match="tokens long"):
        T.encode_texts(["word " * 100])


def test_encode_texts_limit_is_77_tokens_exactly() -> None:
    """75 words and the start/end tokens fit; one word more is refused, naming its length."""
    assert T.encode_texts(["a " * 75]).shape == (1, 77)
    with pytest.raises(ConverterError, match="is 78 tokens long; CLIP allows at most 77"):
        T.encode_texts(["a " * 76])
