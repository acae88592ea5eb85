"""Synthetic checkpoints in the exact original layout: for a first conversion without the network,
and for the tests and benchmarks.

    python -m converter.synthetic xclip-base-patch32 k400_32_8.pth --clip clip.npy

writes one of the 18 published variants' checkpoints as the original trainer saved it (model,
optimizer, lr_scheduler, config, ...), with seeded random weights instead of the trained ones, and
optionally a clip of random frames to classify. Keys and shapes come from `converter.rules`, which
the tests check against the inventory of the 18 real checkpoints. Values are scaled like a trained
CLIP so outputs are not degenerate; its predictions mean nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from converter.config import Hyper, hyper_for_variant
from converter.errors import ConverterError, escape
from converter.registry import VARIANTS, Variant, get_variant
from converter.rules import original_shapes

PROG = "python -m converter.synthetic"
CLIP_SIZE = (240, 320)  # a clip's frame height and width: 240p, as the Kinetics clips are stored

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
    from converter.export import torch_save  # a full disk as the OSError it is

    with _yacs_cfgnode_importable() as cfgnode:
        config = cfgnode(
            MODEL=cfgnode(ARCH=f"ViT-?/{hyper.patch_size}", DROP_PATH_RATE=0.0, FIX_TEXT=True),
            DATA=cfgnode(NUM_FRAMES=hyper.frames, INPUT_SIZE=hyper.image_size),
            TRAIN=cfgnode(EPOCHS=30, LR=8e-6),
        )
        torch_save(
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
            Path(path),
        )


def make_clip(frames: int, seed: int = 0) -> np.ndarray:
    """`frames` seeded random RGB frames, [T, H, W, 3] uint8: a clip `--video` and the card's usage read."""
    return np.random.default_rng(seed).integers(0, 256, (frames, *CLIP_SIZE, 3), dtype=np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write a synthetic checkpoint of a published X-CLIP variant in its original training "
        "layout: seeded random weights, so that converting, loading and classifying can be tried with no "
        "network. Its predictions mean nothing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model_name", metavar="MODEL_NAME", help=f"one of: {', '.join(VARIANTS)}")
    parser.add_argument("file", metavar="FILE", type=Path, help="the checkpoint to write, e.g. k400_32_8.pth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (and the clip)")
    parser.add_argument("--clip", metavar="FILE.npy", type=Path, help="also write a clip of random frames")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE (and the clip) if they exist")
    args = parser.parse_args(argv)
    from converter.export import Interrupted, signals_as_exceptions

    try:
        with signals_as_exceptions():
            variant = _write(args)
    except ConverterError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions
        where = f"{escape(str(err.filename))}: " if err.filename else ""
        print(f"{PROG}: error: {where}{err.strerror or err}; nothing was written", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"{PROG}: {err}; nothing was written", file=sys.stderr)
        return err.exit_code
    megabytes = args.file.stat().st_size / 1e6
    print(
        f"wrote {escape(str(args.file))}: a synthetic {variant.name} checkpoint ({megabytes:,.0f} MB): "
        f"seeded random weights (--seed {args.seed}) in the original training layout, not the released "
        "weights, so its predictions mean nothing"
    )
    if args.clip:
        print(
            f"wrote {escape(str(args.clip))}: {variant.frames} random RGB frames, "
            f"{CLIP_SIZE[1]}x{CLIP_SIZE[0]}"
        )
    video = f" --video {escape(str(args.clip))}" if args.clip else ""
    print(
        f"next, with no network: xclip-convert --checkpoint {escape(str(args.file))} "
        f"--model-name {variant.name} --output out{video}"
    )
    return 0


def _write(args: argparse.Namespace) -> Variant:
    """Both files checked against the path policy before any work, then each written whole."""
    from converter import paths
    from converter.export import staged_file

    variant = get_variant(args.model_name)
    targets = [("FILE", args.file)]
    if args.clip is not None:
        if args.clip.suffix != ".npy":
            raise ConverterError(
                f"--clip {escape(str(args.clip))}: name it FILE.npy (a NumPy array of frames)"
            )
        if args.clip.resolve() == args.file.resolve():
            raise ConverterError("FILE and --clip name the same file: give them different names")
        targets.append(("--clip", args.clip))
    for flag, target in targets:
        paths.check_target(target, kind="file", overwrite=args.overwrite, protected=paths.caches(), flag=flag)
    hyper = hyper_for_variant(variant)
    with staged_file(args.file, args.overwrite, paths.caches(), flag="FILE") as partial:
        save_training_layout(partial, make_state_dict(hyper, seed=args.seed), hyper)
    if args.clip is not None:
        with staged_file(args.clip, args.overwrite, paths.caches(), flag="--clip") as partial:
            with open(partial, "wb") as fh:  # np.save given a name would add .npy to the partial's
                np.save(fh, make_clip(hyper.frames, args.seed))
    return variant


if __name__ == "__main__":
    sys.exit(main())
