"""The conversion pipeline on a loaded state dict: hyper-parameters -> map -> check, then build -> verify.

Loading (converter.load) comes before it and writing (converter.export) after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from converter.build import build_model
from converter.config import (
    HEAD_DIM,
    Hyper,
    check_heads,
    check_variant,
    hyper_from_config,
    infer_hyper,
    to_config,
)
from converter.oracle import OriginalHeads
from converter.registry import Variant
from converter.rules import check_state_dict, original_to_hf
from converter.verify import DEFAULT_ATOL, Verification, verify

if TYPE_CHECKING:
    from transformers import XCLIPConfig, XCLIPModel

StateDict = dict[str, torch.Tensor]


@dataclass
class Conversion:
    hyper: Hyper
    state_dict: StateDict  # XCLIPModel keys, in the output dtype
    dtype: torch.dtype
    given_config: XCLIPConfig | None = None  # from --config; else derived from `hyper`
    verification: Verification | None = None
    model: XCLIPModel | None = None  # the float32 model that was verified

    @cached_property
    def config(self) -> XCLIPConfig:
        """transformers' config, built on first use: importing transformers costs more than mapping
        the weights, and the CLI writes the weights meanwhile."""
        config = self.given_config or to_config(self.hyper)
        config.dtype = self.dtype  # recorded in config.json so from_pretrained restores it
        return config


def convert(
    original: Mapping[str, torch.Tensor],
    *,
    variant: Variant | None = None,
    config: XCLIPConfig | None = None,
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
) -> Conversion:
    """Map an original state dict to XCLIPModel weights; raise ConverterError on any layout problem.

    Needs torch only; `verify_conversion` proves the result.
    """
    hyper = hyper_from_config(config) if config is not None else infer_hyper(original)
    if variant is not None:
        check_variant(hyper, variant, source)
    if config is None:
        check_heads(hyper)
    converted = original_to_hf(original)
    check_state_dict(converted, hyper)
    return Conversion(hyper, {k: v.to(dtype) for k, v in converted.items()}, dtype, config)


def verify_conversion(
    result: Conversion, original: Mapping[str, torch.Tensor], atol: float = DEFAULT_ATOL
) -> Verification:
    """Build the converted XCLIPModel and compare it with the oracle run on the original weights.

    Verifies exactly the values written: both sides see the weights rounded to the output dtype,
    computed in float32.
    """
    result.model = build_model(result.config, {k: v.float() for k, v in result.state_dict.items()})
    rounded = {k: v.to(result.dtype).float() for k, v in original.items()}
    result.verification = verify(result.model, rounded, result.hyper, atol, oracle_heads(result.hyper))
    return result.verification


def oracle_heads(hyper: Hyper) -> OriginalHeads | None:
    """None: the oracle applies the original's own rule (width // 64, hard-coded in its code).

    Only below width 64 (tiny test models built with explicit heads) does the config decide.
    """
    if min(hyper.vision_width, hyper.text_width, hyper.embed_dim) >= HEAD_DIM:
        return None
    return OriginalHeads(
        vision=hyper.vision_heads, text=hyper.text_heads, mit=hyper.mit_heads, prompts=hyper.prompt_heads
    )
