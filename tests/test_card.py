"""The model card: hub metadata huggingface_hub parses, provenance without local paths, both figures for
reduced dtypes, the preprocessing figures, and a usage snippet (run for real in tests/test_compat.py)."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard

from converter import processing
from converter.card import PLACEHOLDER, model_card, public_source, usage_snippet
from converter.config import hyper_for_variant
from converter.registry import VARIANTS
from converter.verify import compare
from tests.helpers import SQUARE

SHA = "0123456789abcdef" * 4
URL = "https://github.com/nbl97/X-CLIP_Model_Zoo/releases/download/v1.0/k400_32_8.pth"


def verification(atol: float = 1e-4):
    # Exact binary fractions: logits off by 2**-10 against a tolerance of atol * 16.
    want = {"logits": torch.tensor([[16.0, 10.0]]), "video_embeds": torch.tensor([[0.5, -0.5]])}
    got = {"logits": torch.tensor([[16.0 + 2**-10, 10.0]]), "video_embeds": torch.tensor([[0.5, -0.5]])}
    return compare(want, got, atol)


def card(name: str = "xclip-base-patch32", **kwargs) -> str:
    hyper = hyper_for_variant(VARIANTS[name]) if name in VARIANTS else SQUARE
    args = dict(name=name, hyper=hyper, source=URL, sha256=SHA, verification=verification())
    return model_card(**{**args, **kwargs})


def test_huggingface_hub_parses_the_metadata():
    parsed = ModelCard(card())
    data = parsed.data.to_dict()
    assert data["license"] == "mit" and data["library_name"] == "transformers"
    assert data["language"] == ["en"] and data["pipeline_tag"] == "video-classification"
    assert data["base_model"] == "openai/clip-vit-base-patch32" and data["datasets"] == ["kinetics-400"]
    assert data["converted_from"] == {"source": URL, "sha256": SHA}
    assert data["architectures"] == ["XCLIPModel"]
    assert parsed.text.lstrip().startswith("# xclip-base-patch32")


@pytest.mark.parametrize(
    ("name", "datasets", "base"),
    [
        ("xclip-base-patch16-16-frames", ["kinetics-400"], "openai/clip-vit-base-patch16"),
        ("xclip-large-patch14-16-frames", ["kinetics-400"], "openai/clip-vit-large-patch14-336"),
        ("xclip-large-patch14-kinetics-600", ["kinetics-600"], "openai/clip-vit-large-patch14"),
        ("xclip-base-patch16-hmdb-4-shot", ["hmdb51"], "openai/clip-vit-base-patch16"),
        ("xclip-base-patch16-ucf-16-shot", ["ucf101"], "openai/clip-vit-base-patch16"),
        ("xclip-base-patch16-zero-shot", ["kinetics-400"], "openai/clip-vit-base-patch16"),
    ],
)
def test_datasets_and_base_model_by_variant(name, datasets, base):
    text = card(name)
    data = ModelCard(text).data.to_dict()
    assert data["datasets"] == datasets and data["base_model"] == base
    if "shot" in name:
        assert ("4-shot on HMDB-51" in text) == (name == "xclip-base-patch16-hmdb-4-shot")
        assert ("zero-shot recognition" in text) == ("zero-shot" in name)


def test_own_checkpoint_claims_no_dataset_or_base():
    data = ModelCard(card("my_finetune", source="my_finetune.pth")).data.to_dict()
    assert "datasets" not in data and "base_model" not in data


@pytest.mark.parametrize(
    ("source", "recorded"),
    [
        ("/home/alice/secret-project/k400_32_8.pth", "k400_32_8.pth"),
        ("relative/dir/k400_32_8.pth", "k400_32_8.pth"),
        ("C:\\Users\\alice\\k400_32_8.pth", "k400_32_8.pth"),
        ("file:///home/alice/secret-project/k400_32_8.pth", "k400_32_8.pth"),
        ("https://alice:hunter2@mirror.example:8443/xclip/k400_32_8.pth?sig=abc", None),
        (URL, URL),
    ],
)
def test_no_local_path_or_credentials_are_recorded(source, recorded):
    text = card(source=source)
    recorded = recorded or "https://mirror.example:8443/xclip/k400_32_8.pth"
    assert public_source(source) == recorded
    assert ModelCard(text).data.to_dict()["converted_from"]["source"] == recorded
    for secret in ("alice", "secret-project", "hunter2", "sig=abc", "relative/dir"):
        assert secret not in text


def test_float32_card_has_one_figure_and_reduced_dtype_two():
    plain = card()
    assert "verification" in plain.lower() and "passed" in plain and "from float32" not in plain
    half = card(dtype="float16", float32_distance={"logits": 3.1e-3, "video_embeds": 4.5e-4})
    assert (
        "Weights: float16" in half
        and "| logits | 3.10e-03 |" in half
        and "| video_embeds | 4.50e-04 |" in half
    )
    assert half.count("max abs difference") == 2
    unmeasured = card(dtype="bfloat16")
    assert "from the float32 original" in unmeasured and "not measured" in unmeasured


def test_verification_figures_and_verdict():
    text = card(verification=verification(atol=1e-4))
    assert "| logits | 9.77e-04 | 1.60e-03 |" in text and "| video_embeds | 0.00e+00 | 5.00e-05 |" in text
    assert "`--atol 0.0001`" in text and "passed" in text
    failed = card(verification=verification(atol=1e-5))
    assert "FAILED" in failed
    assert "Not verified" in card(verification=None)


def test_preprocessing_figures_come_from_the_processing_table(monkeypatch):
    monkeypatch.setattr(processing, "PROCESSOR_DEVIATION", {224: (0.0123, 0.456)}, raising=False)
    text = card()
    assert "mean |Δ| is 0.0123" in text and "largest |Δ| 0.456 at 224 px" in text
    assert "not measured at 32 px" in card("my_finetune")  # SQUARE: 32 px, not in the table


def test_snippet_is_python_and_uses_the_repo_id():
    text = card(repo_id="someone/xclip-base-patch32")
    assert usage_snippet("someone/xclip-base-patch32", 8) in text and PLACEHOLDER not in text
    compile(usage_snippet(PLACEHOLDER, 8), "snippet", "exec")
    assert "processor.tokenizer(" in text and "processor.image_processor(" in text
    assert 'backend="pil"' in text
