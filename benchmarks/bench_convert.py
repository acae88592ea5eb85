"""Conversion benchmark on full-size synthetic X-CLIP checkpoints; exits 1 when a target is missed.

Per model (default xclip-base-patch32, 786 MB, and xclip-large-patch14-16-frames, 2.3 GB, generated in
the original trainer's layout), each command runs in a fresh process; the commands alternate (copy,
floor, convert, old, per model, per round); one warm-up round is dropped, then medians over --repeats
rounds of wall time, CPU time (user + sys) and the process's own peak RSS:

  copy     copy the checkpoint file                               -- the I/O floor
  floor    import torch; from transformers import XCLIPConfig     -- the interpreter floor
  convert  python -m converter --checkpoint CKPT --output OUT --no-verify --overwrite
  old      the old conversion script's steps (see old_pipeline)

Then, unless --skip-forward, one fresh process per model times the oracle's forward against the
converted XCLIPModel's on converter.verify's synthetic inputs, alternating, after a warm-up of each.
Ratios taken side by side in one run are what count: the machine's speed and load vary, ratios much less.

Exit status: 0 every target in TARGETS met, 1 a target missed (each one printed), 2 a command failed.
Usage: python benchmarks/bench_convert.py [--models NAME ...] [--repeats 3] [--json FILE] [--skip-forward]
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

THIS = Path(__file__).resolve()
REPO = THIS.parent.parent
BASE = "xclip-base-patch32"
LARGE = "xclip-large-patch14-16-frames"
DEFAULT_MODELS = (BASE, LARGE)
STEPS = ("copy", "floor", "convert", "old")
FLOOR = "import torch; from transformers import XCLIPConfig"  # what every conversion loads
FORWARD_BUDGET_S = 120.0  # per model: one large-patch14-16-frames forward takes ~40 s on 2 cores


@dataclass(frozen=True)
class Target:
    """The ratio `(a - b) / c` (just `a / c` when b is None) and its bound; no bound: reported only."""

    name: str
    a: str
    b: str | None
    c: str
    op: str | None = None  # "<=" or ">="
    bound: float | None = None
    per_model: dict[str, float] = field(default_factory=dict)  # bounds that differ by model


# Quantities are per-model medians: <step>_s (wall), <step>_cpu_s, <step>_mb (peak RSS), size_mb
# (the checkpoint), oracle_s and hf_s (None with --skip-forward: their targets are skipped).
TARGETS = (
    Target("(convert - floor) / copy", "convert_s", "floor_s", "copy_s", "<=", 2.0, {BASE: 1.5}),
    Target("old / convert", "old_s", None, "convert_s", ">=", 2.5, {BASE: 3.0, LARGE: 4.0}),
    Target("(convert RSS - floor RSS) / size", "convert_mb", "floor_mb", "size_mb", "<=", 1.25, {BASE: 1.1}),
    Target("oracle / HF forward", "oracle_s", None, "hf_s", "<=", 1.3),
    # The first ratio in CPU seconds: there the write cannot hide behind the imports on a second thread.
    Target("(convert - floor) / copy, CPU s", "convert_cpu_s", "floor_cpu_s", "copy_cpu_s"),
)
_OPS = {"<=": operator.le, ">=": operator.ge}


class BenchmarkError(Exception):
    """A measured command failed: nothing to compare."""


# ---- arithmetic (no timing; tests/test_bench.py drives it with fake numbers) ---------------------


def quantities(size_mb: float, samples: dict[str, list[dict]], forward: dict | None) -> dict:
    """Medians of the measured rounds (and of the forward pairs) under the names TARGETS use."""
    q: dict[str, float | None] = {"size_mb": size_mb, "oracle_s": None, "hf_s": None}
    for step, runs in samples.items():
        for unit in ("s", "cpu_s", "mb"):
            q[f"{step}_{unit}"] = statistics.median(run[unit] for run in runs)
    if forward:
        q["oracle_s"] = statistics.median(forward["oracle"])
        q["hf_s"] = statistics.median(forward["hf"])
    return q


def evaluate(per_model: dict[str, dict]) -> list[dict]:
    """One row per (model, target): the ratio, its bound and whether it is met (None: no bound)."""
    rows = []
    for model, q in per_model.items():
        for t in TARGETS:
            a, c = q[t.a], q[t.c]  # a KeyError here is a typo in TARGETS, not a skipped measurement
            b = q[t.b] if t.b else 0.0
            if None in (a, b, c):
                continue
            bound = t.per_model.get(model, t.bound)
            value = (a - b) / c
            met = _OPS[t.op](value, bound) if t.op else None
            rows.append(
                {"model": model, "target": t.name, "value": value, "op": t.op, "bound": bound, "met": met}
            )
    return rows


def report(per_model: dict[str, dict], rows: list[dict]) -> int:
    """Print a Markdown table (medians and ratios) and each missed target; return the exit status."""
    names = [t.name for t in TARGETS if any(r["target"] == t.name for r in rows)]
    print("\n| model | " + " | ".join(STEPS) + " | " + " | ".join(names) + " |")
    print("|---" * (1 + len(STEPS) + len(names)) + "|")
    for model, q in per_model.items():
        steps = [f"{q[f'{s}_s']:.2f} s, {q[f'{s}_mb']:.0f} MB" for s in STEPS]
        ratios = {r["target"]: _cell(r) for r in rows if r["model"] == model}
        print(f"| {model} | " + " | ".join(steps + [ratios.get(n, "-") for n in names]) + " |")
    missed = [r for r in rows if r["met"] is False]
    for r in missed:
        print(f"MISSED {r['model']}: {r['target']} = {r['value']:.2f}, target {r['op']} {r['bound']:g}")
    print("all targets met" if not missed else f"{len(missed)} target(s) missed")
    return 1 if missed else 0


def _cell(row: dict) -> str:
    if row["op"] is None:
        return f"{row['value']:.2f}"
    symbol = {"<=": "≤", ">=": "≥"}[row["op"]]
    return f"**{row['value']:.2f}** ({symbol} {row['bound']:g})" + ("" if row["met"] else " MISSED")


# ---- measurement ---------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def measure(cmd: list[str], log: Path) -> dict[str, float]:
    """Wall time, CPU time and peak RSS of `cmd` in a fresh process.

    os.wait4 returns that one child's own rusage. Its ru_maxrss also counts this process's RSS at the
    fork, so this process never imports torch (its own peak is in the JSON as `parent_rss_mb`).
    """
    os.sync()  # untimed: write-back of the previous step's gigabytes is not billed to this one
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env())
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log.read_text(errors="replace")[-2000:]
        raise BenchmarkError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    # Linux reports ru_maxrss in KiB.
    return {"s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "mb": usage.ru_maxrss * 1024 / 1e6}


def command(step: str, model: str, checkpoint: Path, out: Path) -> list[str]:
    py = sys.executable
    return {
        "copy": [py, "-c", "import shutil, sys; shutil.copyfile(*sys.argv[1:])", str(checkpoint), str(out)],
        "floor": [py, "-c", FLOOR],
        "convert": [py, "-m", "converter", "--checkpoint", str(checkpoint), "--output", str(out)]
        + ["--no-verify", "--overwrite"],
        "old": [py, str(THIS), "--worker", "old", model, str(checkpoint), str(out)],
    }[step]


def collect(models: list[str], repeats: int, skip_forward: bool, workdir: Path) -> dict[str, dict]:
    """Generate the checkpoints, run the alternating rounds and the forward timing: raw numbers per model."""
    checkpoints = {model: workdir / f"{model}.pth" for model in models}
    for model, path in checkpoints.items():
        _worker_run("generate", model, path)
        print(f"generated {path.name} ({path.stat().st_size / 1e6:.0f} MB)", flush=True)
    samples: dict[str, dict[str, list]] = {model: {step: [] for step in STEPS} for model in models}
    out, log = workdir / "out", workdir / "log"
    for round_no in range(repeats + 1):
        label = f"round {round_no}/{repeats}" if round_no else "warm-up"
        for model in models:
            for step in STEPS:
                run = measure(command(step, model, checkpoints[model], out), log)
                _remove(out)
                print(f"  [{label}] {model:30s} {step:8s} {run['s']:7.2f} s {run['mb']:7.0f} MB", flush=True)
                if round_no:
                    samples[model][step].append(run)
    data = {}
    for model, path in checkpoints.items():
        timed = None if skip_forward else _worker_run("forward", model, path, repeats)
        if timed:
            oracle, hf = (", ".join(f"{t:.2f}" for t in timed[k]) for k in ("oracle", "hf"))
            print(f"  forward {model}: oracle {oracle} s, HF {hf} s", flush=True)
        data[model] = {"size_mb": path.stat().st_size / 1e6, "samples": samples[model], "forward": timed}
    return data


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _worker_run(kind: str, *args: object) -> dict | None:
    """Run a worker below in a fresh process; its last stdout line, if any, is JSON."""
    cmd = [sys.executable, str(THIS), "--worker", kind, *map(str, args)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=_env())
    if proc.returncode:
        raise BenchmarkError(f"{' '.join(cmd)} exited {proc.returncode} (its stderr is above)")
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


# ---- workers: each runs in its own fresh process -------------------------------------------------


def generate(model: str, path: str) -> None:
    """A full-size seeded synthetic checkpoint in the original trainer's layout."""
    from converter.config import hyper_for_variant
    from converter.registry import VARIANTS
    from converter.synthetic import make_state_dict, save_training_layout

    hyper = hyper_for_variant(VARIANTS[model])
    save_training_layout(path, make_state_dict(hyper, seed=0), hyper)


