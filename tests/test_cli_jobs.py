"""The command line's other jobs, wired to the library: --to-original and --audit (the library's own
tests prove what they compute; these prove the flags reach it and the exit codes come back)."""

from __future__ import annotations

import json

import pytest
import torch

from tests import helpers
from tests.helpers import run


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny-a golden converted by the CLI, with its config."""
    root = tmp_path_factory.mktemp("jobs")
    config = helpers.write_config("tiny-a", root / "cfg")
    assert (
        run("--checkpoint", helpers.checkpoint("tiny-a"), "--config", config, "--output", root / "hf", "-q")
        == 0
    )
    return root / "hf", config


def test_to_original_writes_the_original_layout(converted, tmp_path, capsys):
    folder, _ = converted
    assert run("--to-original", folder, "--output", tmp_path / "back.pth") == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "verification OK" in out and f"wrote {tmp_path / 'back.pth'}" in out
    original = torch.load(helpers.checkpoint("tiny-a"), weights_only=True)["model"]
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    assert list(back) == list(original)  # in the original checkpoint's order
    stages = [line.split(":")[1].strip() for line in captured.err.splitlines()]
    assert stages == ["load", "map", "write", "verify", "start-up"]  # as the forward direction's progress
    # An existing file is kept unless --overwrite.
    assert run("--to-original", folder, "--output", tmp_path / "back.pth") == 2
    assert run("--to-original", folder, "--output", tmp_path / "back.pth", "--overwrite") == 0


def test_audit_of_a_faithful_folder_exits_0_with_a_json_report(converted, tmp_path, capsys):
    folder, config = converted
    report = tmp_path / "audit.json"
    rc = run(
        "--audit",
        folder,
        "--checkpoint",
        helpers.checkpoint("tiny-a"),
        "--config",
        config,
        "--report",
        report,
    )
    assert rc == 0, capsys.readouterr()
    assert "MATCH" in capsys.readouterr().out
    assert json.loads(report.read_text())["passed"] is True


def test_an_audit_replaces_an_existing_report(converted, tmp_path, capsys):
    """--report is a result file, as a test runner's: a rerun replaces the last one, no --overwrite asked."""
    folder, config = converted
    report = tmp_path / "audit.json"
    report.write_text("the last run's findings")
    args = ["--audit", folder, "--checkpoint", helpers.checkpoint("tiny-a"), "--config", config]
    assert run(*args, "--report", report) == 0, capsys.readouterr()
    assert json.loads(report.read_text())["passed"] is True


def test_audit_of_a_changed_folder_exits_1_naming_the_tensor(converted, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder, config = converted
    changed = tmp_path / "changed"
    changed.mkdir()
    for file in folder.iterdir():
        (changed / file.name).write_bytes(file.read_bytes())
    weights = load_file(folder / "model.safetensors")
    weights["text_projection.weight"] = weights["text_projection.weight"] + 1e-2
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    assert run("--audit", changed, "--checkpoint", helpers.checkpoint("tiny-a"), "--config", config) == 1
    assert "text_projection.weight" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--create-pr"], "--create-pr goes with --push-to-hub"),
        (["--push-to-hub", "me/fix"], "--push-to-hub opens a pull request: add --create-pr"),
        (["--push-to-hub", "--create-pr"], "is a folder: name the repo with --push-to-hub REPO_ID"),
    ],
)
def test_audit_refuses_pull_request_flags_that_cannot_work(converted, flags, message, capsys):
    folder, config = converted
    args = ["--audit", folder, "--checkpoint", helpers.checkpoint("tiny-a"), "--config", config, *flags]
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
