"""The model card: hub metadata huggingface_hub parses, provenance without local paths, both figures for
reduced dtypes, the preprocessing figures, and a usage snippet (run for real in tests/test_compat.py)."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard

from converter import processing
from converter.card import INSTALL, PLACEHOLDER, model_card, public_source, usage_snippet
from converter.config import hyper_for_variant
from converter.registry import VARIANTS
from tests.helpers import SQUARE, compare

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


def test_a_newline_in_a_files_name_adds_no_line_to_the_card():
    text = card("mine\n# Official microsoft weights", source="/data/mine\n- Verified by: microsoft.pth")
    lines = text.splitlines()
    assert "# Official microsoft weights" not in lines and "- Verified by: microsoft.pth" not in lines
    assert "mine\\n# Official microsoft weights" in text and "mine\\n- Verified by: microsoft.pth" in text


def test_huggingface_hub_parses_the_metadata():
    parsed = ModelCard(card())
    data = parsed.data.to_dict()
    assert data["license"] == "mit" and data["library_name"] == "transformers"
    assert data["language"] == ["en"] and data["tags"] == ["vision", "video", "x-clip"]
    assert data["base_model"] == "openai/clip-vit-base-patch32"
    assert data["converted_from"] == {"source": URL, "sha256": SHA}
    assert data["architectures"] == ["XCLIPModel"]
    # No pipeline takes the model (below); the datasets have no canonical hub ids.
    assert "pipeline_tag" not in data and "datasets" not in data
    assert parsed.text.lstrip().startswith("# xclip-base-patch32")


@pytest.mark.parametrize("task", ["video-classification", "zero-shot-image-classification"])
def test_no_pipeline_tag_because_no_pipeline_takes_an_xclip_model(task):
    """A `pipeline_tag` tells the hub `transformers.pipeline(tag, model=folder)` works. The pipelines an
    X-CLIP could serve take only the models of their auto class; when transformers adds XCLIP to one,
    this fails and the card may name the tag."""
    from transformers import XCLIPConfig
    from transformers.pipelines import SUPPORTED_TASKS

    assert not any(XCLIPConfig in auto._model_mapping for auto in SUPPORTED_TASKS[task]["pt"])


def test_install_line_and_citation():
    text = card()
    assert f"```bash\n{INSTALL}\n```" in text and "pillow" in INSTALL and "Pillow is needed" in text
    assert "@article{ni2022expanding," in text and "arXiv:2208.02816" in text
    assert text.rstrip().endswith("```")  # the citation closes the card


@pytest.mark.parametrize(
    ("name", "trained_on", "base"),
    [
        ("xclip-base-patch16-16-frames", "Trained on Kinetics-400.", "openai/clip-vit-base-patch16"),
        ("xclip-large-patch14-16-frames", "Trained on Kinetics-400.", "openai/clip-vit-large-patch14-336"),
        ("xclip-large-patch14-kinetics-600", "Trained on Kinetics-600.", "openai/clip-vit-large-patch14"),
        ("xclip-base-patch16-hmdb-4-shot", "Trained 4-shot on HMDB-51.", "openai/clip-vit-base-patch16"),
        ("xclip-base-patch16-ucf-16-shot", "Trained 16-shot on UCF-101.", "openai/clip-vit-base-patch16"),
        ("xclip-base-patch16-zero-shot", "Trained on Kinetics-400;", "openai/clip-vit-base-patch16"),
    ],
)
def test_training_data_and_base_model_by_variant(name, trained_on, base):
    text = card(name)
    data = ModelCard(text).data.to_dict()
    assert trained_on in text and data["base_model"] == base and "datasets" not in data
    if "shot" in name:
        assert ("4-shot on HMDB-51" in text) == (name == "xclip-base-patch16-hmdb-4-shot")
        assert ("zero-shot recognition" in text) == ("zero-shot" in name)


@pytest.mark.parametrize("name", ["xclip-cooking", "xclip-my-finetune-ucf-2-shot", "my-zero-shot-try"])
def test_an_own_checkpoint_named_like_a_variant_claims_no_training_data(name):
    assert "Trained" not in card(name, source=f"{name}.pth")


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
    text = card("my_finetune", source=source)
    recorded = recorded or "https://mirror.example:8443/xclip/k400_32_8.pth"
    assert public_source(source) == recorded
    assert ModelCard(text).data.to_dict()["converted_from"]["source"] == recorded
    for secret in ("alice", "secret-project", "hunter2", "sig=abc", "relative/dir"):
        assert secret not in text


@pytest.mark.parametrize(
    "mirror",
    [
        "https://alice:hunter2@mirror.example:8443/xclip/k400_32_8.pth?sig=abc",
        "http://127.0.0.1:8080/k400_32_8.pth",
        "file:///srv/mirror/k400_32_8.pth",
    ],
)
def test_a_published_variant_fetched_through_a_mirror_names_the_release_not_the_mirror(mirror):
    """XCLIP_RELEASE_URL points the fetch at a mirror; the card cites the authors' release."""
    text = card("xclip-base-patch32", source=mirror)
    assert ModelCard(text).data.to_dict()["converted_from"]["source"] == URL
    assert f"- Source: {URL} (fetched through a mirror)" in text
    assert "mirror.example" not in text and "127.0.0.1" not in text and "8443" not in text
    assert f"- Source: {URL}\n" in card("xclip-base-patch32", source=URL)  # the release itself: no note
    drive = card("xclip-large-patch14", source=f"{mirror.rsplit('/', 1)[0]}/k400_14_8.pth")
    assert "- Source: https://drive.google.com/file/d/" in drive and "(fetched through a mirror)" in drive


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