def _load_training_file(path: str, mmap: bool) -> dict:
    """torch.load(weights_only=False), as the old script did. The trainer stored a yacs CfgNode in the
    file; yacs is not installed, so a dict subclass stands in for it. The file is our own."""
    import types

    import torch

    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    config.CfgNode = type("CfgNode", (dict,), {})
    sys.modules.setdefault("yacs", yacs)
    sys.modules.setdefault("yacs.config", config)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def old_pipeline(model: str, checkpoint: str, output: str) -> None:
    """The steps of the old conversion script (transformers' convert_x_clip_original_pytorch_to_hf)."""
    from transformers import XCLIPModel

    from converter.config import hyper_for_variant, to_config
    from converter.registry import VARIANTS
    from converter.rules import original_to_hf

    config = to_config(hyper_for_variant(VARIANTS[model]))
    first = XCLIPModel(config).eval()  # the old script's first, random-init model
    state_dict = _load_training_file(checkpoint, mmap=False)["model"]  # every tensor read into memory
    converted = {k: v.clone() for k, v in original_to_hf(state_dict).items()}  # its mapping made copies
    second = XCLIPModel(config)  # and a second random-init model
    second.load_state_dict(converted, strict=True)
    second.eval().save_pretrained(output)
    del first  # held to the end, as the old script held it


