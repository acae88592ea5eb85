"""A corpus of bad inputs through `main()`: each gets its exit code and one line naming the problem,
never a traceback, and leaves nothing behind — not in the output's parent, not in the cache, and
nothing of the user's is deleted."""

from __future__ import annotations

import json
import os
import pickle
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from converter.cli import main
from tests import helpers


@dataclass
class Workspace:
    """A user's folder: the golden checkpoint, its config, and a parent for --output."""

    root: Path
    checkpoint: Path
    config: Path
    parent: Path

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.root / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(torch.load(self.checkpoint, weights_only=True)["model"])

    def saved(self, name: str, obj: object) -> Path:
        path = self.root / name
        torch.save(obj, path)
        return path

    def config_with(self, name: str, change: Callable[[dict], object]) -> Path:
        data = json.loads(self.config.read_text())
        return self.file(name, json.dumps(change(data)))

    def convert(self, *extra: object) -> list[object]:
        """Arguments for a conversion of the golden that only `extra` spoils."""
        return [
            "--checkpoint",
            self.checkpoint,
            "--config",
            self.config,
            "--output",
            self.parent / "out",
            *extra,
        ]


def _evil() -> object:
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))  # in the test's working folder, checked after the run

    return Payload()


def _set(data: dict, path: str, value: object) -> dict:
    *parents, leaf = path.split(".")
    target = data
    for part in parents:
        target = target[part]
    target[leaf] = value
    return data


