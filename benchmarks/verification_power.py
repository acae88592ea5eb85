"""The power of verification at full size: by how much each planted mistake fails it.

For every distinct architecture among the 18 published variants (patch, width, frames, image size)
it makes a seeded full-size synthetic original checkpoint, runs the oracle ONCE on the verification
inputs, then for every mistake of `converter.mutations.mistakes` converts with the mistake planted
in the rule table or the config, builds the model and compares its outputs with the oracle's, as
`converter.verify.verify` does. A mistake's margin is the verification's `margin`: the largest
|Δ| / tolerance over the compared outputs (> 1 fails). Mistakes the layout check (keys and shapes
against the config) stops before verification are reported as "layout".

Cost: a mistake that leaves every vision_model weight and the vision config as in the correct
conversion reuses the correct model's vision_model output (the same weights on the same pixels) and
runs the rest of XCLIPModel's forward; every other mistake runs the whole forward.

Usage:
  nice -n 10 python benchmarks/verification_power.py [--variants NAME ...] [--atol A] [--min-margin 10]
                                                     [--json FILE]

Prints one table row per (architecture, mistake) and the smallest margin; exits 1 naming every
mistake whose margin is below --min-margin, or when the correct conversion or a provably harmless
mistake does not pass.

  python benchmarks/verification_power.py --cost-against REV [--variants NAME ...] [--rounds 2]

instead times `verify` (oracle + HF forward) as it is now against converter/verify.py at git revision
REV, on the same model in the same process, alternating, and prints the medians (default: the L/14
variants).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import zlib
from dataclasses import dataclass

import torch

from converter.config import Hyper, hyper_for_variant
from converter.errors import ConverterError
from converter.mutations import HARMLESS, harmless, mistakes, plant
from converter.registry import VARIANTS
from converter.rules import original_to_hf
from converter.synthetic import make_state_dict
from converter.verify import DEFAULT_ATOL, compare, hf_outputs, oracle_outputs, synthetic_inputs

HARMLESS_TAG = "harmless (must pass): "
CORRECT = "(none: the correct conversion)"
VISION_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_mlp")


@dataclass
class Row:
    architecture: str
    variant: str
    mistake: str
    margin: float | None  # None: caught by the layout check
    worst: str
    seconds: float


def architectures() -> dict[str, str]:
    """One variant per distinct (patch, width, frames, image size), named like 'B/32 8f 224'."""
    found: dict[str, str] = {}
    for name, variant in VARIANTS.items():
        a = variant.arch
        key = f"{a.name.removeprefix('ViT-')} w{a.vision_width} {variant.frames}f {variant.image_size}px"
        found.setdefault(key, name)
    return found


def _same_vision(model, reference, hyper: Hyper, planted: Hyper) -> bool:
    if any(getattr(hyper, f) != getattr(planted, f) for f in VISION_FIELDS):
        return False
    ours, theirs = model.vision_model.state_dict(), reference.vision_model.state_dict()
    return ours.keys() == theirs.keys() and all(
        t.data_ptr() == theirs[k].data_ptr()
        and t.shape == theirs[k].shape
        and t.stride() == theirs[k].stride()
        for k, t in ours.items()
    )


def measure(variant: str, atol: float = DEFAULT_ATOL, only: list[str] | None = None, log=print) -> list[Row]:
    """Every planted mistake's margin on a full-size synthetic checkpoint of `variant`."""
    from converter.build import build_model
    from converter.config import to_config

    hyper = hyper_for_variant(VARIANTS[variant])
    arch = next(k for k, v in architectures().items() if v == variant)
    original = make_state_dict(hyper, seed=zlib.crc32(variant.encode()))
    pixel_values, input_ids = synthetic_inputs(hyper)
    start = time.perf_counter()
    expected = oracle_outputs(original, pixel_values, input_ids)
    log(f"# {arch} ({variant}): oracle {time.perf_counter() - start:.1f} s")

    reference = build_model(to_config(hyper), original_to_hf(original))
    vision_out = {}
    hook = reference.vision_model.register_forward_hook(lambda m, a, out: vision_out.setdefault("out", out))
    start = time.perf_counter()
    correct = compare(expected, hf_outputs(reference, pixel_values, input_ids), atol)
    hook.remove()
    rows = [Row(arch, variant, CORRECT, correct.margin, correct.worst,
                time.perf_counter() - start)]  # fmt: skip
    log(_format(rows[-1]))

    planted = mistakes(hyper) + [
        dataclasses.replace(m, name=f"{HARMLESS_TAG}{m.name}") for m in harmless(hyper)
    ]
    built: dict[str, object] = {}  # name -> model, or None when the layout check stops it
    cheap: set[str] = set()  # layout-stopped, or reusing the vision output
    for mistake in planted:
        if only and not any(s in mistake.name for s in only):
            continue
        try:
            model = plant(mistake, original, hyper)
        except ConverterError:
            model = None
            cheap.add(mistake.name)
        else:
            if _same_vision(model, reference, hyper, mistake.hyper or hyper):
                # The same weights on the same pixels: the correct model's vision output, bit for bit.
                model.vision_model.forward = lambda *args, _out=vision_out["out"], **kwargs: _out
                cheap.add(mistake.name)
        built[mistake.name] = model
    # The mistakes that reuse the vision output are cheap: measure them first.
    for name in sorted(built, key=lambda n: n not in cheap):
        start = time.perf_counter()
        model = built[name]
        if model is None:
            rows.append(Row(arch, variant, name, None, "layout", 0.0))
        else:
            result = compare(expected, hf_outputs(model, pixel_values, input_ids), atol)
            rows.append(Row(arch, variant, name, result.margin, result.worst, time.perf_counter() - start))
        log(_format(rows[-1]))
    order = {name: n for n, name in enumerate(built)}
    return [rows[0], *sorted(rows[1:], key=lambda r: order[r.mistake])]


