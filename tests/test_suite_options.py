"""The suite's own outputs (--save-dir, --report) go through the converter's path policy: refused
before any test runs when they would replace a device, a FIFO, a file or the user's folder, and
never blocking on a FIFO. Each case runs pytest in a child process, bounded in time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_run(tmp_path: Path, *args: object, **environ: object) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTEST_ADDOPTS": "",
        **{k: str(v) for k, v in environ.items()},
    }
    env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a run blocked on a FIFO fails here instead of hanging the suite
    )


def refused(run: subprocess.CompletedProcess, words: str) -> None:
    assert run.returncode == 4, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])  # usage error
    assert words in run.stderr and "Traceback" not in run.stderr, run.stderr


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "report.md")
    return tmp_path / "report.md"


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "report.md").mkdir()
    return tmp_path / "report.md"


def _file(tmp_path: Path) -> Path:
    (tmp_path / "saved").write_text("notes")
    return tmp_path / "saved"


def _below_a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("x")
    return tmp_path / "afile" / "saved"


@pytest.mark.parametrize(
    ("option", "make", "words"),
    [
        ("--report", _fifo, "is a FIFO: name a file"),
        ("--report", _folder, "is a folder: name a file"),
        ("--save-dir", _file, "is a regular file, not a folder"),
        ("--save-dir", _below_a_file, "afile is a file, not a folder"),
    ],
    ids=["report-fifo", "report-folder", "save-dir-file", "save-dir-below-a-file"],
)
def test_an_output_option_that_cannot_be_written_is_refused_before_any_test(tmp_path, option, make, words):
    target = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    refused(pytest_run(tmp_path, "tests/test_sandbox.py", option, target), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("inside", ["expected", "tests", "conftest.py"])
def test_a_report_over_the_suites_own_inputs_is_refused(tmp_path, inside):
    """The expected outputs, the tests, the suite's configuration: the next gate run reads them."""
    target = ROOT / inside / "r.md" if (ROOT / inside).is_dir() else ROOT / inside
    existed = target.exists()
    try:
        refused(pytest_run(tmp_path, "tests/test_sandbox.py", "--report", target), "the suite's")
    finally:
        if not existed:
            target.unlink(missing_ok=True)


def test_a_report_path_ending_in_a_slash_is_refused(tmp_path):
    refused(
        pytest_run(tmp_path, "tests/test_sandbox.py", "--report", f"{tmp_path}/reports/"), "names a folder"
    )
    assert not (tmp_path / "reports").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_a_device_is_never_replaced_by_the_report(tmp_path):
    refused(pytest_run(tmp_path, "tests/test_sandbox.py", "--report", "/dev/full"), "is a character device")
    assert Path("/dev/full").is_char_device()


def test_the_documented_form_takes_an_existing_folder_outside_the_repository(tmp_path):
    """`--checkpoint-dir=DIR`, as the docs write it: given after a space, pytest takes an existing folder
    for a test path before conftest.py defines the option, and stops with 'unrecognized arguments'."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "saved").mkdir()
    (tmp_path / "report.md").write_text("an earlier report")
    options = [
        f"--{o}={tmp_path / name}"
        for o, name in [("checkpoint-dir", "checkpoints"), ("save-dir", "saved"), ("report", "report.md")]
    ]
    run = pytest_run(tmp_path, "-k", "no_test_has_this_name", *options)
    assert run.returncode == 5, run.stderr[-2000:]  # 5: the options were understood, no test selected
    documented = [
        line
        for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for line in doc.read_text().splitlines()
        if re.match(r"\s*(python -m )?pytest ", line)  # the commands a reader types
    ]
    assert documented and not [
        line for line in documented if re.search(r"--(checkpoint-dir|save-dir|report) ", line)
    ]


def test_a_report_inside_a_cache_is_refused(tmp_path):
    cache = tmp_path / "cache"
    run = pytest_run(tmp_path, "tests/test_sandbox.py", "--report", cache / "r.md", XCLIP_CACHE=cache)
    refused(run, "lies inside the download cache")
    assert not cache.exists()


def test_a_save_dir_model_folder_of_the_users_is_kept(tmp_path):
    mine = tmp_path / "saved" / "xclip-base-patch32"
    mine.mkdir(parents=True)
    (mine / "NOTES.txt").write_text("the user's notes")
    run = pytest_run(
        tmp_path,
        "tests/test_models.py",
        "-k",
        "test_synthetic and xclip-base-patch32",
        "--save-dir",
        tmp_path / "saved",
    )
    assert run.returncode == 1 and "exists and is not empty; remove it or choose another" in run.stdout, (
        run.stdout[-3000:]
    )
    assert sorted(p.name for p in mine.iterdir()) == ["NOTES.txt"]
    assert (mine / "NOTES.txt").read_text() == "the user's notes"


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_a_save_dir_model_path_that_is_not_a_folder_fails_in_one_line(tmp_path, kind):
    mine = tmp_path / "saved" / "xclip-base-patch32"
    mine.parent.mkdir()
    mine.write_text("mine") if kind == "file" else os.mkfifo(mine)
    run = pytest_run(
        tmp_path, "tests/test_models.py::test_synthetic[xclip-base-patch32]", "--save-dir", mine.parent
    )
    words = "is a regular file, not a folder" if kind == "file" else "is a FIFO, not a folder"
    assert run.returncode == 1 and words in run.stdout and "NotADirectoryError" not in run.stdout, run.stdout[
        -3000:
    ]
    assert sorted(p.name for p in mine.parent.iterdir()) == ["xclip-base-patch32"]
    assert kind == "fifo" or mine.read_text() == "mine"


@pytest.mark.parametrize(("make", "words"), [(None, "does not exist"), ("file", "is a regular file")])
def test_a_checkpoint_dir_that_is_not_a_folder_is_refused_before_any_test(tmp_path, make, words):
    """Else every release test skips for want of a checkpoint, and the gate passes on nothing."""
    checkpoints = tmp_path / "checkpoints"
    if make == "file":
        checkpoints.write_text("x")
    run = pytest_run(tmp_path, "tests/test_sandbox.py", "--checkpoint-dir", checkpoints)
    refused(run, f"--checkpoint-dir {checkpoints} {words}: name the folder of checkpoints")
