"""Synthetic checkpoints of the published variants in the original training layout, for a first
conversion offline (``python -m converter.synthetic xclip-base-patch32 k400_32_8.pth --clip clip.npy``)
and for the tests. Keys and shapes come from `converter.rules`; the seeded random weights are scaled
like a trained CLIP so outputs are not degenerate, but its predictions mean nothing.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import types
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from converter import paths
from converter.cli import exit_with, run_job, say
from converter.errors import ConverterError, escape
from converter.export import staged_file, torch_save
from converter.registry import VARIANTS, get_variant

if TYPE_CHECKING:  # torch and numpy imported when used: a Ctrl-C while they load is then an Interrupted
    import numpy as np
    import torch

    from converter.config import Hyper

PROG = "python -m converter.synthetic"
CLIP_SIZE = (240, 320)  # a clip's frame height and width: 240p, as the Kinetics clips are stored
StateDict = dict[str, "torch.Tensor"]


def _init(key: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    import torch

    if key == "logit_scale":
        return torch.tensor(math.log(100.0))
    if key == "prompts_generator.alpha":
        return torch.full(shape, 0.1) + 0.01 * torch.randn(shape, generator=gen)
    if key.endswith(".weight") and any(p in key for p in ("ln_", "_ln.", "norm")):
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    if key.endswith("bias"):  # .bias and .in_proj_bias
        return 0.01 * torch.randn(shape, generator=gen)
    if "embedding" in key:
        return 0.02 * torch.randn(shape, generator=gen)
    # A projection used as x @ P has its input dimension first; Linear [out, in] and conv [out, c, p, p] last.
    projection = key in ("visual.proj", "text_projection", "prompts_visual_proj")
    fan_in = shape[0] if projection else math.prod(shape[1:])
    return torch.randn(shape, generator=gen) * fan_in**-0.5


def make_state_dict(hyper: Hyper, seed: int = 0) -> StateDict:
    """A seeded float32 original state dict with every key of `hyper`'s layout, no zeros."""
    import torch

    from converter.rules import original_shapes

    gen = torch.Generator().manual_seed(seed)
    return {k: _init(k, shape, gen) for k, shape in original_shapes(hyper).items()}


@contextmanager
def _yacs_cfgnode():
    """The trainer's config class, `yacs.config.CfgNode`; without yacs, a dict subclass under its name."""
    if "yacs.config" in sys.modules:
        yield sys.modules["yacs.config"].CfgNode
        return
    module = types.ModuleType("yacs.config")
    module.CfgNode = type("CfgNode", (dict,), {"__module__": "yacs.config"})
    sys.modules.update({"yacs": types.ModuleType("yacs"), "yacs.config": module})
    try:
        yield module.CfgNode
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]


def save_training_layout(path: str | Path, state_dict: StateDict, hyper: Hyper) -> None:
    """Save like the original trainer: model, optimizer, lr_scheduler, max_accuracy, epoch, config."""
    with _yacs_cfgnode() as cfgnode:
        config = cfgnode(
            MODEL=cfgnode(ARCH=f"ViT-?/{hyper.patch_size}", DROP_PATH_RATE=0.0, FIX_TEXT=True),
            DATA=cfgnode(NUM_FRAMES=hyper.frames, INPUT_SIZE=hyper.image_size),
            TRAIN=cfgnode(EPOCHS=30, LR=8e-6),
        )
        trainer_state = {
            "model": state_dict,
            "optimizer": {"state": {}, "param_groups": [{"lr": 8e-6, "weight_decay": 0.001, "params": [0]}]},
            "lr_scheduler": {"t_initial": 30, "lr_min": 8e-8, "warmup_t": 5},
            "max_accuracy": 80.0,
            "epoch": 29,
            "config": config,
        }
        torch_save(trainer_state, Path(path))  # a full disk fails as the OSError it is


def make_clip(frames: int, seed: int = 0) -> np.ndarray:
    """`frames` seeded random RGB frames, [T, H, W, 3] uint8: a clip `--video` and the card's usage read."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (frames, *CLIP_SIZE, 3), dtype=np.uint8)


def _seed(text: str) -> int:
    """A seed both torch and numpy take: a whole number from 0 to 2**63 - 1."""
    if not (text.isdigit() and int(text) < 1 << 63):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to 2**63 - 1")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write a checkpoint of a published X-CLIP variant in its original training layout, with "
        "seeded random weights: converting and classifying can be tried offline; predictions mean nothing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model_name", metavar="MODEL_NAME", help=f"one of: {', '.join(VARIANTS)}")
    # FILE and --clip are kept as given: Path() would drop a trailing slash, which names a folder.
    parser.add_argument("file", metavar="FILE", help="the checkpoint to write, e.g. k400_32_8.pth")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the random weights (and the clip)")
    parser.add_argument("--clip", metavar="FILE.npy", help="also write a clip of random frames")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE (and the clip) if they exist")
    args = parser.parse_args(argv)
    return run_job(lambda: _write(args), PROG)


def _write(args: argparse.Namespace) -> int:
    """Both files staged before any work (refused then if they cannot be written), and moved into place
    only when both were written whole; the next command printed."""
    import numpy as np

    from converter.config import hyper_for_variant

    variant, clip, protected = get_variant(args.model_name), args.clip, paths.caches()
    if clip is not None:
        if Path(clip).suffix != ".npy":
            raise ConverterError(f"--clip {escape(clip)}: name it FILE.npy (a NumPy array of frames)")
        if Path(clip).resolve() == Path(args.file).resolve():
            raise ConverterError("FILE and --clip name the same file: give them different names")
    hyper = hyper_for_variant(variant)
    clip_staged = staged_file(clip, args.overwrite, protected, flag="--clip") if clip else nullcontext()
    # Nested, so FILE's failure removes the clip; and the clip, written first, fails before FILE's work.
    with clip_staged as clip_file:
        if clip_file is not None:
            frames = io.BytesIO()  # np.save into a file reports a full disk without its errno
            np.save(frames, make_clip(hyper.frames, args.seed))
            clip_file.write_bytes(frames.getbuffer())
        with staged_file(args.file, args.overwrite, protected, flag="FILE") as partial:
            save_training_layout(partial, make_state_dict(hyper, seed=args.seed), hyper)
    file, megabytes = escape(args.file), Path(args.file).stat().st_size / 1e6
    say(
        f"wrote {file}: a synthetic {variant.name} checkpoint ({megabytes:,.0f} MB): "
        f"seeded random weights (--seed {args.seed}), not the released ones, so its predictions mean nothing"
    )
    command = f"xclip-convert --checkpoint {file} --model-name {variant.name} --output out"
    if clip is not None:
        say(f"wrote {escape(clip)}: {hyper.frames} random RGB frames, {CLIP_SIZE[1]}x{CLIP_SIZE[0]}")
        command += f" --video {escape(clip)}"
    say(f"next, with no network: {command}")
    return 0


if __name__ == "__main__":
    exit_with(main())