# (id, argv builder, exit code, words the one message must contain)
CASES: list[tuple[str, Callable[[Workspace], list[object]], int, str]] = [
    ("nothing", lambda w: [], 2, "nothing to convert"),
    ("missing-checkpoint", lambda w: ["--checkpoint", w.root / "nope.pth"], 2, "no such file"),
    ("checkpoint-is-folder", lambda w: ["--checkpoint", w.root], 2, "is a folder"),
    ("unknown-model", lambda w: ["--model-name", "xclip-huge"], 2, "unknown model name 'xclip-huge'"),
    ("show-config-alone", lambda w: ["--show-config"], 2, "--show-config needs --model-name"),
    ("atol-inf", lambda w: w.convert("--atol", "inf"), 2, "--atol must be a finite number above 0"),
    ("atol-nan", lambda w: w.convert("--atol", "nan"), 2, "--atol must be a finite number above 0"),
    ("atol-negative", lambda w: w.convert("--atol", "-1"), 2, "--atol must be a finite number above 0"),
    ("atol-zero", lambda w: w.convert("--atol", "0"), 2, "--atol must be a finite number above 0"),
    ("texts-without-video", lambda w: w.convert("--texts", "a", "b"), 2, "--video"),
    ("video-missing", lambda w: w.convert("--video", w.root / "clip.npy"), 2, "clip.npy"),
    ("video-not-npy", lambda w: w.convert("--video", w.file("clip.npy", "not numpy")), 2, "clip.npy"),
    (
        "video-wrong-shape",
        lambda w: w.convert("--video", _npy(w, np.zeros((4, 8, 8), np.uint8))),
        2,
        "[T, H, W, 3]",
    ),
    ("sha256-malformed", lambda w: w.convert("--sha256", "xyz"), 2, "64 hex"),
    ("sha256-not-hex", lambda w: w.convert("--sha256", "g" * 64), 2, "64 hex"),
    ("sha256-mismatch", lambda w: w.convert("--sha256", "0" * 64), 2, "0" * 64),
    ("push-bad-repo-id", lambda w: w.convert("--push-to-hub", "bad repo!!"), 2, "not a valid repo id"),
    ("push-unverified", lambda w: w.convert("--push-to-hub", "me/x", "--no-verify"), 2, "drop --no-verify"),
    ("create-pr-alone", lambda w: w.convert("--create-pr"), 2, "--push-to-hub"),
    ("report-without-audit", lambda w: w.convert("--report", w.root / "r.json"), 2, "--audit"),
    (
        "config-list",
        lambda w: ["--checkpoint", w.checkpoint, "--config", w.file("c.json", "[1, 2]")],
        2,
        "object",
    ),
    (
        "config-not-json",
        lambda w: ["--checkpoint", w.checkpoint, "--config", w.file("c.json", "{")],
        2,
        "JSON",
    ),
    (
        "config-wrong-model-type",
        lambda w: [
            "--checkpoint",
            w.checkpoint,
            "--config",
            w.config_with("c.json", lambda d: {**d, "model_type": "clip"}),
        ],
        2,
        "model_type",
    ),
    (
        "config-wrong-type",
        lambda w: [
            "--checkpoint",
            w.checkpoint,
            "--config",
            w.config_with("c.json", lambda d: _set(d, "text_config.hidden_size", "big")),
        ],
        2,
        "text_config.hidden_size must be a positive integer",
    ),
    (
        "config-negative",
        lambda w: [
            "--checkpoint",
            w.checkpoint,
            "--config",
            w.config_with("c.json", lambda d: _set(d, "vision_config.num_hidden_layers", -2)),
        ],
        2,
        "vision_config.num_hidden_layers must be a positive integer",
    ),
    (
        "config-heads-do-not-divide",
        lambda w: [
            "--checkpoint",
            w.checkpoint,
            "--config",
            w.config_with("c.json", lambda d: _set(d, "prompt_num_attention_heads", 5)),
        ],
        2,
        "5 prompt heads do not divide the width 32",
    ),
    (
        "config-section-not-object",
        lambda w: [
            "--checkpoint",
            w.checkpoint,
            "--config",
            w.config_with("c.json", lambda d: _set(d, "vision_config", 3)),
        ],
        2,
        "vision_config must be an object",
    ),
    ("config-is-folder", lambda w: ["--checkpoint", w.checkpoint, "--config", w.root], 2, "is a folder"),
    (
        "config-missing",
        lambda w: ["--checkpoint", w.checkpoint, "--config", w.root / "none.json"],
        2,
        "none.json",
    ),
    (
        "config-disagrees-with-shapes",
        lambda w: ["--checkpoint", w.checkpoint, "--config", helpers.write_config("tiny-b", w.root / "b")],
        2,
        "mit.position_embedding: checkpoint gives [1, 4, 32], config expects [1, 8, 32]",
    ),
    ("heads-need-config", lambda w: ["--checkpoint", w.checkpoint], 2, "--config"),
    ("empty-file", lambda w: ["--checkpoint", w.file("e.pth", b""), "--config", w.config], 2, "empty"),
    (
        "html-page",
        lambda w: [
            "--checkpoint",
            w.file("h.pth", "<!DOCTYPE html><html>quota</html>"),
            "--config",
            w.config,
        ],
        2,
        "web page",
    ),
    (
        "random-bytes",
        lambda w: ["--checkpoint", w.file("r.pth", os.urandom(4096)), "--config", w.config],
        2,
        "r.pth",
    ),
    (
        "truncated",
        lambda w: ["--checkpoint", w.file("t.pth", w.checkpoint.read_bytes()[:5000]), "--config", w.config],
        2,
        "--force-download",
    ),
    (
        "malicious-pickle",
        lambda w: ["--checkpoint", w.saved("evil.pth", {"model": {}, "x": _evil()}), "--config", w.config],
        2,
        "allow-list",
    ),
    (
        "raw-pickle",
        lambda w: ["--checkpoint", w.file("evil.bin", pickle.dumps(_evil())), "--config", w.config],
        2,
        "allow-list",
    ),
    (
        "colliding-keys",
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {**w.state_dict(), "module.logit_scale": torch.tensor(1.0)}),
            "--config",
            w.config,
        ],
        2,
        "collide",
    ),
    (
        "integer-key",
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {**w.state_dict(), 7: torch.zeros(1)}),
            "--config",
            w.config,
        ],
        2,
        "keys must be strings",
    ),
    (
        "int-tensor",
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {**w.state_dict(), "logit_scale": torch.tensor(3)}),
            "--config",
            w.config,
        ],
        2,
        "logit_scale (dtype int64)",
    ),
    (
        "complex-tensor",
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {**w.state_dict(), "logit_scale": torch.tensor(1j)}),
            "--config",
            w.config,
        ],
        2,
        "complex",
    ),
    (
        "sparse-tensor",
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {**w.state_dict(), "ln_final.bias": torch.zeros(32).to_sparse()}),
            "--config",
            w.config,
        ],
        2,
        "sparse",
    ),
    (
        "nan",
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {**w.state_dict(), "ln_final.bias": torch.full((32,), float("nan"))}),
            "--config",
            w.config,
        ],
        2,
        "ln_final.bias (32 of 32)",
    ),
    (
        "nan-with-no-verify-and-output",  # refused after the staged write, before anything lands
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {**w.state_dict(), "ln_final.bias": torch.full((32,), float("nan"))}),
            "--config",
            w.config,
            "--output",
            w.parent / "out",
            "--no-verify",
        ],
        2,
        "ln_final.bias (32 of 32)",
    ),
    (
        "missing-key",
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {k: v for k, v in w.state_dict().items() if k != "ln_final.bias"}),
            "--config",
            w.config,
        ],
        2,
        "text_model.final_layer_norm.bias",
    ),
    (
        "unknown-key-with-escapes",
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {**w.state_dict(), "\x1b[2Kwrote out\nx": torch.zeros(1)}),
            "--config",
            w.config,
        ],
        2,
        "\\x1b[2Kwrote out\\nx",
    ),
    (
        "20000-unknown-keys",
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {**w.state_dict(), **{f"junk.{i}": torch.zeros(1) for i in range(20000)}}),
            "--config",
            w.config,
        ],
        2,
        "and 19,980 more",
    ),
    (
        "already-converted",
        lambda w: [
            "--checkpoint",
            w.saved("hf.pth", {"vision_model.embeddings.class_embedding": torch.zeros(4)}),
        ],
        2,
        "already converted",
    ),
    (
        "wrong-model-name",
        lambda w: ["--checkpoint", w.checkpoint, "--config", w.config, "--model-name", "xclip-base-patch32"],
        2,
        "does not look like xclip-base-patch32",
    ),
    (
        "output-contains-input",
        lambda w: [
            "--checkpoint",
            w.checkpoint,
            "--config",
            w.config,
            "--output",
            w.checkpoint.parent,
            "--overwrite",
        ],
        2,
        "contains --checkpoint",
    ),
    (
        "output-is-input",
        lambda w: w.convert()[:4] + ["--output", w.checkpoint, "--overwrite"],
        2,
        "checkpoint",
    ),
    ("output-dot", lambda w: w.convert()[:4] + ["--output", ".", "--overwrite"], 2, "--output"),
    (
        "output-sub-dotdot",
        lambda w: w.convert()[:4] + ["--output", w.parent / "sub" / "..", "--overwrite"],
        2,
        "..",
    ),
    (
        "output-parent-is-file",
        lambda w: w.convert()[:4] + ["--output", w.file("afile", "x") / "out"],
        2,
        "afile",
    ),
    (
        "output-not-empty",
        lambda w: w.convert()[:4] + ["--output", _folder_with_file(w.parent / "kept")],
        2,
        "--overwrite",
    ),
    (
        "output-inside-cache",
        lambda w: w.convert()[:4] + ["--output", Path(os.environ["XCLIP_CACHE"]) / "o"],
        2,
        "cache",
    ),
    (
        "unsupported-scheme",
        lambda w: ["--checkpoint", "ftp://example.invalid/x.pth"],
        2,
        "unsupported URL scheme",
    ),
    ("unreachable-host", lambda w: ["--checkpoint", "http://127.0.0.1:9/x.pth"], 2, "127.0.0.1"),
    ("to-original-without-output", lambda w: ["--to-original", w.root], 2, "--output"),
    ("audit-without-original", lambda w: ["--audit", w.root], 2, "--model-name or --checkpoint"),
    ("report-is-the-checkpoint", lambda w: _audited(w, w.checkpoint), 2, "tiny-a.pth is --checkpoint"),
    ("report-is-the-config", lambda w: _audited(w, w.config), 2, "is --config"),
    (
        "report-inside-the-audited-folder",
        lambda w: _audited(w, w.root / "converted" / "config.json"),
        2,
        "lies inside the audited folder",
    ),
    ("report-is-a-folder", lambda w: _audited(w, w.root), 2, "is a folder: name a file"),
    (
        "published-config-heads-not-dividing",
        lambda w: _back(w, "text_config.num_attention_heads", 3),
        2,
        "config.json: 3 text heads do not divide the width 32",
    ),
    (
        "published-config-negative-size",
        lambda w: _back(w, "text_config.hidden_size", -32),
        2,
        "config.json: text_config.hidden_size must be a positive integer",
    ),
    # ---- every path the tool writes goes through one policy (--output, --report, --to-original) ----
    (
        "output-holds-a-file-url-checkpoint",
        lambda w: [
            "--checkpoint",
            w.checkpoint.as_uri(),
            "--config",
            w.config,
            "--output",
            w.root,
            "--overwrite",
        ],
        2,
        "contains --checkpoint",
    ),
    (
        "report-is-a-file-url-checkpoint",
        lambda w: [
            *_audited(w, w.checkpoint)[:2],
            "--checkpoint",
            w.checkpoint.as_uri(),
            "--report",
            w.checkpoint,
        ],
        2,
        "is --checkpoint",
    ),
    ("report-is-a-device", lambda w: _audited(w, Path("/dev/full")), 2, "is a character device: name a file"),
    ("report-is-a-fifo", lambda w: _audited(w, _fifo(w)), 2, "is a FIFO (named pipe): name a file"),
    (
        "report-through-a-link-to-a-fifo",
        lambda w: _audited(w, _link(w, "r.json", _fifo(w))),
        2,
        "is a FIFO (named pipe)",
    ),
    (
        "report-inside-the-hf-cache",
        lambda w: _audited(
            w, Path(os.environ["HF_HUB_CACHE"]) / "models--o--n" / "snapshots" / "c" / "config.json"
        ),
        2,
        "lies inside the Hugging Face cache",
    ),
    (
        "report-inside-the-download-cache",
        lambda w: _audited(w, Path(os.environ["XCLIP_CACHE"]) / "r.json"),
        2,
        "lies inside the download cache",
    ),
    (
        "output-is-a-fifo",
        lambda w: w.convert()[:4] + ["--output", _fifo(w)],
        2,
        "is a FIFO (named pipe), not a folder",
    ),
    (
        "output-links-to-a-device",
        lambda w: w.convert()[:4] + ["--output", _link(w, "out", Path("/dev/null")), "--overwrite"],
        2,
        "is a character device, not a folder",
    ),
    (
        "output-inside-the-hf-cache",
        lambda w: w.convert()[:4] + ["--output", Path(os.environ["HF_HUB_CACHE"]) / "out"],
        2,
        "lies inside the Hugging Face cache",
    ),
    (
        "output-holds-the-config",
        lambda w: w.convert()[:4] + ["--output", w.config.parent, "--overwrite"],
        2,
        "contains --config",
    ),
    (
        "output-is-the-video",
        lambda w: w.convert()[:4] + ["--video", _clip(w), "--output", _clip(w), "--overwrite"],
        2,
        "is the --video clip",
    ),
    (
        "to-original-onto-a-device",
        lambda w: ["--to-original", _converted(w), "--output", "/dev/full", "--overwrite"],
        2,
        "is a character device: name a file",
    ),
    (
        "to-original-into-the-download-cache",
        lambda w: [
            "--to-original",
            _converted(w),
            "--output",
            Path(os.environ["XCLIP_CACHE"]) / "url" / "k400_32_8.pth",
        ],
        2,
        "lies inside the download cache",
    ),
    (
        "to-original-onto-a-fifo",
        lambda w: ["--to-original", _converted(w), "--output", _fifo(w), "--overwrite"],
        2,
        "is a FIFO (named pipe)",
    ),
    (
        "to-original-is-the-source",
        lambda w: ["--to-original", _converted(w), "--output", w.root / "converted", "--overwrite"],
        2,
        "is the source",
    ),
    (
        "to-original-existing-file",
        lambda w: ["--to-original", _converted(w), "--output", w.file("mine.pth", "a user's file")],
        2,
        "exists; pass --overwrite",
    ),
    # ---- flags a job does not read are refused, naming the job ------------------------------------
    (
        "to-original-with-report",
        lambda w: ["--to-original", w.root, "--output", w.root / "b.pth", "--report", w.root / "r.json"],
        2,
        "--to-original does not use --report",
    ),
    (
        "to-original-with-no-verify",
        lambda w: ["--to-original", w.root, "--output", "b.pth", "--no-verify"],
        2,
        "--to-original does not use --no-verify",
    ),
    (
        "to-original-with-sha256",
        lambda w: ["--to-original", w.root, "--output", "b.pth", "--sha256", "0" * 64],
        2,
        "--to-original does not use --sha256",
    ),
    (
        "to-original-with-dtype",
        lambda w: ["--to-original", w.root, "--output", "b.pth", "--dtype", "float16"],
        2,
        "--to-original does not use --dtype",
    ),
    (
        "audit-with-dtype",
        lambda w: ["--audit", w.root, "--checkpoint", w.checkpoint, "--dtype", "float16"],
        2,
        "--audit does not use --dtype",
    ),
    (
        "audit-with-overwrite",
        lambda w: ["--audit", w.root, "--checkpoint", w.checkpoint, "--overwrite"],
        2,
        "--audit does not use --overwrite",
    ),
    (
        "audit-with-output",
        lambda w: ["--audit", w.root, "--checkpoint", w.checkpoint, "--output", "o"],
        2,
        "--audit does not use --output",
    ),
    (
        "audit-with-video",
        lambda w: ["--audit", w.root, "--checkpoint", w.checkpoint, "--video", "c.npy"],
        2,
        "--audit does not use --video",
    ),
    (
        "revision-on-an-audited-folder",
        lambda w: ["--audit", w.root, "--checkpoint", w.checkpoint, "--revision", "main"],
        2,
        "drop --revision",
    ),
    (
        "revision-on-a-folder-to-convert-back",
        lambda w: ["--to-original", w.root, "--output", "b.pth", "--revision", "main"],
        2,
        "drop --revision",
    ),
    (
        "revision-when-converting",
        lambda w: w.convert("--revision", "main"),
        2,
        "a conversion does not use --revision",
    ),
    ("list-with-output", lambda w: ["--list", "--output", "o"], 2, "--list does not use --output"),
    (
        "show-config-with-checkpoint",
        lambda w: ["--show-config", "--model-name", "xclip-base-patch32", "--checkpoint", w.checkpoint],
        2,
        "--show-config does not use --checkpoint",
    ),
    # ---- what is printed is escaped --------------------------------------------------------------
    (
        "escaped-path-in-a-message",
        lambda w: ["--checkpoint", w.root / "\x1b[2Kwrote out\r.pth"],
        2,
        "\\x1b[2Kwrote out\\r.pth",
    ),
    ("bad-dtype", lambda w: w.convert("--dtype", "int8"), 2, "invalid choice"),
    ("verification-fails", lambda w: _wrong_heads(w), 1, "does not reproduce the original"),
]


