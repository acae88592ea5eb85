"""End-to-end conversion benchmark on full-size synthetic X-CLIP checkpoints.

What it measures, per model (default: xclip-base-patch32, ~786 MB, and xclip-large-patch14-16-frames,
~2.3 GB; each checkpoint is generated once, in a subprocess, in the original trainer's layout):

  copy     shutil.copyfile of the checkpoint (then deleted)                  -- the I/O floor
  floor    python -c "import torch; from transformers import XCLIPConfig"    -- the interpreter floor
  convert  xclip-convert --checkpoint CKPT --no-verify --output OUT --overwrite
  old      the OLD conversion script's steps: random-init XCLIPModel, full (non-mmap) torch.load,
           key mapping + a copy of every tensor, a SECOND random-init XCLIPModel, load_state_dict,
           save_pretrained

Every measurement runs in a FRESH process, started by a fresh tiny wrapper that times the command and
reports `getrusage(RUSAGE_CHILDREN).ru_maxrss`, i.e. that one process's own peak RSS. Steps and models
are interleaved round-robin (copy, floor, convert, old, copy, ... for each model, per round) so machine
noise hits them alike; one warm-up round is discarded, then `--repeats` rounds are measured and the
medians reported. Dirty pages are flushed (os.sync, untimed) before each measurement, so write-back of
an earlier step's output is not billed to the next. Wall time includes interpreter start and exit.

Verification cost (unless --skip-forward): one fresh process per model loads the checkpoint, builds the
converted XCLIPModel (build_model on original_to_hf of the same state dict, eval, no_grad) and times the
oracle `original_forward` against `XCLIPModel.forward` on `synthetic_inputs` (1 video, 3 texts),
alternating oracle/HF, after one warm-up of each, with torch.set_num_threads(2). The number of measured
pairs is --repeats, capped by --forward-budget seconds per model (at least one pair): one
large-patch14-16-frames forward takes ~40 s on 2 cores, so it gets one measured pair by default.

Targets (PASS/FAIL printed and written to the JSON):
  (convert - floor) / copy                       <= 2      (time)
  old / convert                                  >= 2.5    base-patch32,  >= 4  large-patch14-16-frames
  (convert peak RSS - floor peak RSS) / ckpt size <= 1.25
  oracle forward / HF forward                    <= 1.3

Usage:
  python benchmarks/bench_convert.py [--models NAME ...] [--repeats 3] [--json out.json]
                                     [--workdir DIR] [--skip-forward] [--forward-budget S]
                                     [--keep-checkpoints]

Checkpoints already in --workdir are reused; generated ones are deleted at the end unless
--keep-checkpoints. Default workdir: a new /tmp/xclip-bench-* folder, removed at the end.
Takes ~8-10 min for the two default models on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

DEFAULT_MODELS = ("xclip-base-patch32", "xclip-large-patch14-16-frames")
STEPS = ("copy", "floor", "convert", "old")
THIS = Path(__file__).resolve()
REPO = THIS.parent.parent

OLD_OVER_CONVERT_TARGETS = {"xclip-base-patch32": 2.5, "xclip-large-patch14-16-frames": 4.0}
OLD_OVER_CONVERT_DEFAULT = 2.5
CONVERT_OVER_COPY_TARGET = 2.0
RSS_OVER_SIZE_TARGET = 1.25
ORACLE_OVER_HF_TARGET = 1.3

# Runs ONE command as its only child and prints its wall time and its peak RSS as JSON. Because this
# wrapper is fresh and has exactly one child, RUSAGE_CHILDREN's ru_maxrss is that child's own peak
# (Linux: KiB), not a maximum over earlier measurements. The wrapper itself is tiny, so the RSS a
# child inherits before exec() does not inflate the number.
_WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
wall = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
kib, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
tail = p.stdout.decode(errors="replace")[-3000:] if p.returncode else ""
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "maxrss_kib": kib, "rc": p.returncode, "tail": tail}))
"""

