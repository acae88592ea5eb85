"""The per-model verification suite: every published variant through the whole cycle.

For each of the 18 registry names (in the test id, so `-k patch16`, `-k large`, `-k kinetics-600` select):

- `test_synthetic` (always runs): a full-size checkpoint with the model's exact original layout is
  served by a release mirror on 127.0.0.1 (`XCLIP_RELEASE_URL`), fetched, converted and written by
  `xclip-convert`, loaded with strict key checks, and compared with the oracle through the real
  processor and tokenizer.
- `test_release` (real weights): the released checkpoint from `--checkpoint-dir`, the cache or the
  network, on the spaghetti clip: HF against the oracle, and probabilities against expected/<model>.json.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, XCLIPModel

from converter import fetch, paths
from converter.cli import main
from converter.config import hyper_for_variant
from converter.errors import ConverterError
from converter.export import write_file
from converter.load import load_checkpoint
from converter.processing import preprocess_video
from converter.registry import VARIANTS, Variant
from converter.synthetic import save_training_layout
from converter.verify import DEFAULT_ATOL
from tests._http import LoopbackServer
from tests.helpers import compare, hf_outputs, oracle_outputs
from tests.release_clips import load_spaghetti_clip, real_checkpoint, unavailable
from tests.update_synthetic import stored_path, suite_inputs, synthetic_original, write

EXPECTED = Path(__file__).parent.parent / "expected"
# The oracle's outputs on each model's seeded synthetic checkpoint and clip (open_clip-style stored
# goldens): one full-size forward pass per model instead of two keeps the suite inside its budget on
# 2 cores. `--live-oracle` recomputes them and checks they are current; `--update-synthetic` rewrites
# them; CROSS_CHECKED always runs the oracle live, so the stored values are proven reproducible on
# every run.
CROSS_CHECKED = "xclip-base-patch32"
STORED_ATOL = 1e-5
# Tolerances are relative to each output's magnitude (converter/verify.py). XCLIPModel and the live
# oracle agree bit for bit on these models; the verification default leaves room for other CPUs'
# rounding of the stored values and fails every planted mistake by >= 10x (benchmarks/verification_power.py).
ATOL = DEFAULT_ATOL

MODELS = [pytest.param(name, marks=pytest.mark.xdist_group(name), id=name) for name in VARIANTS]


# ---- fixtures ----------------------------------------------------------------------------------


class ReleaseMirror:
    """A loopback server standing in for the GitHub release: files under their release names."""

    def __init__(self, root: Path, cache: Path, server: LoopbackServer):
        self.root, self.cache, self.server = root, cache, server

    def activate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point the release URL and the download cache at this mirror, for one test."""
        monkeypatch.setenv("XCLIP_RELEASE_URL", self.server.url("/"))
        monkeypatch.setenv("XCLIP_CACHE", str(self.cache))

    def publish(self, variant: Variant) -> dict[str, torch.Tensor]:
        """Place a seeded full-size checkpoint in the training layout at the model's release path."""
        original = synthetic_original(variant)
        save_training_layout(self.root / variant.source.filename, original, hyper_for_variant(variant))
        return original

    def withdraw(self, variant: Variant) -> None:
        (self.root / variant.source.filename).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def release_mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    with LoopbackServer(root=root) as server:
        yield ReleaseMirror(root, tmp_path_factory.mktemp("cache"), server)


SAVED_THIS_SESSION: set[Path] = set()  # one worker converts each model (xdist_group)


@pytest.fixture
def output_dir(request, tmp_path):
    """Where xclip-convert writes the model: --save-dir/<model-name>, or a temporary folder."""
    save_dir = request.config.getoption("--save-dir")
    name = request.node.callspec.params["name"]
    if save_dir:
        folder = Path(request.config.invocation_params.dir, save_dir, name)
        if (there := paths.what_is_there(folder)) not in (None, "a folder"):
            pytest.fail(
                f"--save-dir {save_dir}: {folder} is {there}, not a folder; remove it or choose another"
            )
        # Replaced only when this session wrote it (test_synthetic, then test_release): a folder of
        # the user's there is never lost.
        if folder not in SAVED_THIS_SESSION and folder.exists() and any(folder.iterdir()):
            kept = f"{folder} exists and is not empty; remove it or choose another"
            pytest.fail(f"--save-dir {save_dir}: {kept}")
        SAVED_THIS_SESSION.add(folder)
        yield folder
        return
    yield tmp_path / name
    # Up to 2.3 GB a model: pytest keeps the last runs' temporary folders, so drop it now.
    shutil.rmtree(tmp_path / name, ignore_errors=True)