def _fifo(w: Workspace, name: str = "pipe") -> Path:
    path = w.root / name
    if not path.exists():
        os.mkfifo(path)
    return path


def _link(w: Workspace, name: str, target: Path) -> Path:
    (w.root / name).symlink_to(target)
    return w.root / name


def _clip(w: Workspace) -> Path:
    path = w.root / "clip.npy"
    if not path.exists():
        np.save(path, np.zeros((2, 8, 8, 3), np.uint8))
    return path


def _npy(w: Workspace, array: np.ndarray) -> Path:
    path = w.root / "clip.npy"
    np.save(path, array)
    return path


def _folder_with_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mine.txt").write_text("the user's")
    return folder


def _converted(w: Workspace, change: Callable[[dict], object] = lambda config: config) -> Path:
    """The golden converted to `converted/` (its config.json passed through `change`)."""
    from converter.pipeline import convert_checkpoint

    folder = w.root / "converted"
    convert_checkpoint(w.checkpoint, config=w.config, output=folder)
    config = folder / "config.json"
    config.write_text(json.dumps(change(json.loads(config.read_text()))))
    return folder


def _audited(w: Workspace, report: Path) -> list[object]:
    """An audit of a correct conversion of the golden whose --report would overwrite `report`."""
    audited = ["--audit", _converted(w), "--checkpoint", w.checkpoint, "--config", w.config]
    return [*audited, "--report", report]


