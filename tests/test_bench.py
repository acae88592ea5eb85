"""The benchmark's arithmetic and verdict on fake timings: medians, ratios, exit 1 per missed target."""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_convert.py"
# BASE: a model under the default bounds; base-patch32 has raised ones (TARGETS' per-model bounds).
BASE, LARGE, RAISED = "xclip-base-patch16", "xclip-large-patch14-16-frames", "xclip-base-patch32"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_convert", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def run(seconds: float, mb: float, cpu: float | None = None) -> dict[str, float]:
    return {"s": seconds, "cpu_s": seconds if cpu is None else cpu, "mb": mb}


def fake(old_s: float, size_mb: float = 1000.0, oracle: tuple = (1.2, 9.0, 1.1)) -> dict:
    """Three rounds per step; the middle value is the median, the outliers must not count."""
    return {
        "size_mb": size_mb,
        "samples": {
            "copy": [run(1.0, 15), run(0.5, 15), run(9.0, 15)],  # median 1.0
            "floor": [run(2.0, 250), run(2.0, 250), run(2.0, 250)],
            "convert": [run(3.0, 1500, cpu=4.0), run(3.5, 1600, cpu=5.0), run(2.5, 1400, cpu=3.0)],
            "old": [run(old_s, 3000), run(old_s, 3000), run(old_s, 3000)],
        },
        "forward": {"oracle": list(oracle), "hf": [1.0, 1.0, 1.0], "max_abs_logit_diff": 1e-6},
    }


def ratios(bench, data: dict) -> dict[tuple[str, str], dict]:
    per_model = {m: bench.quantities(d["size_mb"], d["samples"], d["forward"]) for m, d in data.items()}
    return {(r["model"], r["target"]): r for r in bench.evaluate(per_model)}


def test_ratios_are_the_targets_formulas_over_medians(bench):
    rows = ratios(bench, {BASE: fake(old_s=12.0)})
    # medians: copy 1.0, floor 2.0, convert 3.0 s / 1500 MB / 4.0 CPU s, old 12.0; oracle 1.2, HF 1.0
    assert rows[BASE, "(convert - floor) / copy"]["value"] == pytest.approx(1.0)
    assert rows[BASE, "old / convert"]["value"] == pytest.approx(4.0)
    assert rows[BASE, "(convert RSS - floor RSS) / size"]["value"] == pytest.approx(1.25)
    assert rows[BASE, "oracle / HF forward"]["value"] == pytest.approx(1.2)
    assert rows[BASE, "(convert - floor) / copy, CPU s"]["value"] == pytest.approx(2.0)
    # a bound met exactly is met; the CPU ratio has no bound
    assert rows[BASE, "(convert RSS - floor RSS) / size"]["met"] is True
    assert rows[BASE, "(convert - floor) / copy, CPU s"]["met"] is None


def test_old_over_convert_bound_is_per_model(bench):
    rows = ratios(bench, {BASE: fake(old_s=9.0), LARGE: fake(old_s=9.0)})  # old / convert = 3
    assert (rows[BASE, "old / convert"]["bound"], rows[BASE, "old / convert"]["met"]) == (2.5, True)
    assert (rows[LARGE, "old / convert"]["bound"], rows[LARGE, "old / convert"]["met"]) == (4.0, False)


def test_base_patch32_is_held_to_raised_bounds(bench):
    rows = ratios(bench, {RAISED: fake(old_s=12.0)})  # the fake's ratios: 1.0, 4.0, 1.25
    bounds = {target: (row["bound"], row["met"]) for (_, target), row in rows.items()}
    assert bounds["(convert - floor) / copy"] == (1.5, True)
    assert bounds["old / convert"] == (3.0, True)
    assert bounds["(convert RSS - floor RSS) / size"] == (1.1, False)


def test_skipped_forward_skips_only_its_target(bench):
    data = fake(old_s=12.0)
    data["forward"] = None
    rows = ratios(bench, {BASE: data})
    assert {target for _, target in rows} == {t.name for t in bench.TARGETS} - {"oracle / HF forward"}


def fake_main(bench, monkeypatch, tmp_path, capsys, data: dict) -> tuple[int, str, dict]:
    monkeypatch.setattr(bench, "collect", lambda models, repeats, skip_forward, workdir: data)
    status = bench.main(["--json", str(tmp_path / "r.json")])
    return status, capsys.readouterr().out, json.loads((tmp_path / "r.json").read_text())


def test_missed_targets_exit_1_and_are_named(bench, monkeypatch, tmp_path, capsys):
    # large: old / convert = 3 < 4; base: oracle / HF = 1.4 > 1.3
    data = {BASE: fake(old_s=12.0, oracle=(1.4, 1.4, 1.4)), LARGE: fake(old_s=9.0)}
    status, out, saved = fake_main(bench, monkeypatch, tmp_path, capsys, data)
    assert status == 1
    missed = [line for line in out.splitlines() if line.startswith("MISSED")]
    assert missed == [
        f"MISSED {BASE}: oracle / HF forward = 1.40, target <= 1.3",
        f"MISSED {LARGE}: old / convert = 3.00, target >= 4",
    ]
    assert saved["all_met"] is False


def test_all_targets_met_exit_0(bench, monkeypatch, tmp_path, capsys):
    status, out, saved = fake_main(
        bench, monkeypatch, tmp_path, capsys, {BASE: fake(old_s=12.0), LARGE: fake(old_s=12.0)}
    )
    assert status == 0
    assert "MISSED" not in out and "all targets met" in out
    assert saved["all_met"] is True


def test_each_worker_is_called_with_the_arguments_it_takes(bench, monkeypatch, tmp_path):
    """collect() starts the workers as child processes; a wrong argument list fails only there."""
    calls = []

    def fake_worker_run(kind: str, *args: object) -> dict | None:
        calls.append([kind, *map(str, args)])
        if kind == "generate":
            Path(args[1]).write_bytes(b"checkpoint")
        return {"oracle": [1.0], "hf": [1.0]} if kind == "forward" else None

    def fake_measure(cmd: list[str], log: Path) -> dict[str, float]:
        if "--worker" in cmd:
            calls.append(cmd[cmd.index("--worker") + 1 :])
        return run(1.0, 1.0)

    monkeypatch.setattr(bench, "_worker_run", fake_worker_run)
    monkeypatch.setattr(bench, "measure", fake_measure)
    bench.collect([BASE], 1, False, tmp_path)
    assert sorted({kind for kind, *_ in calls}) == ["forward", "generate", "old"]
    for kind, *args in calls:
        inspect.signature(bench.WORKERS[kind]).bind(*args)  # TypeError if the call and the worker differ