_COPY = "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])"
# What every conversion needs loaded: torch for the tensors, transformers for the XCLIPConfig it writes.
# (`--no-verify` never imports transformers' modelling or processor code; see converter/export.py.)
_FLOOR = "import torch; from transformers import XCLIPConfig"


# ---- helpers -----------------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _convert_command() -> list[str]:
    """The installed console script, run by this interpreter (not through a pyenv/shell shim)."""
    script = Path(sysconfig.get_path("scripts")) / "xclip-convert"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "converter"]


def measure(cmd: list[str]) -> dict:
    """Wall time and own peak RSS of `cmd`, run in a fresh process under a fresh wrapper."""
    # Flush dirty pages first (untimed), so write-back of an earlier step's output is not billed to
    # this one: each step writes 0.8-2.3 GB and the kernel's dirty thresholds are a few GB.
    os.sync()
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=_child_env(), check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result['rc']}:\n{result['tail']}")
    return {"wall_s": result["wall_s"], "cpu_s": result["cpu_s"], "rss_mb": result["maxrss_kib"] * 1024 / 1e6}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ---- worker modes (each runs in its own fresh process) ------------------------------------------


def generate_checkpoint(model: str, path: Path) -> None:
    """Write a full-size seeded synthetic checkpoint in the original trainer's layout."""
    from converter.config import hyper_for_variant
    from converter.registry import VARIANTS
    from converter.synthetic import make_state_dict, save_training_layout

    hyper = hyper_for_variant(VARIANTS[model])
    partial = path.with_name(path.name + ".partial")
    save_training_layout(partial, make_state_dict(hyper, seed=0), hyper)
    partial.rename(path)


def old_pipeline(model: str, checkpoint: Path, output: Path) -> None:
    """The steps of the OLD conversion script (transformers' convert_x_clip_original_pytorch_to_hf)."""
    import torch
    from transformers import XCLIPModel

    from converter.config import hyper_for_variant, to_config
    from converter.load import ALLOWED_GLOBALS
    from converter.registry import VARIANTS
    from converter.rules import original_to_hf

    config = to_config(hyper_for_variant(VARIANTS[model]))
    model_1 = XCLIPModel(config)  # the old script's first, random-init model
    model_1.eval()
    # The old script did a full torch.load(weights_only=False). The file holds a yacs CfgNode, so we
    # read it weights-only with the converter's stand-in allow-list instead, but still WITHOUT mmap:
    # every tensor is read into anonymous memory, as the old full load did.
    with torch.serialization.safe_globals(ALLOWED_GLOBALS):
        checkpoint_obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state_dict = checkpoint_obj["model"]
    # The old string-replace mapping built a new dict of copies.
    converted = {k: v.clone() for k, v in original_to_hf(state_dict).items()}
    model_2 = XCLIPModel(config)  # the old script's second random-init model
    model_2.load_state_dict(converted, strict=True)
    model_2.eval()
    model_2.save_pretrained(output)
    del model_1