def _format(row: Row) -> str:
    margin = "layout check" if row.margin is None else f"{row.margin:.3g}"
    return f"| {row.architecture} | {row.mistake} | {margin} | {row.worst} | {row.seconds:.1f} s |"


def cost(variant: str, against: str, rounds: int) -> None:
    """Median time of `verify` now and at git revision `against` on the same model, alternating."""
    import statistics
    import subprocess
    import types

    from converter import verify as current
    from converter.build import build_model
    from converter.config import to_config

    source = subprocess.run(
        ["git", "show", f"{against}:converter/verify.py"], capture_output=True, text=True, check=True
    ).stdout
    before = sys.modules["verify_before"] = types.ModuleType("verify_before")  # dataclasses look it up
    exec(compile(source, f"{against}:converter/verify.py", "exec"), before.__dict__)
    hyper = hyper_for_variant(VARIANTS[variant])
    original = make_state_dict(hyper, seed=zlib.crc32(variant.encode()))
    model = build_model(to_config(hyper), original_to_hf(original))
    times: dict[str, list[float]] = {"before": [], "after": []}
    for n in range(rounds):  # alternating which goes first, so a one-time cost falls on both alike
        order = (
            (("before", before), ("after", current)) if n % 2 else (("after", current), ("before", before))
        )
        for label, module in order:
            start = time.perf_counter()
            module.verify(model, original, hyper)
            times[label].append(time.perf_counter() - start)
        print(f"round {n}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items() if v), flush=True)
    old, new = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"{variant}: verify median before ({against}) {old:.1f} s, after {new:.1f} s: {new / old - 1:+.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", help="default: one variant per distinct architecture")
    parser.add_argument("--mistakes", nargs="+", help="only mistakes whose name contains one of these")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL)
    parser.add_argument("--min-margin", type=float, default=10.0)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--cost-against", metavar="REV", help="instead: time verify now vs at git REV")
    parser.add_argument("--rounds", type=int, default=2, help="rounds for --cost-against")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.cost_against:
        for variant in args.variants or ["xclip-large-patch14", "xclip-large-patch14-16-frames"]:
            cost(variant, args.cost_against, args.rounds)
        return 0

    variants = args.variants or list(architectures().values())
    rows: list[Row] = []
    for variant in variants:  # progress on stderr, the table on stdout once complete
        rows += measure(
            variant, args.atol, args.mistakes, log=lambda line: print(line, file=sys.stderr, flush=True)
        )
    print(f"atol {args.atol:g}; margin = max over outputs of |Δ| / (atol x max |original output|)")
    print("| architecture | planted mistake | margin | worst output | time |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(_format(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([row.__dict__ for row in rows], f, indent=1)

    print("\nprovably harmless (not planted):")
    for name, proof in HARMLESS.items():
        print(f"- {name}: {proof}")
    failures = []
    for row in rows:
        must_pass = row.mistake == CORRECT or row.mistake.startswith(HARMLESS_TAG)
        if must_pass and (row.margin is None or row.margin > 1):
            failures.append(f"{row.variant}: {row.mistake} does not pass verification ({row.margin})")
        elif not must_pass and row.margin is not None and row.margin < args.min_margin:
            failures.append(f"{row.variant}: {row.mistake}: margin {row.margin:.3g} < {args.min_margin:g}")
    planted = [
        r
        for r in rows
        if r.mistake != CORRECT and not r.mistake.startswith(HARMLESS_TAG) and r.margin is not None
    ]
    if planted:
        low = min(planted, key=lambda r: r.margin)
        print(f"\nsmallest margin: {low.margin:.3g} ({low.mistake}, {low.variant}, worst output {low.worst})")
    for line in failures:
        print(f"FAIL {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
