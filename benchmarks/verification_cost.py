"""What verifying at every site costs: this tree's converter against a baseline revision's, side by side.

Two figures, each measured in fresh processes, the two converters alternating (which goes first
flips every round), medians over --rounds:

  verify  wall time of `converter.verify.verify` alone on xclip-large-patch14 (a seeded full-size
          synthetic checkpoint; making it, importing and building the model are not timed)
  RSS     peak RSS of `python -m converter --checkpoint CKPT --output OUT` (verification on) for
          xclip-large-patch14-16-frames, a full-size synthetic checkpoint in the trainer's layout

The baseline is `git archive REV converter` unpacked in a temporary folder; each process puts the
converter it measures first on sys.path. Checkpoints and the RSS measurement come from
benchmarks/bench_convert.py. Prints a Markdown table with the ratios new / baseline and exits 1 when
one is above its target.

Usage: python benchmarks/verification_cost.py [--baseline REV] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_convert

THIS = Path(__file__).resolve()
REPO = THIS.parent.parent
BASELINE = "fea12aa"  # before every layer was compared: eight outputs only
TIMED, CONVERTED = "xclip-large-patch14", "xclip-large-patch14-16-frames"
TARGET = 1.10  # new / baseline, for both figures
# `python -m converter ARGS` with the converter in CODE first on sys.path.
RUN_CONVERTER = (
    "import runpy, sys; code, *args = sys.argv[1:]; sys.path.insert(0, code); "
    "sys.argv = ['converter', *args]; runpy.run_module('converter', run_name='__main__', alter_sys=True)"
)


def verify_worker(code: str, variant: str) -> None:
    """Print {"s": seconds of verify()} for `variant`, with the converter in `code`."""
    sys.path.insert(0, code)
    import zlib

    import torch

    from converter.build import build_model
    from converter.config import hyper_for_variant, to_config
    from converter.registry import VARIANTS
    from converter.rules import original_to_hf
    from converter.synthetic import make_state_dict
    from converter.verify import verify

    torch.set_grad_enabled(False)
    hyper = hyper_for_variant(VARIANTS[variant])
    original = make_state_dict(hyper, seed=zlib.crc32(variant.encode()))
    model = build_model(to_config(hyper), original_to_hf(original))
    start = time.perf_counter()
    result = verify(model, original, hyper)
    seconds = time.perf_counter() - start
    assert result.passed, result.summary()
    print(json.dumps({"s": seconds}))


def unpack(rev: str, folder: Path) -> Path:
    """`converter/` as it is at git revision `rev`, in `folder`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "converter"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def collect(baseline: str, rounds: int, workdir: Path) -> dict[str, dict[str, list[float]]]:
    """Per figure and code ("new", "baseline"): one sample per round."""
    codes = {"new": str(REPO), "baseline": str(unpack(baseline, workdir / "baseline"))}
    checkpoint, out, log = workdir / f"{CONVERTED}.pth", workdir / "out", workdir / "log"
    bench_convert._worker_run("generate", CONVERTED, checkpoint)  # a fresh process: this one stays small
    print(f"generated {checkpoint.name} ({checkpoint.stat().st_size / 1e6:.0f} MB)", flush=True)
    samples: dict[str, dict[str, list[float]]] = {"verify_s": {}, "convert_mb": {}}
    for round_no in range(rounds):
        order = list(codes) if round_no % 2 == 0 else list(reversed(codes))
        for label in order:
            code = codes[label]
            bench_convert.measure([sys.executable, str(THIS), "--worker", code, TIMED], log)
            seconds = json.loads(log.read_text().strip().splitlines()[-1])["s"]
            convert = [sys.executable, "-c", RUN_CONVERTER, code, "--checkpoint", str(checkpoint)]
            run = bench_convert.measure([*convert, "--output", str(out), "--overwrite", "-q"], log)
            bench_convert._remove(out)
            samples["verify_s"].setdefault(label, []).append(seconds)
            samples["convert_mb"].setdefault(label, []).append(run["mb"])
            figures = f"verify {seconds:6.1f} s, conversion peak RSS {run['mb']:6.0f} MB"
            print(f"  [round {round_no + 1}/{rounds}] {label:8s} {figures}", flush=True)
    return samples


def report(samples: dict[str, dict[str, list[float]]], baseline: str) -> tuple[str, bool]:
    """A Markdown table of the medians and ratios; whether every ratio meets TARGET."""
    figures = {
        "verify_s": (f"verify wall time, {TIMED}", "s", "{:.1f}"),
        "convert_mb": (f"peak RSS of a verifying conversion, {CONVERTED}", "MB", "{:.0f}"),
    }
    lines = [
        f"| figure | baseline ({baseline}) | this tree | this tree / baseline | target |",
        "|---|---|---|---|---|",
    ]
    met = True
    for key, (label, unit, fmt) in figures.items():
        old, new = (statistics.median(samples[key][code]) for code in ("baseline", "new"))
        ratio = new / old
        met &= ratio <= TARGET
        cell = f"**{ratio:.3f}**" + ("" if ratio <= TARGET else " MISSED")
        lines.append(
            f"| {label} | {fmt.format(old)} {unit} | {fmt.format(new)} {unit} | {cell} | ≤ {TARGET} |"
        )
    rounds = len(samples["verify_s"]["new"])
    lines.append(f"\nMedians of {rounds} alternating rounds, each in fresh processes.")
    return "\n".join(lines), met


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--baseline", default=BASELINE, metavar="REV", help=f"git revision to compare with ({BASELINE})"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="write every sample to this file")
    p.add_argument("--worker", nargs=2, metavar=("CODE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        verify_worker(*args.worker)
        return 0
    try:
        with tempfile.TemporaryDirectory(prefix="xclip-verification-cost-") as workdir:
            (Path(workdir) / "baseline").mkdir()
            samples = collect(args.baseline, args.rounds, Path(workdir))
    except bench_convert.BenchmarkError as err:
        print(f"benchmark failed: {err}", file=sys.stderr)
        return 2
    table, met = report(samples, args.baseline)
    print(f"\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"baseline": args.baseline, "samples": samples}, indent=1) + "\n")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
