"""Synthetic checkpoints in the exact original layout, for tests and benchmarks.

Keys and shapes come from `converter.layout`, which the tests check against the inventory of the
18 real checkpoints. Values are seeded and scaled like a trained CLIP so outputs are not
degenerate.
"""

from __future__ import annotations

import math
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import torch

from converter.config import Hyper
from converter.rules import original_shapes

StateDict = dict[str, torch.Tensor]


def _init(key: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    if key == "logit_scale":
        return torch.tensor(math.log(100.0))
    if key == "prompts_generator.alpha":
        return torch.full(shape, 0.1) + 0.01 * torch.randn(shape, generator=gen)
    name = key.rsplit(".", 1)[-1]
    is_norm = any(p in key for p in ("ln_", "_ln.", "norm"))
    if is_norm and name == "weight":
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    if name in ("bias", "in_proj_bias"):
        return 0.01 * torch.randn(shape, generator=gen)
    if "embedding" in key:
        return 0.02 * torch.randn(shape, generator=gen)
    if key in ("visual.proj", "text_projection", "prompts_visual_proj"):
        fan_in = shape[0]  # used as x @ P: the input dimension comes first
    else:
        fan_in = math.prod(shape[1:])  # Linear [out, in], conv [out, c, p, p]
    return torch.randn(shape, generator=gen) * fan_in**-0.5


def make_state_dict(hyper: Hyper, seed: int = 0, dtype: torch.dtype = torch.float32) -> StateDict:
    """A seeded original state dict with every key of `hyper`'s layout, no zeros."""
    gen = torch.Generator().manual_seed(seed)
    return {k: _init(k, shape, gen).to(dtype) for k, shape in original_shapes(hyper).items()}


@contextmanager
def _yacs_cfgnode_importable():
    """Pickle a dict subclass under the name `yacs.config.CfgNode`, as the training code did,
    without needing yacs installed."""
    if "yacs.config" in sys.modules:
        yield sys.modules["yacs.config"].CfgNode
        return
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    cfgnode = type("CfgNode", (dict,), {"__module__": "yacs.config"})
    module.CfgNode, package.config = cfgnode, module
    sys.modules.update({"yacs": package, "yacs.config": module})
    try:
        yield cfgnode
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]


def save_training_layout(path: str | Path, state_dict: StateDict, hyper: Hyper) -> None:
    """Save like the original trainer: model, optimizer, lr_scheduler, max_accuracy, epoch, config."""
    with _yacs_cfgnode_importable() as cfgnode:
        config = cfgnode(
            MODEL=cfgnode(ARCH=f"ViT-?/{hyper.patch_size}", DROP_PATH_RATE=0.0, FIX_TEXT=True),
            DATA=cfgnode(NUM_FRAMES=hyper.frames, INPUT_SIZE=hyper.image_size),
            TRAIN=cfgnode(EPOCHS=30, LR=8e-6),
        )
        torch.save(
            {
                "model": state_dict,
                "optimizer": {
                    "state": {},
                    "param_groups": [{"lr": 8e-6, "weight_decay": 0.001, "params": [0]}],
                },
                "lr_scheduler": {"t_initial": 30, "lr_min": 8e-8, "warmup_t": 5},
                "max_accuracy": 80.0,
                "epoch": 29,
                "config": config,
            },
            path,
        )