def forward_worker(model: str, checkpoint: Path, repeats: int, budget_s: float, result_path: Path) -> None:
    """Time the oracle vs the converted XCLIPModel's forward, alternating, after a warm-up of each.

    Measured pairs: `repeats`, capped so that they take about `budget_s` (at least one pair); a
    large-patch14-16-frames forward takes ~40 s on 2 cores.
    """
    import torch

    from converter.build import build_model
    from converter.config import hyper_for_variant, to_config
    from converter.convert import oracle_heads
    from converter.load import load_checkpoint
    from converter.oracle import original_forward
    from converter.registry import VARIANTS
    from converter.rules import original_to_hf
    from converter.verify import synthetic_inputs

    torch.set_num_threads(2)
    hyper = hyper_for_variant(VARIANTS[model])
    original = load_checkpoint(checkpoint)
    hf_model = build_model(to_config(hyper), original_to_hf(original)).eval()
    pixel_values, input_ids = synthetic_inputs(hyper)
    heads = oracle_heads(hyper)

    def run_oracle() -> torch.Tensor:
        return original_forward(original, pixel_values, input_ids, heads=heads)["logits"]

    def run_hf() -> torch.Tensor:
        with torch.no_grad():
            return hf_model(input_ids=input_ids, pixel_values=pixel_values).logits_per_video

    def timed(fn) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    warm = {"oracle": timed(run_oracle)[0], "hf": timed(run_hf)[0]}
    pairs = max(1, min(repeats, int(budget_s // (warm["oracle"] + warm["hf"]))))
    times: dict[str, list[float]] = {"oracle": [], "hf": []}
    max_diff = 0.0
    for _ in range(pairs):
        t_o, logits_o = timed(run_oracle)
        t_h, logits_h = timed(run_hf)
        times["oracle"].append(t_o)
        times["hf"].append(t_h)
        max_diff = max(max_diff, (logits_o - logits_h).abs().max().item())
    result_path.write_text(
        json.dumps({"warmup_s": warm, "pairs": pairs, "times_s": times, "max_abs_logit_diff": max_diff})
    )


# ---- the benchmark -------------------------------------------------------------------------------


def ensure_checkpoint(model: str, workdir: Path) -> tuple[Path, bool]:
    """Return (path, generated_now); generation runs in a subprocess to keep this process small."""
    path = workdir / f"{model}.pth"
    if path.is_file():
        return path, False
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(THIS), "--generate", model, str(path)], check=True, env=_child_env())
    size = path.stat().st_size / 1e6
    print(f"generated {path} ({size:.0f} MB) in {time.perf_counter() - t0:.1f} s", flush=True)
    return path, True


def step_command(step: str, model: str, checkpoint: Path, scratch: Path) -> list[str]:
    if step == "copy":
        return [sys.executable, "-c", _COPY, str(checkpoint), str(scratch)]
    if step == "floor":
        return [sys.executable, "-c", _FLOOR]
    if step == "convert":
        return [
            *_convert_command(),
            "--checkpoint",
            str(checkpoint),
            "--no-verify",
            "--output",
            str(scratch),
            "--overwrite",
        ]
    if step == "old":
        return [sys.executable, str(THIS), "--old-pipeline", model, str(checkpoint), str(scratch)]
    raise ValueError(step)


def run_rounds(models: list[str], checkpoints: dict[str, Path], repeats: int, workdir: Path) -> dict:
    samples: dict[str, dict[str, list[dict]]] = {m: {s: [] for s in STEPS} for m in models}
    for round_no in range(repeats + 1):
        label = "warm-up" if round_no == 0 else f"round {round_no}/{repeats}"
        for model in models:
            for step in STEPS:
                scratch = workdir / f"scratch-{step}-{model}"
                _remove(scratch)
                try:
                    m = measure(step_command(step, model, checkpoints[model], scratch))
                finally:
                    _remove(scratch)
                print(
                    f"  [{label}] {model:32s} {step:8s} {m['wall_s']:7.2f} s {m['rss_mb']:8.0f} MB",
                    flush=True,
                )
                if round_no > 0:
                    samples[model][step].append(m)
    return samples


def summarise(models: list[str], checkpoints: dict[str, Path], samples: dict) -> dict:
    results = {}
    for model in models:
        size_mb = checkpoints[model].stat().st_size / 1e6
        med = {
            step: {
                "wall_s": statistics.median(s["wall_s"] for s in samples[model][step]),
                "rss_mb": statistics.median(s["rss_mb"] for s in samples[model][step]),
                "cpu_s": statistics.median(s["cpu_s"] for s in samples[model][step]),
            }
            for step in STEPS
        }
        copy_t, floor_t = med["copy"]["wall_s"], med["floor"]["wall_s"]
        conv_t, old_t = med["convert"]["wall_s"], med["old"]["wall_s"]
        old_target = OLD_OVER_CONVERT_TARGETS.get(model, OLD_OVER_CONVERT_DEFAULT)
        ratios = {
            "convert_minus_floor_over_copy": {
                "value": (conv_t - floor_t) / copy_t,
                "target": f"<= {CONVERT_OVER_COPY_TARGET}",
            },
            "old_over_convert": {"value": old_t / conv_t, "target": f">= {old_target}"},
            "convert_rss_minus_floor_over_size": {
                "value": (med["convert"]["rss_mb"] - med["floor"]["rss_mb"]) / size_mb,
                "target": f"<= {RSS_OVER_SIZE_TARGET}",
            },
        }
        ratios["convert_minus_floor_over_copy"]["pass"] = (
            ratios["convert_minus_floor_over_copy"]["value"] <= CONVERT_OVER_COPY_TARGET
        )
        ratios["old_over_convert"]["pass"] = ratios["old_over_convert"]["value"] >= old_target
        ratios["convert_rss_minus_floor_over_size"]["pass"] = (
            ratios["convert_rss_minus_floor_over_size"]["value"] <= RSS_OVER_SIZE_TARGET
        )
        cpu = {step: med[step]["cpu_s"] for step in STEPS}
        results[model] = {
            "checkpoint_mb": size_mb,
            "samples": samples[model],
            "median": med,
            "ratios": ratios,
            # Informational, no target: the same ratio in CPU seconds (user + sys), which other load
            # on the machine inflates much less than wall time.
            "info_cpu_convert_minus_floor_over_copy": (cpu["convert"] - cpu["floor"]) / cpu["copy"],
        }
    return results


def run_forward(
    models: list[str], checkpoints: dict[str, Path], repeats: int, budget_s: float, workdir: Path
) -> dict:
    out = {}
    for model in models:
        result_path = workdir / f"forward-{model}.json"
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                str(THIS),
                "--forward-worker",
                model,
                str(checkpoints[model]),
                str(repeats),
                str(budget_s),
                str(result_path),
            ],
            check=True,
            env=_child_env(),
        )
        data = json.loads(result_path.read_text())
        result_path.unlink()
        oracle = statistics.median(data["times_s"]["oracle"])
        hf = statistics.median(data["times_s"]["hf"])
        data["median_s"] = {"oracle": oracle, "hf": hf}
        ratio = oracle / hf
        data["ratio_oracle_over_hf"] = {
            "value": ratio,
            "target": f"<= {ORACLE_OVER_HF_TARGET}",
            "pass": ratio <= ORACLE_OVER_HF_TARGET,
        }
        out[model] = data
        print(
            f"  forward {model:32s} oracle {oracle:6.2f} s  HF {hf:6.2f} s  ({data['pairs']} pairs, "
            f"process {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return out


def print_report(results: dict, forward: dict | None) -> None:
    print()
    print("Medians (wall time s / peak RSS MB):")
    header = f"{'model':32s} {'ckpt MB':>8s} " + " ".join(f"{s:>17s}" for s in STEPS)
    print(header)
    print("-" * len(header))
    for model, r in results.items():
        cells = " ".join(f"{r['median'][s]['wall_s']:7.2f}s {r['median'][s]['rss_mb']:7.0f}MB" for s in STEPS)
        print(f"{model:32s} {r['checkpoint_mb']:8.0f} {cells}")
    print()
    print("Ratios:")
    names = {
        "convert_minus_floor_over_copy": "(convert - floor) / copy        [time]",
        "old_over_convert": "old / convert                   [time]",
        "convert_rss_minus_floor_over_size": "(convert RSS - floor RSS) / size",
    }
    for model, r in results.items():
        for key, label in names.items():
            ratio = r["ratios"][key]
            print(
                f"  {model:32s} {label:40s} {ratio['value']:6.2f}  target {ratio['target']:7s} "
                f"{_verdict(ratio['pass'])}"
            )
    for model, r in results.items():
        print(
            f"  {model:32s} {'(info) same in CPU s (user+sys)':40s} "
            f"{r['info_cpu_convert_minus_floor_over_copy']:6.2f}  (no target; robust to other load)"
        )
    if forward:
        for model, f in forward.items():
            ratio = f["ratio_oracle_over_hf"]
            print(
                f"  {model:32s} {'oracle / HF forward':40s} {ratio['value']:6.2f}  "
                f"target {ratio['target']:7s} {_verdict(ratio['pass'])}   "
                f"(oracle {f['median_s']['oracle']:.2f} s, "
                f"HF {f['median_s']['hf']:.2f} s, max |Δlogits| {f['max_abs_logit_diff']:.1e})"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME")
    p.add_argument("--repeats", type=int, default=3, help="measured rounds after one warm-up round")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="results file (default: bench-results.json in --workdir, else in the current folder)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new one in /tmp)")
    p.add_argument("--skip-forward", action="store_true", help="skip the oracle vs HF forward timing")
    p.add_argument(
        "--forward-budget",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds per model for the measured forward pairs (at most --repeats, at least 1; default 120)",
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the generated checkpoints")
    # Internal worker modes, each run in a fresh process by the benchmark itself.
    p.add_argument("--generate", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--old-pipeline", nargs=3, metavar=("MODEL", "CKPT", "OUT"), help=argparse.SUPPRESS)
    p.add_argument(
        "--forward-worker", nargs=5, metavar=("MODEL", "CKPT", "N", "BUDGET", "OUT"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)

    if args.generate:
        generate_checkpoint(args.generate[0], Path(args.generate[1]))
        return 0
    if args.old_pipeline:
        model, ckpt, out = args.old_pipeline
        old_pipeline(model, Path(ckpt), Path(out))
        return 0
    if args.forward_worker:
        model, ckpt, n, budget, out = args.forward_worker
        forward_worker(model, Path(ckpt), int(n), float(budget), Path(out))
        return 0

    sys.path.insert(0, str(REPO))
    from converter.registry import VARIANTS

    unknown = [m for m in args.models if m not in VARIANTS]
    if unknown:
        p.error(f"unknown model(s): {', '.join(unknown)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="xclip-bench-", dir="/tmp")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    json_path = args.json or ((Path.cwd() if own_workdir else workdir) / "bench-results.json")
    started = time.perf_counter()
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(
            f"warning: load average {load_before[0]:.2f} before start: wall times will be noisy", flush=True
        )
    generated: list[Path] = []
    try:
        checkpoints = {}
        for model in args.models:
            checkpoints[model], new = ensure_checkpoint(model, workdir)
            if new:
                generated.append(checkpoints[model])
        print(f"conversion rounds: 1 warm-up + {args.repeats} measured, steps {', '.join(STEPS)}", flush=True)
        samples = run_rounds(args.models, checkpoints, args.repeats, workdir)
        results = summarise(args.models, checkpoints, samples)
        forward = None
        if not args.skip_forward:
            print("forward timing (oracle vs HF), 1 warm-up each + alternating repeats:", flush=True)
            forward = run_forward(args.models, checkpoints, args.repeats, args.forward_budget, workdir)
        print_report(results, forward)
        all_pass = all(r["pass"] for m in results.values() for r in m["ratios"].values()) and all(
            f["ratio_oracle_over_hf"]["pass"] for f in (forward or {}).values()
        )
        payload = {
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "versions": _versions(),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
            },
            "repeats": args.repeats,
            "convert_command": _convert_command(),
            "conversion": results,
            "forward": forward,
            "all_pass": all_pass,
            "benchmark_wall_s": time.perf_counter() - started,
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2))
        print(
            f"\nall targets: {_verdict(all_pass)}; results in {json_path} "
            f"(benchmark took {payload['benchmark_wall_s']:.0f} s)"
        )
        return 0
    finally:
        if not args.keep_checkpoints:
            for path in generated:
                path.unlink(missing_ok=True)
        if own_workdir and not args.keep_checkpoints:
            shutil.rmtree(workdir, ignore_errors=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "?"
    return out


if __name__ == "__main__":
    sys.exit(main())