def convert_with_cli(args: list[object], output: Path) -> XCLIPModel:
    """Run xclip-convert, then load its folder with strict key checks."""
    status = main([str(a) for a in args] + ["--output", str(output), "--overwrite", "--no-verify"])
    if status in (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP):
        raise KeyboardInterrupt  # Ctrl-C stops the gate, as it stops pytest, not only this model
    assert status == 0
    model, info = XCLIPModel.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def compare_with_oracle(model, original, pixel_values, input_ids):
    expected = oracle_outputs(original, pixel_values, input_ids)
    result = compare(expected, hf_outputs(model, pixel_values, input_ids), ATOL)
    assert result.passed, result.summary()
    return result, expected


# ---- synthetic: always runs --------------------------------------------------------------------


def synthetic_oracle_outputs(config, name, original, pixel_values, input_ids) -> dict[str, torch.Tensor]:
    """The oracle's outputs: stored, or computed live (and then checked against the stored ones)."""
    stored_file = stored_path(name)
    update = config.getoption("--update-synthetic")
    live = update or config.getoption("--live-oracle") or name == CROSS_CHECKED or not stored_file.exists()
    if not live:
        return {k: torch.from_numpy(v) for k, v in np.load(stored_file).items()}
    computed = oracle_outputs(original, pixel_values, input_ids)
    if update:
        write(name, computed)
    elif stored_file.exists():
        stored = {k: torch.from_numpy(v) for k, v in np.load(stored_file).items()}
        check = compare({k: computed[k] for k in stored}, stored, STORED_ATOL)
        assert check.passed, (
            f"stored oracle outputs for {name} are stale ({check.summary()}); "
            "rerun python -m tests.update_synthetic"
        )
    return computed


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_synthetic(name, release_mirror, output_dir, record_property, monkeypatch, request):
    variant = VARIANTS[name]
    hyper = hyper_for_variant(variant)
    release_mirror.activate(monkeypatch)
    release_mirror.publish(variant)
    try:
        # The same path as a real release: registry -> mirror URL -> cache -> load -> convert -> write.
        model = convert_with_cli(["--model-name", name], output_dir)
        fetched = fetch.cached_source(variant.source)
        assert fetched is not None and release_mirror.server.full_gets(f"/{variant.source.filename}") == 1
        original = load_checkpoint(fetched)

        processor = AutoProcessor.from_pretrained(output_dir)
        inputs = suite_inputs(processor, hyper.frames)  # as the stored outputs were computed
        assert inputs["pixel_values"].shape == (1, hyper.frames, 3, hyper.image_size, hyper.image_size)
        pixel_values, input_ids = inputs["pixel_values"], inputs["input_ids"]
        expected = synthetic_oracle_outputs(request.config, name, original, pixel_values, input_ids)
        result = compare(expected, hf_outputs(model, pixel_values, input_ids), ATOL)
        assert result.passed, result.summary()
        # Not degenerate: the texts are told apart.
        assert expected["logits"].std() > 1e-2, expected["logits"]
        record_property("synthetic_max_abs_diff", max(result.max_abs_diff.values()))
    finally:
        release_mirror.withdraw(variant)
        if (path := fetch.cached_source(variant.source)) is not None:
            fetch.forget(path)


# ---- release: real weights ---------------------------------------------------------------------


def expected_pixel_values(preprocessing: dict, clip: np.ndarray, image_size: int) -> torch.Tensor:
    """The clip preprocessed as an expected JSON's probabilities were computed."""
    from PIL import Image
    from transformers import VideoMAEImageProcessorPil

    if preprocessing["name"] == "original":
        return preprocess_video(clip, image_size)
    processor = VideoMAEImageProcessorPil(
        size={"shortest_edge": preprocessing["shortest_edge"]},
        crop_size={"height": preprocessing["crop_size"], "width": preprocessing["crop_size"]},
        image_mean=preprocessing["image_mean"],
        image_std=preprocessing["image_std"],
        resample=Image.Resampling[preprocessing["resample"].upper()],
    )
    return processor(list(clip), return_tensors="pt")["pixel_values"]