def _back(w: Workspace, path: str, value: object) -> list[object]:
    """--to-original of a converted folder whose config.json has `path` set to `value`."""
    return ["--to-original", _converted(w, lambda d: _set(d, path, value)), "--output", w.root / "back.pth"]


def _wrong_heads(w: Workspace) -> list[object]:
    """Widths of 64, where the oracle takes the original's width // 64 = 1 head, and a config with 4."""
    from converter.config import to_config
    from converter.synthetic import make_state_dict

    checkpoint = w.saved("square.pth", {"model": make_state_dict(helpers.SQUARE, seed=1)})
    to_config(helpers.SQUARE).save_pretrained(w.root / "square")
    return [
        "--checkpoint",
        checkpoint,
        "--config",
        w.root / "square" / "config.json",
        "--output",
        w.parent / "out",
    ]


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    root = tmp_path / "user"
    root.mkdir()
    checkpoint = root / "tiny-a.pth"
    checkpoint.write_bytes(helpers.checkpoint("tiny-a").read_bytes())
    config = helpers.write_config("tiny-a", root / "cfg")
    (root / "parent").mkdir()
    return Workspace(root, checkpoint, config, root / "parent")


def _snapshot(*folders: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under `folders`."""
    seen: dict[str, bytes | None] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.exists() else []:
            seen[str(path)] = path.read_bytes() if path.is_file() else None
    return seen


def test_the_corpus_is_large_and_distinct():
    assert len(CASES) >= 90
    assert len({case_id for case_id, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize(("build", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(workspace, build, code, words, capsys, monkeypatch):
    monkeypatch.chdir(workspace.root.parent)
    argv = [str(a) for a in build(workspace)]
    cache = Path(os.environ["XCLIP_CACHE"])
    before = _snapshot(workspace.root, cache)

    peak_before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse refuses unknown choices itself, with its usage line
        rc = exit_.code
    seconds = time.monotonic() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    out, err = capsys.readouterr()

    assert rc == code, (argv, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert words in err, err
    assert "\x1b" not in err and len(err) < 8000, err[:500]
    message = [line for line in err.splitlines() if "error" in line or "does not reproduce" in line]
    assert message, err
    assert "weights_only=False" not in err
    # Nothing left behind, nothing of the user's touched (a cache may keep its lock files, no more).
    after = _snapshot(workspace.root, cache)
    assert {k: v for k, v in after.items() if not Path(k).is_relative_to(cache / "locks")} == before
    assert not (workspace.root.parent / "PWNED").exists()  # nothing from a file was executed
    # Bounded: a refusal never reads a device or FIFO, nor allocates what a file asks for.
    assert seconds < 60 and grown_mb < 1024, (seconds, grown_mb)
