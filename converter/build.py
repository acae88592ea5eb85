"""Build an XCLIPModel around converted tensors without random initialisation."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import XCLIPConfig, XCLIPModel


def meta_model(config: XCLIPConfig) -> XCLIPModel:
    """An XCLIPModel on the meta device (shapes only, no memory, no init cost), built on a copy of the config
    with named outputs and the default attention: switches that change how a forward pass reports, not what
    it computes, and stay the config's own to write."""
    from transformers import XCLIPModel

    config = copy.deepcopy(config)
    config.return_dict, config.output_attentions, config._attn_implementation = True, False, None
    with torch.device("meta"):
        return XCLIPModel(config)


def build_model(config: XCLIPConfig, state_dict: Mapping[str, torch.Tensor]) -> XCLIPModel:
    """A meta-device XCLIPModel filled with `state_dict` by assignment (shared, not copied)."""
    model = meta_model(config)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    # Non-persistent buffers are in no state dict: left on meta, the forward pass returns NaN silently.
    for module in model.modules():
        if isinstance(ids := getattr(module, "position_ids", None), torch.Tensor) and ids.is_meta:
            module.position_ids = torch.arange(ids.shape[-1]).expand((1, -1))
    return model.eval()