def processor_tolerance(gap: float, floor: float) -> float:
    """The tolerance the saved processor's approximation needs: twice the measured gap, rounded up to
    one significant digit, and never tighter than the fixture's own tolerance."""
    x = max(2 * gap, floor)
    scale = 10 ** math.floor(math.log10(x))
    return round(math.ceil(round(x / scale, 6)) * scale, 12)


def probabilities(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=pixel_values).logits_per_video.softmax(dim=1)


def rounded(probs: torch.Tensor) -> list[float]:
    return [round(p, 4) for p in probs.flatten().tolist()]


@pytest.mark.release
@pytest.mark.parametrize("name", MODELS)
def test_release(name, request, output_dir, record_property):
    config = request.config
    variant = VARIANTS[name]
    expected_file = EXPECTED / f"{name}.json"
    expected = json.loads(expected_file.read_text())
    checkpoint = real_checkpoint(config, variant)
    try:
        clip = load_spaghetti_clip(variant.frames)
    except ConverterError as err:
        unavailable(config, str(err))

    model = convert_with_cli(["--checkpoint", checkpoint, "--model-name", name], output_dir)
    original = load_checkpoint(checkpoint)
    processor = AutoProcessor.from_pretrained(output_dir)
    users = processor(text=expected["texts"], videos=list(clip), return_tensors="pt", padding=True)
    input_ids = users["input_ids"]
    # The oracle sees what the original would: the original's preprocessing (within one uint8 level).
    pixel_values = preprocess_video(clip, variant.image_size)
    result, oracle = compare_with_oracle(model, original, pixel_values, input_ids)
    record_property("release_max_abs_diff", max(result.max_abs_diff.values()))
    # What users get: the saved AutoProcessor, which only approximates the original's resize.
    user_probs = probabilities(model, input_ids, users["pixel_values"])

    if config.getoption("--update-expected"):
        probs = oracle["logits"].softmax(dim=1)
        gap = float((user_probs - probs).abs().max())
        expected.update(
            expected_probs=[round(p, 6) for p in probs[0].tolist()],
            preprocessing={"name": "original", "image_size": variant.image_size},
            processor_atol=processor_tolerance(gap, expected["atol"]),
            provenance=(
                f"the oracle (converter/oracle.py) on the real checkpoint {checkpoint.name}, the clip "
                f"preprocessed by converter.processing.preprocess_video (the original's); processor_atol: "
                f"twice the saved AutoProcessor's measured gap ({gap:.1e}), rounded up"
            ),
            confirmed=True,
            unconfirmed_reason=None,
        )
        write_file(expected_file, json.dumps(expected, indent=2) + "\n", flag="--update-expected")
        return

    preprocessing = expected["preprocessing"]
    want = torch.tensor([expected["expected_probs"]])
    processor_atol = expected.get("processor_atol")
    if preprocessing["name"] == "original":
        assert processor_atol is not None, f"{expected_file} has no processor_atol: rerun --update-expected"
        users_line = f"saved AutoProcessor {rounded(user_probs)} vs {rounded(want)} (atol {processor_atol:g})"
    else:
        users_line = (
            f"saved AutoProcessor {rounded(user_probs)} (expected from other preprocessing: not compared)"
        )
    record_property(
        "preprocessing",
        f"oracle on preprocess_video (the original's); expected from {preprocessing['name']}; {users_line}",
    )
    if not expected["confirmed"]:
        pytest.skip(
            f"oracle check passed; probability check skipped: unconfirmed: {expected['unconfirmed_reason']}"
        )
    probs = probabilities(model, input_ids, expected_pixel_values(preprocessing, clip, variant.image_size))
    record_property("probabilities", f"{rounded(probs)} vs {rounded(want)} (atol {expected['atol']:g})")
    assert torch.allclose(probs, want, atol=expected["atol"]), f"{probs} vs {want}"
    if processor_atol is not None:
        gap = float((user_probs - want).abs().max())
        assert gap <= processor_atol, (
            f"through the saved AutoProcessor: {rounded(user_probs)} vs {rounded(want)}, max |Δ| {gap:.1e} "
            f"> processor_atol {processor_atol:g}"
        )