def forward(model: str, checkpoint: str, repeats: str) -> None:
    """Print {"oracle": [s, ...], "hf": [s, ...], "max_abs_logit_diff": d}: alternating pairs after a
    warm-up of each; at most `repeats` pairs, as many as fit FORWARD_BUDGET_S, at least one."""
    from converter.build import build_model
    from converter.config import hyper_for_variant, to_config
    from converter.registry import VARIANTS
    from converter.rules import original_to_hf
    from converter.verify import synthetic_inputs
    from tests.helpers import hf_outputs, oracle_outputs

    hyper = hyper_for_variant(VARIANTS[model])
    original = _load_training_file(checkpoint, mmap=True)["model"]
    hf_model = build_model(to_config(hyper), original_to_hf(original)).eval()
    pixel_values, input_ids = synthetic_inputs(hyper)
    runs = {
        "oracle": lambda: oracle_outputs(original, pixel_values, input_ids),
        "hf": lambda: hf_outputs(hf_model, pixel_values, input_ids),
    }

    def timed(name: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        out = runs[name]()
        return time.perf_counter() - t0, out

    warm_up = timed("oracle")[0] + timed("hf")[0]
    times: dict[str, list[float]] = {"oracle": [], "hf": []}
    diff = 0.0
    for _ in range(max(1, min(int(repeats), int(FORWARD_BUDGET_S // warm_up)))):
        (t_oracle, want), (t_hf, got) = timed("oracle"), timed("hf")
        times["oracle"].append(t_oracle)
        times["hf"].append(t_hf)
        diff = max(diff, (want["logits"] - got["logits"]).abs().max().item())
    print(json.dumps({**times, "max_abs_logit_diff": diff}))


WORKERS = {"generate": generate, "old": old_pipeline, "forward": forward}


# ---- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME")
    p.add_argument("--repeats", type=int, default=3, help="measured rounds after one warm-up round")
    p.add_argument("--json", type=Path, help="write every sample, median and ratio to this file")
    p.add_argument("--skip-forward", action="store_true", help="skip the oracle vs HF forward timing")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # the benchmark's own child processes
    args = p.parse_args(argv)
    if args.worker:
        WORKERS[args.worker[0]](*args.worker[1:])
        return 0
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    started, load_before = time.perf_counter(), os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="xclip-bench-") as workdir:
            data = collect(args.models, args.repeats, args.skip_forward, Path(workdir))
    except BenchmarkError as err:
        print(f"benchmark failed: {err}", file=sys.stderr)
        return 2
    per_model = {m: quantities(d["size_mb"], d["samples"], d["forward"]) for m, d in data.items()}
    rows = evaluate(per_model)
    status = report(per_model, rows)
    if args.json:
        machine = {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "versions": {name: version(name) for name in ("torch", "transformers", "safetensors")},
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "parent_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
        }
        payload = {
            "machine": machine,
            "repeats": args.repeats,
            "commands": {s: command(s, "MODEL", Path("CKPT"), Path("OUT")) for s in STEPS},
            "targets": [asdict(t) for t in TARGETS],
            "models": {m: {**d, "median": per_model[m]} for m, d in data.items()},
            "results": rows,
            "all_met": status == 0,
            "benchmark_wall_s": time.perf_counter() - started,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        print(f"results in {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
