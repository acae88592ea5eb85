"""Project-wide pytest setup: the per-model suite's options, torch threads sized for xdist workers, and
Ctrl-C as a terminal gives it to the processes the tests start."""

from __future__ import annotations

import os
import signal
from pathlib import Path

pytest_plugins = ("tests.report",)


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--compat",
        action="store_true",
        help="run the transformers compatibility matrix (tests/test_compat.py): a virtualenv per release",
    )
    group = parser.getgroup("xclip", "X-CLIP per-model verification suite")
    group.addoption(
        "--checkpoint-dir",
        metavar="DIR",
        help="folder of real original checkpoints under their release names (see `xclip-convert --list`)",
    )
    group.addoption(
        "--require-release",
        action="store_true",
        help="fail, instead of skip, a release test whose real checkpoint or clip cannot be had",
    )
    group.addoption(
        "--save-dir",
        metavar="DIR",
        help="save each converted model, as xclip-convert writes it, to DIR/<model-name>",
    )
    group.addoption(
        "--update-expected",
        action="store_true",
        help="with real weights: rewrite expected/<model>.json from the oracle's output, marked confirmed",
    )
    group.addoption(
        "--live-oracle",
        action="store_true",
        help="synthetic tests: run the oracle live for every model and check the stored outputs are current",
    )
    group.addoption(
        "--update-synthetic",
        action="store_true",
        help="synthetic tests: rewrite tests/data/synthetic/<model>.npz from the live oracle",
    )


def _threads_per_worker() -> int:
    # Each xdist worker is a process; giving every worker all cores oversubscribes the machine and
    # makes the big matmuls slower, not faster.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


def pytest_cmdline_main(config) -> None:
    # Keep each model's tests on one xdist worker (xdist_group), so its checkpoint is made and fetched
    # once. Set here rather than in addopts, so that `-p no:xdist` still runs.
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", "no") in (
        "no",
        "load",
    ):
        config.option.dist = "loadgroup"


def pytest_configure(config) -> None:
    import torch

    torch.set_num_threads(_threads_per_worker())
    _check_output_options(config)
    _interruptible_children()


SUITE_INPUTS = ("expected", "tests", "converter", "conftest.py", "pyproject.toml")


def _check_output_options(config) -> None:
    """--save-dir, --report and the files --update-expected rewrites go through the converter's path
    policy before any test runs: no device, FIFO or file in place of a folder, nothing inside an input
    or a cache, and a folder that can be written."""
    import pytest

    from converter import paths
    from converter.errors import ConverterError

    # The suite's own inputs too: a report written over expected/ or a test would break the next run.
    root = Path(__file__).parent
    inputs = [*paths.caches(), *((f"the suite's {name}", root / name) for name in SUITE_INPUTS)]
    outputs = [("--save-dir", "folder"), ("--report", "file")]
    try:
        if checkpoints := config.getoption("--checkpoint-dir"):
            # A mistyped folder would skip every release test, and the gate would pass on nothing.
            checkpoints = Path(config.invocation_params.dir, checkpoints)
            if (there := paths.what_is_there(checkpoints)) != "a folder":
                found = "does not exist" if there is None else f"is {there}"
                raise ConverterError(
                    f"--checkpoint-dir {checkpoints} {found}: name the folder of checkpoints"
                )
            inputs.append(("--checkpoint-dir", checkpoints))
        for flag, kind in outputs:
            value = config.getoption(flag)
            if value:
                target = os.path.join(config.invocation_params.dir, value)  # a trailing slash kept
                paths.check_target(target, kind=kind, overwrite=True, protected=inputs, flag=flag)
                _check_writable(flag, Path(target))
    except ConverterError as err:
        raise pytest.UsageError(str(err)) from None


def _check_writable(flag: str, target: Path) -> None:
    """Refuse a target whose nearest existing folder cannot be written: the suite writes it at the end."""
    from converter.errors import ConverterError, escape

    folder = next((p for p in [target, *target.parents] if p.is_dir()), None)
    if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        readonly = os.statvfs(folder).f_flag & os.ST_RDONLY
        why = "read-only file system" if readonly else "permission denied"
        raise ConverterError(f"{flag} {escape(str(target))}: cannot write in {escape(str(folder))} ({why})")


def _interruptible_children() -> None:
    """Launched with SIGINT ignored (`cmd &` from a script, nohup), every process the tests start
    inherits SIG_IGN, and Python then installs no KeyboardInterrupt handler in it: the tests that
    interrupt a child would wait for nothing. Give this process SIGINT's usual handler, so that its
    children (xdist workers included) start with the default disposition, as from a terminal."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
