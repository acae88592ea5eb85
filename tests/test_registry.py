"""The 18 published variants: registry configs and derived key layouts equal the inventory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from converter.build import meta_model
from converter.config import check_heads, hyper_for_variant, hyper_from_config, infer_hyper, to_config
from converter.errors import ConverterError
from converter.layout import hf_shapes, original_shapes
from converter.registry import VARIANTS

INVENTORY = Path(__file__).parent / "data" / "inventory"

# Inventory hyperparameter names -> our Hyper fields.
INVENTORY_FIELDS = {
    "embed_dim": "embed_dim", "image_resolution": "image_size", "vision_patch_size": "patch_size",
    "DATA.NUM_FRAMES": "frames", "vision_width": "vision_width", "vision_layers": "vision_layers",
    "vision_heads": "vision_heads", "transformer_width": "text_width", "transformer_layers": "text_layers",
    "transformer_heads": "text_heads", "vocab_size": "vocab_size", "context_length": "context_length",
    "mit_layers": "mit_layers", "mit_heads": "mit_heads", "mit_mlp_width": "mit_mlp",
    "prompts_layers": "prompt_layers", "prompts_heads": "prompt_heads",
}  # fmt: skip


def inventory(name: str) -> dict:
    return json.loads((INVENTORY / f"{name}.json").read_text())


def test_inventory_covers_the_registry():
    assert sorted(p.stem for p in INVENTORY.glob("*.json")) == sorted(VARIANTS)
    assert len(VARIANTS) == 18


@pytest.mark.parametrize("name", list(VARIANTS))
def test_registry_matches_inventory(name):
    inv = inventory(name)
    hyper = hyper_for_variant(VARIANTS[name])
    for inv_field, field in INVENTORY_FIELDS.items():
        assert getattr(hyper, field) == inv["hyperparameters"][inv_field], field
    assert VARIANTS[name].arch.name == inv["hyperparameters"]["MODEL.ARCH"].removesuffix("@336px")

    # Keys and shapes derived from the registry config through the reversed rule table.
    derived = {k: list(s) for k, s in original_shapes(hyper).items()}
    real = {k: v["shape"] for k, v in inv["state_dict"].items()}
    assert derived == real
    assert len(real) == inv["num_keys"]

    # Inference from the real layout gives the registry config back.
    meta = {k: torch.empty(v, device="meta") for k, v in real.items()}
    assert infer_hyper(meta) == hyper


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_round_trips_and_heads_match_attention_modules(name):
    hyper = hyper_for_variant(VARIANTS[name])
    config = to_config(hyper)
    assert hyper_from_config(config) == hyper
    modules = inventory(name)["attention_modules"]
    assert config.vision_config.mit_num_attention_heads == modules["mit.resblocks.0.attn"]["num_heads"]
    prompt = modules["prompts_generator.decoder.0.cross_attn"]["num_heads"]
    assert config.prompt_num_attention_heads == prompt


def test_large_models_have_12_mit_and_prompt_heads():
    for name in ("xclip-large-patch14", "xclip-large-patch14-16-frames", "xclip-large-patch14-kinetics-600"):
        config = to_config(hyper_for_variant(VARIANTS[name]))
        assert config.vision_config.mit_num_attention_heads == 12
        assert config.prompt_num_attention_heads == 12


def test_heads_cannot_be_inferred_below_width_64():
    meta = {
        k: torch.empty(v["shape"], device="meta")
        for k, v in inventory("xclip-base-patch32")["state_dict"].items()
    }
    meta["text_projection"] = torch.empty(32, 32, device="meta")
    hyper = infer_hyper(meta)
    assert hyper.text_heads == 0
    with pytest.raises(ConverterError, match="--config"):
        check_heads(hyper)


def test_release_sources_are_unique():
    refs = [v.source.ref for v in VARIANTS.values()]
    names = [v.source.filename for v in VARIANTS.values()]
    assert len(set(refs)) == len(set(names)) == 18


def _layout_cases():
    from tests.helpers import SQUARE, UNEVEN

    yield from (pytest.param(hyper_for_variant(v), id=name) for name, v in VARIANTS.items())
    yield pytest.param(UNEVEN, id="uneven")
    yield pytest.param(SQUARE, id="square")


@pytest.mark.parametrize("hyper", list(_layout_cases()))
def test_layout_matches_transformers_model(hyper):
    """The shape table that checks conversions is exactly XCLIPModel's state dict."""
    model_shapes = {k: tuple(v.shape) for k, v in meta_model(to_config(hyper)).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in hf_shapes(hyper).items()} == model_shapes
