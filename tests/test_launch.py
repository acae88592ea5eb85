"""The suite as people launch it: from a script with SIGINT ignored, and with pytest's strict options."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent

_GRANDCHILD = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
_CHILD = f"""
import subprocess, sys
import conftest
conftest._interruptible_children()
print(subprocess.run([sys.executable, "-c", {_GRANDCHILD!r}], capture_output=True, text=True).stdout.strip())
"""


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_a_suite_launched_with_sigint_ignored_starts_interruptible_children():
    """`cmd &` from a script or nohup starts pytest with SIGINT ignored; the processes the tests start
    (converter runs they interrupt, xdist workers) must still turn Ctrl-C into KeyboardInterrupt."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ignored = subprocess.run(
        [sys.executable, "-c", _CHILD.replace("conftest._interruptible_children()", "")],
        preexec_fn=_ignore_sigint,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert ignored.stdout.strip() == "False", ignored.stderr  # what the suite would otherwise inherit
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        preexec_fn=_ignore_sigint,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert done.stdout.strip() == "True", done.stderr


def test_collection_passes_strict_markers_and_strict_mode_without_xdist():
    """README recommends `-p no:xdist`; the `xdist_group` marker is registered by the project, and every
    parametrize id is unique (pytest 9's `-o strict=true` refuses duplicates)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
         "--strict-markers", "-o", "strict=true", "tests"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
