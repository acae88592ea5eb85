"""A newcomer's first steps with no network, as README's first screen shows them:
`python -m converter.synthetic` writes a checkpoint (and a clip), `xclip-convert` converts and
classifies it, and the folder loads and classifies again as its model card's usage says."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from converter.card import usage_snippet
from converter.load import ALLOWED_GLOBALS
from converter.synthetic import main as synthetic
from tests.helpers import run

NAME, FILE = "xclip-base-patch32", "k400_32_8.pth"


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt fails, as on a machine without the hub or the release."""

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_synthetic_checkpoint_converts_loads_and_classifies_offline(
    tmp_path, monkeypatch, capsys, no_network
):
    monkeypatch.chdir(tmp_path)
    assert synthetic([NAME, FILE, "--clip", "clip.npy"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith(f"wrote {FILE}: a synthetic {NAME} checkpoint (786 MB)")
    assert "predictions mean nothing" in said[0] and said[1] == "wrote clip.npy: 8 random RGB frames, 320x240"
    command = f"xclip-convert --checkpoint {FILE} --model-name {NAME} --output out --video clip.npy"
    assert said[2] == f"next, with no network: {command}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.npy", FILE]  # no partial file left
    # The original trainer's dict with its yacs config, as converter.load reads it (weights only).
    with torch.serialization.safe_globals(ALLOWED_GLOBALS):
        saved = torch.load(FILE, weights_only=True, mmap=True)
    assert list(saved) == ["model", "optimizer", "lr_scheduler", "max_accuracy", "epoch", "config"]
    assert saved["config"]["DATA"]["NUM_FRAMES"] == 8 and "prompts_generator.alpha" in saved["model"]
    del saved

    assert run(*command.split()[1:]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("verification OK") and "wrote out" in printed
    probabilities = [float(line.split()[0]) for line in printed.splitlines() if line[:1].isdigit()]
    assert len(probabilities) == 3 and abs(sum(probabilities) - 1) < 1e-3

    # The card's usage, run as written (from the folder, on the clip): the saved processor resizes with
    # Pillow where --video follows the original's pipeline, so the probabilities agree closely, not exactly.
    namespace: dict = {}
    exec(usage_snippet(str(tmp_path / "out"), 8), namespace)  # noqa: S102 - our own snippet
    assert np.allclose(namespace["probs"].numpy(), probabilities, atol=2e-3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["xclip-base", "x.pth"], "error: unknown model name 'xclip-base'; the published variants are: "),
        ([NAME, "exists.pth"], "error: FILE exists.pth exists; pass --overwrite to replace it"),
        ([NAME, "x.pth", "--clip", "clip.mp4"], "error: --clip clip.mp4: name it FILE.npy"),
        ([NAME, "x.npy", "--clip", "x.npy"], "error: FILE and --clip name the same file"),
        ([NAME, "folder"], "error: FILE folder is a folder: name a file to write"),
        ([NAME, "."], "error: FILE .: name the file to write"),
        ([NAME, "new/"], "error: FILE new/ names a folder: name the file"),
        ([NAME, "x.pth", "--clip", "new.npy/"], "error: --clip new.npy/ names a folder: name the file"),
    ],
    ids=["unknown-model", "exists", "clip-not-npy", "same-file", "folder", "dot", "slash", "clip-slash"],
)
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exists.pth").write_bytes(b"mine")
    (tmp_path / "folder").mkdir()
    assert synthetic(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m converter.synthetic: {message}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.pth", "folder"]
    assert (tmp_path / "exists.pth").read_bytes() == b"mine"


def test_a_clip_that_cannot_be_written_fails_before_the_checkpoint_is_written(tmp_path, monkeypatch, capsys):
    """The patched twin of the tmpfs test below: the clip is written first, and FILE only with it."""
    import converter.synthetic

    def full(frames, seed=0):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(converter.synthetic, "make_clip", full)
    assert synthetic([NAME, "x.pth", "--clip", "c.npy"]) == 2
    assert "could not write c.npy: No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_for_the_clip_is_named_and_leaves_nothing(tmp_path, monkeypatch, capsys, small_disk):
    (small_disk / "filler").write_bytes(b"\0" * (1 << 20))  # the 1.8 MB clip no longer fits
    monkeypatch.chdir(tmp_path)
    assert synthetic([NAME, "x.pth", "--clip", str(small_disk / "c.npy")]) == 2
    err = capsys.readouterr().err
    assert f"error: could not write {small_disk / 'c.npy'}: No space left on device; --clip " in err
    assert [p.name for p in tmp_path.iterdir()] == ["small"] and [p.name for p in small_disk.iterdir()] == [
        "filler"
    ]


def test_torch_and_numpy_are_imported_once_the_signals_are_handled():
    """Imported at the start, they would make a Ctrl-C in the first second a KeyboardInterrupt traceback."""
    code = "import sys, converter.synthetic; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "[]\n"


@pytest.mark.parametrize("seed", ["-1", str(1 << 63), "1.5"])
def test_a_seed_neither_torch_nor_numpy_takes_is_refused_before_any_work(tmp_path, monkeypatch, capsys, seed):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        synthetic([NAME, "x.pth", "--clip", "x.npy", "--seed", seed])
    assert (
        done.value.code == 2 and f"argument --seed: {seed!r} is not a whole number" in capsys.readouterr().err
    )
    assert list(tmp_path.iterdir()) == []


def test_the_clip_is_what_video_reads(tmp_path):
    from converter.processing import load_video
    from converter.synthetic import make_clip

    np.save(tmp_path / "clip.npy", make_clip(16, seed=1))
    frames = load_video(tmp_path / "clip.npy", 16)
    assert frames.shape == (16, 240, 320, 3) and frames.dtype == np.uint8


def test_readme_first_screen_shows_these_steps():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert readme.index("```bash") < 1000  # on the first screen
    commands = [line.split("  #")[0].strip() for line in first_block.splitlines()]
    assert f"python -m converter.synthetic {NAME} {FILE} --clip clip.npy" in commands
    assert f"xclip-convert --checkpoint {FILE} --model-name {NAME} --output out --video clip.npy" in commands
    assert "--index-url https://download.pytorch.org/whl/cpu" in commands[0]  # the CPU build of torch
