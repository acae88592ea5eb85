"""A corpus of bad inputs through `main()`: each gets its exit code and one line naming the problem,
never a traceback, and leaves nothing behind — not in the output's parent, not in the cache, and
nothing of the user's is deleted."""

from __future__ import annotations

import json
import os
import pickle
import resource
import threading
import time
import warnings
import zipfile
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


_NOT_UTF8 = os.fsdecode(b"\xff")  # how Python names a file whose name has the byte 0xff
_NOT_UTF8_SAID = "the path is not valid UTF-8, which torch and safetensors cannot open"


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
    (
        "output-but-nothing-to-convert",  # the flags to give, and where to find the names
        lambda w: ["--output", w.parent / "out"],
        2,
        "nothing to convert: give --checkpoint PATH or --model-name NAME (see --list)",
    ),
    ("missing-checkpoint", lambda w: ["--checkpoint", w.root / "nope.pth"], 2, "no such file"),
    ("checkpoint-is-folder", lambda w: ["--checkpoint", w.root], 2, "is a folder"),
    ("checkpoint-invalid-url", lambda w: ["--checkpoint", "http://[::1/k.pth"], 2, "not a valid URL"),
    ("checkpoint-invalid-file-url", lambda w: ["--checkpoint", "file://[x/k.pth"], 2, "not a valid URL"),
    ("unknown-model", lambda w: ["--model-name", "xclip-huge"], 2, "unknown model name 'xclip-huge'"),
    (
        "unknown-model-before-the-clip",  # the flags' own mistake is named before any file is read
        lambda w: w.convert("--model-name", "xclip-huge", "--video", w.root / "clip.npy"),
        2,
        "unknown model name 'xclip-huge'",
    ),
    ("show-config-alone", lambda w: ["--show-config"], 2, "--show-config needs --model-name"),
    ("atol-inf", lambda w: w.convert("--atol", "inf"), 2, "--atol must be a finite number above 0"),
    ("atol-nan", lambda w: w.convert("--atol", "nan"), 2, "--atol must be a finite number above 0"),
    ("atol-negative", lambda w: w.convert("--atol", "-1"), 2, "--atol must be a finite number above 0"),
    ("atol-zero", lambda w: w.convert("--atol", "0"), 2, "--atol must be a finite number above 0"),
    ("atol-one", lambda w: w.convert("--atol", "1"), 2, "above 0 and below 1"),  # zeros would pass
    ("atol-huge", lambda w: w.convert("--atol", "1e9"), 2, "above 0 and below 1"),
    (  # refused from the flags alone, before the source is even looked for
        "to-original-atol-one",
        lambda w: ["--to-original", w.root / "missing", "--output", w.root / "b.pth", "--atol", "1"],
        2,
        "--atol must be a finite number above 0 and below 1",
    ),
    (
        "audit-atol-zero",
        lambda w: ["--audit", w.root / "missing", "--checkpoint", w.checkpoint, "--atol", "0"],
        2,
        "--atol must be a finite number above 0 and below 1",
    ),
    ("texts-without-video", lambda w: w.convert("--texts", "a", "b"), 2, "--video"),
    ("video-missing", lambda w: w.convert("--video", w.root / "clip.npy"), 2, "clip.npy"),
    ("video-not-npy", lambda w: w.convert("--video", w.file("clip.npy", "not numpy")), 2, "clip.npy"),
    ("video-empty-npy", lambda w: w.convert("--video", w.file("clip.npy", "")), 2, "cannot read"),
    ("video-is-a-folder", lambda w: w.convert("--video", w.root), 2, "is a folder: give the file inside it"),
    ("video-is-a-fifo", lambda w: w.convert("--video", _fifo(w.root / "c.npy")), 2, "is a FIFO"),
    (
        "video-wrong-shape",
        lambda w: w.convert("--video", _npy(w, np.zeros((4, 8, 8), np.uint8))),
        2,
        "[T, H, W, 3]",
    ),
    (
        "video-frames-too-thin",
        lambda w: w.convert("--video", _npy(w, np.zeros((1, 1, 16_384, 3), np.uint8))),
        2,
        "one side more than 16 times the other",
    ),
    ("sha256-malformed", lambda w: w.convert("--sha256", "xyz"), 2, "64 hex"),
    (
        "sha256-malformed-before-the-clip",
        lambda w: w.convert("--sha256", "xyz", "--video", w.root / "clip.npy"),
        2,
        "64 hex",
    ),
    ("sha256-not-hex", lambda w: w.convert("--sha256", "g" * 64), 2, "64 hex"),
    ("sha256-mismatch", lambda w: w.convert("--sha256", "0" * 64), 2, "0" * 64),
    ("push-bad-repo-id", lambda w: w.convert("--push-to-hub", "bad repo!!"), 2, "not a valid repo id"),
    ("push-unverified", lambda w: w.convert("--push-to-hub", "me/x", "--no-verify"), 2, "drop --no-verify"),
    ("create-pr-alone", lambda w: w.convert("--create-pr"), 2, "--push-to-hub"),
    ("private-alone", lambda w: w.convert("--private"), 2, "--create-pr and --private go with --push-to-hub"),
    (
        "list-with-two-output-flags",  # the first named with the jobs that take it, the rest listed
        lambda w: ["--list", "--output", "o", "--overwrite"],
        2,
        "--list does not use --output (nor --overwrite): drop it; --output goes with a conversion or "
        "--to-original",
    ),
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
        "config-path-with-escapes",  # a file name names no line of the output
        lambda w: [
            "--checkpoint",
            w.checkpoint,
            "--config",
            w.config_with("\x1b[2Kwrote out\r.json", lambda d: {**d, "model_type": "clip"}),
        ],
        2,
        "\\x1b[2Kwrote out\\r.json: expected an XCLIPConfig JSON",
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
    (
        "config-two-paths-of-one-size-disagree",  # XCLIPConfig keeps E twice; the model is built from both
        lambda w: [
            "--checkpoint",
            w.checkpoint,
            "--config",
            w.config_with("c.json", lambda d: _set(d, "vision_config.mit_hidden_size", 64)),
        ],
        2,
        "projection_dim 32 and vision_config.mit_hidden_size 64 must agree",
    ),
    ("heads-need-config", lambda w: ["--checkpoint", w.checkpoint], 2, "--config"),
    (
        "inferred-key-missing",
        lambda w: _inferred(w, lambda sd: _without(sd, "text_projection")),
        2,
        "cannot infer the model: key 'text_projection' is missing from the checkpoint",
    ),
    (
        "inferred-key-too-few-dims",
        lambda w: _inferred(w, lambda sd: {**sd, "visual.conv1.weight": torch.zeros(64, 3)}),
        2,
        "cannot infer the model: 'visual.conv1.weight' has shape [64, 3], too few dims",
    ),
    (
        "inferred-positions-not-a-square-grid",
        lambda w: _inferred(w, lambda sd: {**sd, "visual.positional_embedding": torch.zeros(21, 64)}),
        2,
        "visual.positional_embedding has 20 patch positions, not a square grid",
    ),
    # sizes read off the weights are held to a config's rules, naming the key they came from
    (
        "inferred-no-prompt-blocks",
        lambda w: _inferred(
            w, lambda sd: {k: v for k, v in sd.items() if "prompts_generator.decoder." not in k}
        ),
        2,
        "has 0 blocks 'prompts_generator.decoder.<i>.', so prompt_layers would be 0",
    ),
    (
        "inferred-context-1",
        lambda w: _inferred(w, lambda sd: {**sd, "positional_embedding": sd["positional_embedding"][:1]}),
        2,
        "'positional_embedding' has shape [1, 32], so text_config.max_position_embeddings would be 1; "
        "it must be at least 2",
    ),
    (
        "inferred-context-5000",
        lambda w: _inferred(w, lambda sd: {**sd, "positional_embedding": torch.zeros(5000, 32)}),
        2,
        "text_config.max_position_embeddings would be 5000; it must be at most 4,096",
    ),
    (
        "inferred-zero-width-mlp",
        lambda w: _inferred(w, _zero_width_text_mlp),
        2,
        "'transformer.resblocks.0.mlp.c_fc.weight' has shape [0, 32], so text_config.intermediate_size "
        "would be 0; it must be a positive integer",
    ),
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
        "zip-bomb-entry",  # 1.25 GiB of zeros in 6 MB, which was read whole to look for globals
        lambda w: _unloadable_zip(w, "archive/bomb.pkl", mib=1280),
        2,
        "entries unpack to 1,342,",
    ),
    (
        "zip-entry-listed-over-and-over",  # testzip decompressed each listing: 1 GiB here, any amount
        lambda w: _unloadable_zip(w, "archive/pad", mib=1, listed=1000),
        2,
        "entries unpack to 1,048,",
    ),
    (
        "pickle-claiming-2**62-bytes",  # 14 bytes declaring a 4 EiB BINBYTES8 (a MemoryError before)
        lambda w: [
            "--checkpoint",
            w.file("b.pth", b"\x80\x04\x8e" + (1 << 62).to_bytes(8, "little") + b"abc"),
            "--config",
            w.config,
        ],
        2,
        "cut short",
    ),
    (
        "nested-tensor",
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {**w.state_dict(), "ln_final.bias": _nested_tensor()}),
            "--config",
            w.config,
        ],
        2,
        "ln_final.bias (a nested tensor)",
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
        "extra-and-missing-keys",  # listed in one message, not the first kind alone
        lambda w: [
            "--checkpoint",
            w.saved(
                "c.pth", {**_without(w.state_dict(), "ln_final.bias"), "visual.surprise": torch.zeros(2)}
            ),
            "--config",
            w.config,
        ],
        2,
        "source keys no rule consumes:\n    visual.surprise [2]\n  1 target keys not produced:\n"
        "    text_model.final_layer_norm.bias [32]",
    ),
    (
        "float16-overflow",  # finite in float32, inf once written as float16: refused, not written
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {**w.state_dict(), "ln_final.bias": torch.full((32,), 1e5)}),
            "--config",
            w.config,
            "--output",
            w.parent / "out",
            "--dtype",
            "float16",
        ],
        2,
        "--dtype float16 cannot hold every weight of ",
    ),
    (
        "float16-overflow-names-both-wider-dtypes",  # bfloat16 holds float32's range: offered as well
        lambda w: [
            "--checkpoint",
            w.saved("c.pth", {**w.state_dict(), "ln_final.bias": torch.full((32,), 1e5)}),
            "--config",
            w.config,
            "--dtype",
            "float16",
        ],
        2,
        "would be written as inf; use --dtype float32 or bfloat16",
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
    (  # with stdout sent to a log (`>> run.log`), the log: replaced by the report, its lines lost
        "report-is-stdout",
        lambda w: _audited(w, Path("/dev/stdout")),
        2,
        "--report /dev/stdout is a process's open file (a standard stream): name a file",
    ),
    ("report-is-a-device", lambda w: _audited(w, Path("/dev/full")), 2, "is a character device: name a file"),
    (
        "report-is-a-fifo",
        lambda w: _audited(w, _fifo(w.root / "pipe")),
        2,
        "is a FIFO: name a file",
    ),
    (
        "report-through-a-link-to-a-fifo",
        lambda w: _audited(w, _link(w.root / "r.json", _fifo(w.root / "pipe"))),
        2,
        "is a FIFO",
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
        lambda w: w.convert()[:4] + ["--output", _fifo(w.root / "pipe")],
        2,
        "is a FIFO, not a folder",
    ),
    (
        "output-links-to-a-device",
        lambda w: w.convert()[:4] + ["--output", _link(w.root / "out", Path("/dev/null")), "--overwrite"],
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
        lambda w: ["--to-original", _converted(w), "--output", _fifo(w.root / "pipe"), "--overwrite"],
        2,
        "is a FIFO",
    ),
    (
        "to-original-is-the-source",
        lambda w: ["--to-original", _converted(w), "--output", w.root / "converted", "--overwrite"],
        2,
        "is the source",
    ),
    (
        "to-original-output-safetensors",  # a torch pickle under a safetensors name: nothing reads it
        lambda w: ["--to-original", _converted(w), "--output", w.root / "back.safetensors"],
        2,
        "the way back writes a torch checkpoint (the original's format), not a .safetensors file",
    ),
    (
        "to-original-extra-key",  # named in the source, as the user knows it
        lambda w: _back_with_extra_key(w),
        2,
        "converted: model.safetensors vs config.json: the checkpoint does not match",
    ),
    (
        "to-original-extra-key-with-escapes",  # a published file's key names no line of the output
        lambda w: _back_with_extra_key(w, "\x1b[2Kwrote out\nx"),
        2,
        "\\x1b[2Kwrote out\\nx [1]",
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
    # A flag given at its default value is given all the same.
    ("list-with-default-dtype", lambda w: ["--list", "--dtype", "float32"], 2, "--list does not use --dtype"),
    (
        "to-original-with-default-dtype",
        lambda w: ["--to-original", w.root, "--output", "b.pth", "--dtype", "float32"],
        2,
        "--to-original does not use --dtype",
    ),
    # An empty value (`--video "$CLIP"` with CLIP unset) is refused by its flag, whatever the job.
    ("audit-empty", lambda w: ["--audit", "", "--checkpoint", w.checkpoint], 2, "--audit is empty"),
    ("to-original-empty", lambda w: ["--to-original", "", "--output", "b.pth"], 2, "--to-original is empty"),
    ("config-empty", lambda w: ["--checkpoint", w.checkpoint, "--config", ""], 2, "--config is empty"),
    ("video-empty", lambda w: w.convert("--video", ""), 2, "--video is empty"),
    ("output-empty", lambda w: w.convert()[:4] + ["--output", ""], 2, "--output is empty"),
    # A file's flag ending in a slash names a folder: Path() would drop the slash and write a file there.
    (
        "to-original-output-slash",
        lambda w: ["--to-original", w.root, "--output", "d/"],
        2,
        "--output d/ names",
    ),
    ("audit-report-slash", lambda w: [*_audited(w, w.root)[:-1], "d/"], 2, "--report d/ names a folder"),
    # A name that is not UTF-8, which torch and safetensors cannot open, is refused before any work.
    ("output-not-utf8", lambda w: w.convert()[:4] + ["--output", w.parent / _NOT_UTF8], 2, _NOT_UTF8_SAID),
    (
        "to-original-output-not-utf8",
        lambda w: ["--to-original", _converted(w), "--output", w.root / f"{_NOT_UTF8}.pth"],
        2,
        _NOT_UTF8_SAID,
    ),
    (
        "checkpoint-not-utf8",
        lambda w: ["--checkpoint", w.file(f"{_NOT_UTF8}.pth", w.checkpoint.read_bytes()), *w.convert()[2:]],
        2,
        _NOT_UTF8_SAID,
    ),
    # A failed run removes the output's parent folders it made (the snapshot shows any left behind).
    (
        "output-parents-made",
        lambda w: ["--checkpoint", w.root / "nope.pth", "--output", w.parent / "a" / "b" / "out"],
        2,
        "no such file",
    ),
    (
        "report-parents-made",
        lambda w: [
            "--audit",
            w.root / "nope",
            "--checkpoint",
            w.checkpoint,
            "--report",
            w.parent / "a/r.json",
        ],
        2,
        "nope",
    ),
    (
        "to-original-output-parents-made",
        lambda w: ["--to-original", w.root / "nope", "--output", w.parent / "a" / "b" / "back.pth"],
        2,
        "nope",
    ),
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
    # ---- issue 18 item 3 / issue 19 item 4: every non-checkpoint input read with bounds ----------
    # The reader: regular files only (a FIFO must not block, a device must not be read), a size cap,
    # a nesting cap and bounded integers, for --config and for a published folder's files.
    ("config-fifo", lambda w: w.convert()[:2] + ["--config", _fifo(w.root / "c.json")], 2, "is a FIFO"),
    (
        "config-link-to-fifo",
        lambda w: w.convert()[:2] + ["--config", _link(w.root / "l.json", _fifo(w.root / "c.json"))],
        2,
        "l.json is a FIFO",
    ),
    ("config-dev-zero", lambda w: w.convert()[:2] + ["--config", "/dev/zero"], 2, "is a character device"),
    (
        "config-2gb-sparse",
        lambda w: w.convert()[:2] + ["--config", _sparse(w, "c.json")],
        2,
        "more than the 4 MiB",
    ),
    (
        "config-nested-100000-deep",
        lambda w: w.convert()[:2] + ["--config", w.file("c.json", "[" * 100_000 + "]" * 100_000)],
        2,
        "nested more than 64 levels",
    ),
    (
        "config-5000-digit-size",
        lambda w: w.convert()[:2] + ["--config", _config_text(w, "text_config.hidden_size", "9" * 5000)],
        2,
        "an integer of 5,000 digits",
    ),
    (
        "config-not-utf8",
        lambda w: w.convert()[:2] + ["--config", w.file("c.json", b'{"model_type": "\xff"}')],
        2,
        "not UTF-8",
    ),
    (
        "audit-config-fifo",
        lambda w: [
            "--audit",
            _converted(w),
            "--checkpoint",
            w.checkpoint,
            "--config",
            _fifo(w.root / "c.json"),
        ],
        2,
        "is a FIFO",
    ),
    ("published-config-fifo", lambda w: _back_with(w, "config.json", _fifo), 2, "config.json is a FIFO"),
    (
        "published-config-2gb-sparse",
        lambda w: _back_with(w, "config.json", lambda path: _truncated(path, 2 << 30), outside=True),
        2,
        "config.json is 2,147,483,648 bytes",
    ),
    (
        "published-config-nested-deep",
        lambda w: _back_with(
            w, "config.json", lambda path: path.write_text('{"a": ' * 50_000 + "1" + "}" * 50_000)
        ),
        2,
        "config.json: JSON nested more than 64 levels",
    ),
    (
        "published-preprocessor-fifo",
        lambda w: _back_with(w, "preprocessor_config.json", _fifo),
        2,
        "preprocessor_config.json is a FIFO",
    ),
    (
        "published-weights-fifo",
        lambda w: _back_with(w, "model.safetensors", _fifo),
        2,
        "model.safetensors is a FIFO",
    ),
    # Every config field the converter reads: type and range, sizes bounded by name.
    *[
        (
            f"config-{name.split('.')[-1]}-1e9",
            lambda w, name=name: _given(w, name, 10**9),
            2,
            f"{name} must be at most",
        )
        for name in (
            "vision_config.hidden_size",
            "text_config.num_hidden_layers",
            "vision_config.num_frames",
            "vision_config.image_size",
            "text_config.vocab_size",
            "text_config.max_position_embeddings",
            "vision_config.mit_intermediate_size",
        )
    ],
    (
        "config-size-float",
        lambda w: _given(w, "projection_dim", 32.0),
        2,
        "projection_dim must be a positive integer",
    ),
    (
        "config-size-bool",
        lambda w: _given(w, "prompt_layers", True),
        2,
        "prompt_layers must be a positive integer",
    ),
    (
        "config-hidden-act-unknown",
        lambda w: _given(w, "vision_config.hidden_act", "swishy"),
        2,
        "vision_config.hidden_act must be an activation transformers knows",
    ),
    (
        "config-prompt-hidden-act-number",
        lambda w: _given(w, "prompt_hidden_act", 3),
        2,
        "prompt_hidden_act must be an activation",
    ),
    (
        "config-layer-norm-eps-negative",
        lambda w: _given(w, "text_config.layer_norm_eps", -1e-5),
        2,
        "text_config.layer_norm_eps must be a number between 0 and 1",
    ),
    (
        "config-layer-norm-eps-string",
        lambda w: _given(w, "vision_config.layer_norm_eps", "tiny"),
        2,
        "vision_config.layer_norm_eps must be a number",
    ),
    (
        "config-dropout-above-one",
        lambda w: _given(w, "text_config.attention_dropout", 2),
        2,
        "text_config.attention_dropout must be a probability",
    ),
    (
        "config-logit-scale-string",
        lambda w: _given(w, "logit_scale_init_value", "abc"),
        2,
        "logit_scale_init_value must be a finite number",
    ),
    (
        "config-prompt-alpha-list",
        lambda w: _given(w, "prompt_alpha", [0.1]),
        2,
        "prompt_alpha must be a finite",
    ),
    (
        "config-num-channels-zero",
        lambda w: _given(w, "vision_config.num_channels", 0),
        2,
        "vision_config.num_channels must be a positive integer",
    ),
    (
        "config-patch-larger-than-image",
        lambda w: _given(w, "vision_config.patch_size", 64),
        2,
        "vision_config.patch_size 64 is larger than vision_config.image_size 32",
    ),
    (
        "config-string-with-escapes",
        lambda w: _given(w, "text_config.hidden_act", "\x1b[2Kquick_gelu\r\nwrote out"),
        2,
        "text_config.hidden_act must be an activation transformers knows (the original uses quick_gelu), "
        "found '\\x1b[2Kquick_gelu\\r\\nwrote out'",
    ),
    (
        "to-original-hidden-act-unknown",
        lambda w: _back(w, "vision_config.hidden_act", "swishy"),
        2,
        "config.json: vision_config.hidden_act must be an activation",
    ),
    (
        "to-original-size-1e9",
        lambda w: _back(w, "vision_config.intermediate_size", 10**9),
        2,
        "config.json: vision_config.intermediate_size must be at most",
    ),
    # Config fields the weights' shapes cannot show: image_size's patch grid, num_channels.
    (
        "config-image-size-off-grid",
        lambda w: _given(w, "vision_config.image_size", 36),
        2,
        "vision_config.image_size 36 is not vision_config.patch_size 8 × the 4×4 patch grid",
    ),
    (
        "config-image-size-240-on-b32-grid",
        lambda w: _b32_grid_at_240(w),
        2,
        "vision_config.image_size 240 is not vision_config.patch_size 32 × the 7×7 patch grid of the "
        "weights' position embedding: set image_size to 224",
    ),
    (
        "config-num-channels-1",
        lambda w: _given(w, "vision_config.num_channels", 1),
        2,
        "vision_config.num_channels 1 does not match the 3 input channels",
    ),
    (
        "config-num-channels-1-no-verify",  # refused before --no-verify would write a folder that cannot load
        lambda w: [*_given(w, "vision_config.num_channels", 1), "--output", w.parent / "out", "--no-verify"],
        2,
        "num_channels 1 does not match",
    ),
    (
        "audit-config-image-size-off-grid",
        lambda w: [
            "--audit",
            _converted(w),
            "--checkpoint",
            w.checkpoint,
            "--config",
            w.config_with("c.json", lambda d: _set(d, "vision_config.image_size", 36)),
        ],
        2,
        "set image_size to 32",
    ),
    (
        "to-original-num-channels-1",
        lambda w: _back(w, "vision_config.num_channels", 1),
        2,
        "config.json: vision_config.num_channels 1 does not match the 3 input channels",
    ),
    (
        "to-original-image-size-off-grid",
        lambda w: _back(w, "vision_config.image_size", 39),
        2,
        "config.json: vision_config.image_size 39 is not vision_config.patch_size 8",
    ),
    # model.safetensors.index.json: weight_map an object of shard files, each inside SOURCE.
    *[
        (
            f"index-weight-map-{kind}",
            lambda w, value=value: _sharded(w, lambda i: {**i, "weight_map": value}),
            2,
            "weight_map must be an object naming each tensor's shard file",
        )
        for kind, value in (
            ("list", ["model-00001-of-00001.safetensors"]),
            ("int", 7),
            ("str", "model-00001-of-00001.safetensors"),
            ("null", None),
            ("empty", {}),
        )
    ],
    (
        "index-weight-map-absent",
        lambda w: _sharded(w, lambda i: {"metadata": i["metadata"]}),
        2,
        "weight_map must be an object",
    ),
    *[
        (
            f"index-shard-name-{kind}",
            lambda w, value=value: _sharded(w, lambda i: _one_shard(i, value)),
            2,
            "must be a shard file name",
        )
        for kind, value in (("int", 5), ("null", None), ("list", ["a"]), ("empty", ""), ("nul", "a\0b"))
    ],
    (  # a read of the source that fails (ENAMETOOLONG), named as a read, not as a failed write
        "index-shard-name-too-long",
        lambda w: _sharded(w, lambda i: _one_shard(i, "a" * 5000 + ".safetensors")),
        2,
        "model.safetensors.index.json: cannot read shard 'aaaa",
    ),
    (
        "audit-report-of-an-index-shard-name-too-long",
        lambda w: [
            "--audit",
            _sharded(w, lambda i: _one_shard(i, "a" * 5000 + ".safetensors"))[1],
            "--checkpoint",
            w.checkpoint,
            "--config",
            w.config,
            "--report",
            w.root / "r.json",
        ],
        2,
        "model.safetensors.index.json: cannot read shard 'aaaa",
    ),
    # Published weights that no original holds: named in the source, before anything is written.
    (
        "published-weights-nan",
        lambda w: _back_with_weight(w, lambda t: torch.full_like(t, float("nan"))),
        2,
        "converted: model.safetensors: non-finite values (NaN or inf) in 1 tensors: "
        "text_model.final_layer_norm.bias (32 of 32). The weights are damaged; convert or download the model "
        "again",
    ),
    (
        "published-weights-int32",
        lambda w: _back_with_weight(w, lambda t: t.to(torch.int32)),
        2,
        "converted: model.safetensors: 1 tensors are not real floating-point weights: "
        "text_model.final_layer_norm.bias (dtype int32)",
    ),
    ("index-not-object", lambda w: _sharded(w, lambda i: [i]), 2, "index.json: expected a JSON object"),
    (
        "index-shard-dotdot",
        lambda w: _sharded(
            w, lambda i: _one_shard(i, "../elsewhere/model.safetensors"), place="../elsewhere"
        ),
        2,
        "lies outside",
    ),
    (
        "index-shard-absolute",
        lambda w: _sharded(
            w,
            lambda i: _one_shard(i, str(w.root / "elsewhere" / "m.safetensors")),
            place=str(w.root / "elsewhere" / "m.safetensors"),
        ),
        2,
        "lies outside",
    ),
    ("index-shard-link-out", lambda w: _sharded(w, lambda i: i, link_out=True), 2, "outside"),
    (
        "index-shard-fifo",
        lambda w: _sharded(w, lambda i: _one_shard(i, "fifo.safetensors"), fifo="fifo.safetensors"),
        2,
        "shard fifo.safetensors is a FIFO",
    ),
    (
        "index-shard-missing",
        lambda w: _sharded(w, lambda i: _one_shard(i, "model-00009-of-00009.safetensors")),
        2,
        "names missing shards: model-00009-of-00009.safetensors",
    ),
    (
        "index-nested-deep",
        lambda w: _index_replaced(w, lambda p: p.write_text("[" * 100_000 + "]" * 100_000)),
        2,
        "nested more than 64 levels",
    ),
    (
        "index-huge-sparse",
        lambda w: _index_replaced(w, lambda p: _truncated(p, 17 << 20)),
        2,
        "more than the 16 MiB",
    ),
    # The published image processor's settings: by type and range before anything runs them.
    *[
        (f"processor-{kind}", lambda w, change=change: _processor(w, change), 2, words)
        for kind, change, words in (
            ("image-mean-string", {"image_mean": "abc"}, "image_mean must be a list of 3 finite numbers"),
            ("image-mean-number", {"image_mean": 5}, "image_mean must be a list of 3 finite numbers"),
            ("image-mean-null-item", {"image_mean": [None]}, "image_mean must be a list of 3 finite numbers"),
            ("image-std-zero", {"image_std": [0.2, 0, 0.2]}, "image_std must be nonzero"),
            (
                "crop-30000",
                {"crop_size": {"height": 30000, "width": 30000}},
                "crop_size must be sizes in pixels",
            ),
            (
                "shortest-edge-1e9",
                {"size": {"shortest_edge": 10**9}},
                "size must be sizes in pixels from 1 to",
            ),
            ("resample-string", {"resample": "bilinear"}, "resample must be a PIL resampling filter"),
            ("do-resize-string", {"do_resize": "yes"}, "do_resize must be true or false"),
            (
                "rescale-factor-nan",
                {"rescale_factor": float("nan")},
                "rescale_factor must be a finite number",
            ),
        )
    ],
    (
        "processor-not-object",
        lambda w: _back_with(w, "preprocessor_config.json", lambda p: p.write_text("[224]")),
        2,
        "preprocessor_config.json: expected a JSON object",
    ),
    (
        "audit-processor-crop-30000",
        lambda w: [
            "--audit",
            _converted_with_processor(w, {"crop_size": {"height": 30000, "width": 30000}}),
            "--checkpoint",
            w.checkpoint,
            "--config",
            w.config,
        ],
        2,
        "preprocessor_config.json: crop_size must be sizes in pixels",
    ),
    ("bad-dtype", lambda w: w.convert("--dtype", "int8"), 2, "invalid choice"),
    ("verification-fails", lambda w: _wrong_heads(w), 1, "does not reproduce the original"),
]


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


def _inferred(w: Workspace, change: Callable[[dict], dict]) -> list[object]:
    """A conversion, without --config, of the golden's weights passed through `change`."""
    return ["--checkpoint", w.saved("changed.pth", {"model": change(w.state_dict())})]


def _zero_width_text_mlp(state_dict: dict) -> dict:
    mlp = "transformer.resblocks.0.mlp."
    empty = {
        "c_fc.weight": torch.zeros(0, 32),
        "c_fc.bias": torch.zeros(0),
        "c_proj.weight": torch.zeros(32, 0),
    }
    return {**state_dict, **{mlp + k: v for k, v in empty.items()}}


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


# ---- builders for the bounded reader's cases (issue 18 item 3, issue 19 item 4) ----------------


def _fifo(path: Path) -> Path:
    """A FIFO at `path`. Should the code regress and open it for reading (which blocks until a writer
    comes), a watcher opens it for writing after a while: the read then ends, and the case fails on
    its words instead of hanging the suite."""
    os.mkfifo(path)

    def release_a_blocked_reader() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and path.parent.exists():
            try:  # succeeds only while a reader has the FIFO open (or is blocked opening it)
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:
                time.sleep(0.2)

    threading.Thread(target=release_a_blocked_reader, daemon=True).start()
    return path


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def _truncated(path: Path, size: int) -> Path:
    """`path` as a sparse file of `size` bytes: no disk used, but reading it whole would take `size`."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as file:
        file.truncate(size)
    return path


def _unloadable_zip(w: Workspace, entry: str, mib: int, listed: int = 1) -> list[object]:
    """A torch zip that torch.load refuses (its tensor's record left out), plus `entry`: `mib` MiB of zeros,
    deflated, listed `listed` times in the central directory; the tool reads the archive to explain it."""
    whole = w.saved("whole.pth", {"model": {"w": torch.ones(4)}})
    path = w.root / "c.pth"
    with (
        zipfile.ZipFile(whole) as source,
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
    ):
        for info in source.infolist():
            if not info.filename.endswith("/data/0"):
                archive.writestr(info, source.read(info))
        with archive.open(entry, "w", force_zip64=True) as file:
            for _ in range(mib):
                file.write(bytes(1 << 20))
        archive.filelist += [archive.getinfo(entry)] * (listed - 1)  # written out as the central directory
    return ["--checkpoint", path, "--config", w.config]


def _nested_tensor() -> torch.Tensor:
    with warnings.catch_warnings():  # torch's notice that the nested-tensor API is a prototype
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])


def _sparse(w: Workspace, name: str) -> Path:
    """A 2 GB sparse file beside the workspace (the corpus' snapshot reads every file in it)."""
    return _truncated(w.root.parent / name, 2 << 30)


def _config_text(w: Workspace, path: str, raw: str) -> Path:
    """The golden config with `path` set to `raw`, spliced into the JSON text unparsed."""
    data = _set(json.loads(w.config.read_text()), path, "RAW")
    return w.file("c.json", json.dumps(data).replace('"RAW"', raw))


def _given(w: Workspace, path: str, value: object) -> list[object]:
    """A conversion of the golden whose --config has `path` set to `value`."""
    return ["--checkpoint", w.checkpoint, "--config", w.config_with("c.json", lambda d: _set(d, path, value))]


def _b32_grid_at_240(w: Workspace) -> list[object]:
    """A B/32-shaped checkpoint (patch 32 on a 7×7 grid, small widths) with a --config saying 240 px:
    240 // 32 is the same 7×7 grid, so no shape disagrees."""
    import dataclasses

    from converter.config import to_config
    from converter.synthetic import make_state_dict

    b32 = dataclasses.replace(helpers.SQUARE, image_size=224, patch_size=32)
    checkpoint = w.saved("b32.pth", {"model": make_state_dict(b32, seed=1)})
    to_config(dataclasses.replace(b32, image_size=240)).save_pretrained(w.root / "b32")
    return ["--checkpoint", checkpoint, "--config", w.root / "b32" / "config.json"]


def _back_with(
    w: Workspace, name: str, spoil: Callable[[Path], object], outside: bool = False
) -> list[object]:
    """--to-original of a converted golden whose file `name` is replaced by `spoil(path)`; `outside`
    builds the folder beside the workspace (for files the corpus' snapshot must not read whole)."""
    folder = _converted(w)
    if outside:
        folder = folder.rename(w.root.parent / "converted")
    (folder / name).unlink(missing_ok=True)
    spoil(folder / name)
    return ["--to-original", folder, "--output", w.root / "back.pth"]


def _without(state_dict: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k != key}


def _back_with_extra_key(w: Workspace, key: str = "extra.weight") -> list[object]:
    """--to-original of a converted golden with a key no X-CLIP has."""
    from safetensors.torch import load_file, save_file

    folder = _converted(w)
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, key: torch.zeros(1)}, folder / "model.safetensors")
    return ["--to-original", folder, "--output", w.root / "back.pth"]


def _back_with_weight(w: Workspace, change: Callable[[torch.Tensor], torch.Tensor]) -> list[object]:
    """--to-original of a converted golden whose text_model.final_layer_norm.bias is `change`d."""
    from safetensors.torch import load_file, save_file

    folder = _converted(w)
    weights = load_file(folder / "model.safetensors")
    key = "text_model.final_layer_norm.bias"
    save_file({**weights, key: change(weights[key])}, folder / "model.safetensors")
    return ["--to-original", folder, "--output", w.root / "back.pth"]


SHARD = "model-00001-of-00001.safetensors"


def _sharded(
    w: Workspace,
    change: Callable[[dict], object],
    place: str | None = None,
    link_out: bool = False,
    fifo: str | None = None,
) -> list[object]:
    """--to-original of the converted golden with its weights as one shard named by an index, the
    index passed through `change`. `place` moves the shard there (relative to the folder), `link_out`
    leaves a link to a shard outside the folder, `fifo` puts a FIFO of that name in the folder."""
    folder = _converted(w)
    weights = folder / "model.safetensors"
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        keys = list(f.keys())
    shard = folder / SHARD
    weights.rename(shard)
    if place is not None:
        target = folder / place
        target.parent.mkdir(parents=True, exist_ok=True)
        shard.rename(target)
    if link_out:
        (w.root / "elsewhere").mkdir()
        shard.rename(w.root / "elsewhere" / SHARD)
        shard.symlink_to(w.root / "elsewhere" / SHARD)
    if fifo is not None:
        _fifo(folder / fifo)
    index = {"metadata": {"total_size": 0}, "weight_map": dict.fromkeys(keys, SHARD)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(change(index)))
    return ["--to-original", folder, "--output", w.root / "back.pth"]


def _index_replaced(w: Workspace, spoil: Callable[[Path], object]) -> list[object]:
    """`_sharded` with its index file then replaced by `spoil(path)`."""
    argv = _sharded(w, lambda index: index)
    spoil(Path(argv[1]) / "model.safetensors.index.json")
    return argv


def _one_shard(index: dict, name: object) -> dict:
    """The index with every tensor in the shard `name`."""
    return {**index, "weight_map": dict.fromkeys(index["weight_map"], name)}


def _converted_with_processor(w: Workspace, change: dict) -> Path:
    folder = _converted(w)
    processor = folder / "preprocessor_config.json"
    processor.write_text(json.dumps({**json.loads(processor.read_text()), **change}))
    return folder


def _processor(w: Workspace, change: dict) -> list[object]:
    """--to-original of a converted golden whose preprocessor_config.json has `change` applied."""
    return ["--to-original", _converted_with_processor(w, change), "--output", w.root / "back.pth"]


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
    assert len(CASES) >= 120
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
    assert "internal error" not in err  # a bug's catch-all line is never a refusal
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
