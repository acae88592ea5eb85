"""A converted folder works in every supported transformers, 4.40 through the installed 5.x.

`test_transformers_version` (marker `compat`; runs only with `--compat` or `XCLIP_COMPAT=1`, since it
installs packages) builds a virtualenv per transformers release from the package index, with this
environment's torch through `--system-site-packages` (never another torch, never torchvision), and
runs this file's `probe` there, offline (`HF_HUB_OFFLINE=1`), on a folder `python -m converter` wrote:
a small synthetic model with CLIP's full 49408-token vocabulary, so the card's snippet runs with real
texts. Checked per version: the model loads with no missing or unexpected keys and gives this
environment's logits within 1e-5; the processor loads and preprocesses as here; the tokenizer, fast and
slow, gives this environment's ids; the card's snippet runs unchanged (only its placeholder path
replaced) to the same probabilities; and nothing warns about a missing file.
`XCLIP_COMPAT_VERSIONS="4.40.2 5.0.0"` picks other releases ("installed" is this environment).

`test_card_snippet_runs_here` runs the same snippet with the installed transformers, always.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

VERSIONS = ("4.40.2", "4.46.3", "4.50.3", "4.57.6", "5.0.0", "installed")
LOGITS_ATOL = 1e-5
PROBS_ATOL = 2e-4  # the snippet prints probabilities rounded to 4 decimals
TEXTS = ["eating spaghetti", "a photo of the Eiffel tower!"]
CLIP_IDS = [[49406, 4371, 18440, 49407], [49406, 320, 1125, 539, 518, 29720, 4730, 256, 49407]]
# What transformers says when a file it wants is absent.
MISSING_FILE = re.compile(r"missing|not found|no file|does not appear to have|could not (find|locate)", re.I)


# ---- run inside each virtualenv: stdlib, numpy and transformers only ---------------------------------


def probe(folder: str, work: str) -> None:
    """Load `folder` with the importing transformers; write `work`/result.json and result.npz."""
    import io
    import logging
    import warnings

    import numpy as np

    result: dict = {}
    arrays: dict = {}
    log = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import transformers
        from transformers import AutoProcessor, AutoTokenizer, XCLIPModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.add_handler(logging.StreamHandler(log))
        import tokenizers

        result["transformers"] = transformers.__version__
        result["tokenizers"] = tokenizers.__version__
        inputs = np.load(Path(work) / "inputs.npz")

        def check(name, fn):
            try:
                result[name] = fn()
            except Exception as err:  # noqa: BLE001 - every failure is a cell of the matrix
                result[name] = {"error": f"{type(err).__name__}: {err}"[:500]}

        def model():
            import torch

            loaded, info = XCLIPModel.from_pretrained(folder, output_loading_info=True)
            with torch.no_grad():
                out = loaded.eval()(
                    input_ids=torch.from_numpy(inputs["input_ids"]),
                    pixel_values=torch.from_numpy(inputs["pixel_values"]),
                )
            arrays["logits"] = out.logits_per_video.numpy()
            return {key: sorted(info[key]) for key in ("missing_keys", "unexpected_keys")}

        def processor():
            loaded = AutoProcessor.from_pretrained(folder)
            clip = list(np.load(Path(work) / "clip.npy"))
            arrays["pixel_values"] = np.asarray(
                loaded.image_processor(clip, return_tensors="np")["pixel_values"]
            )
            names = (loaded, loaded.image_processor, loaded.tokenizer)
            return {"classes": [type(x).__name__ for x in names]}

        def tokenizer(fast):
            loaded = AutoTokenizer.from_pretrained(folder, use_fast=fast)
            return {"class": type(loaded).__name__, "ids": loaded(TEXTS)["input_ids"]}

        check("model", model)
        check("processor", processor)
        check("tokenizer_fast", lambda: tokenizer(True))
        check("tokenizer_slow", lambda: tokenizer(False))
    snippet = subprocess.run(
        [sys.executable, "snippet.py"], cwd=work, capture_output=True, text=True, timeout=600
    )
    result["snippet"] = {"returncode": snippet.returncode, "stdout": snippet.stdout, "stderr": snippet.stderr}
    result["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught] + log.getvalue().splitlines()
    np.savez(Path(work) / "result.npz", **arrays)
    (Path(work) / "result.json").write_text(json.dumps(result, indent=1))


# ---- the tests -----------------------------------------------------------------------------------------


def subprocess_env(root: Path) -> dict[str, str]:
    """Offline, with every cache and HOME under `root` (its own, apart from the session sandbox)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XCLIP_", "PYTHON"))}
    env.update(HOME=str(root / "home"), XCLIP_CACHE=str(root / "xclip"), HF_HOME=str(root / "hf"))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A small synthetic model with CLIP's vocabulary, converted and verified by `python -m converter`."""
    import torch

    from converter.config import to_config
    from converter.synthetic import make_state_dict
    from tests.helpers import SQUARE

    root = tmp_path_factory.mktemp("compat")
    # One head per 64 channels: the original's own rule, so the conversion is verified as usual.
    hyper = dataclasses.replace(
        SQUARE, vocab_size=49408, vision_heads=1, text_heads=1, mit_heads=1, prompt_heads=1
    )
    torch.save({"model": make_state_dict(hyper, seed=7)}, root / "small.pth")
    to_config(hyper).save_pretrained(root / "config")
    out = root / "xclip-small"
    command = [sys.executable, "-m", "converter", "--checkpoint", root / "small.pth"]
    command += ["--config", root / "config" / "config.json", "--output", out]
    done = subprocess.run(
        [str(c) for c in command],
        capture_output=True,
        text=True,
        env=subprocess_env(root),
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    return out


def prepare_work(folder: Path, work: Path) -> None:
    """The probe's inputs, a clip for the snippet, and the card's snippet pointed at `folder`."""
    import numpy as np
    import torch

    from converter.card import PLACEHOLDER

    config = json.loads((folder / "config.json").read_text())
    frames, size = config["vision_config"]["num_frames"], config["vision_config"]["image_size"]
    gen = torch.Generator().manual_seed(0)
    np.savez(
        work / "inputs.npz",
        pixel_values=torch.randn(1, frames, 3, size, size, generator=gen).numpy(),
        input_ids=np.array([row + [49407] * (9 - len(row)) for row in CLIP_IDS], dtype=np.int64),
    )
    rng = np.random.default_rng(0)
    np.save(work / "clip.npy", rng.integers(0, 256, (frames, 48, 64, 3), dtype=np.uint8))
    card = (folder / "README.md").read_text()
    snippet = re.search(r"## Usage.*?```python\n(.*?)```", card, re.S).group(1)
    assert PLACEHOLDER in snippet
    (work / "snippet.py").write_text(snippet.replace(PLACEHOLDER, str(folder)))


def run_probe(python: str, folder: Path, work: Path, env: dict[str, str]) -> tuple[dict, dict]:
    import numpy as np

    prepare_work(folder, work)
    done = subprocess.run(
        [python, __file__, "probe", str(folder), str(work)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((work / "result.json").read_text())
    return result, dict(np.load(work / "result.npz"))


def missing_file_warnings(result: dict) -> list[str]:
    said = result["warnings"] + result["snippet"]["stderr"].splitlines()
    return [line for line in said if MISSING_FILE.search(line)]


def snippet_probs(result: dict) -> dict[str, float]:
    return json.loads(result["snippet"]["stdout"].strip().splitlines()[-1].replace("'", '"'))


@pytest.fixture(scope="module")
def reference(converted, tmp_path_factory) -> tuple[dict, dict]:
    """The probe's results with this environment's transformers."""
    root = tmp_path_factory.mktemp("reference")
    return run_probe(sys.executable, converted, root, subprocess_env(root))


def make_venv(version: str, root: Path) -> str:
    """A virtualenv with transformers==`version` on top of this environment's packages; its python."""
    import torch

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    constraints = root / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")  # already satisfied: never a second torch
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        # The release's own kernels range (this environment's newer kernels breaks 5.0's import); an
        # older release without the extra installs with a warning.
        + ["--constraint", str(constraints), f"transformers[hub-kernels]=={version}"],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0:
        pytest.fail(f"pip could not install transformers=={version}: {install.stderr[-2000:]}")
    site = subprocess.run(
        [
            python,
            "-c",
            "import torch, sysconfig; print(torch.__file__); print(sysconfig.get_paths()['purelib'])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not site[0].startswith(str(venv)), f"a second torch was installed into {venv}"
    assert not list(Path(site[1]).glob("torchvision*")), f"torchvision was installed into {venv}"
    return python


def versions() -> list[str]:
    chosen = os.environ.get("XCLIP_COMPAT_VERSIONS", "").split()
    return chosen or list(VERSIONS)


@pytest.fixture(scope="module")
def compat(request) -> None:
    """Skip unless asked for, before the module's other fixtures (module scope, listed first) convert."""
    if not (os.environ.get("XCLIP_COMPAT") or request.config.getoption("--compat", default=False)):
        pytest.skip(
            "compatibility matrix: builds a virtualenv per transformers release from the package index "
            "(minutes, network); run with --compat or XCLIP_COMPAT=1"
        )


@pytest.mark.compat
@pytest.mark.parametrize("version", versions())
def test_transformers_version(compat, version, converted, reference, record_property):
    with tempfile.TemporaryDirectory(prefix=f"xclip-compat-{version}-") as tmp:
        root = Path(tmp)
        python = sys.executable if version == "installed" else make_venv(version, root)
        (root / "work").mkdir()
        result, arrays = run_probe(python, converted, root / "work", subprocess_env(root))
    want, want_arrays = reference
    row = matrix_row(result, arrays, want, want_arrays)
    record_property("compat", row)
    versions = f"{result['transformers']} (tokenizers {result['tokenizers']})"
    print(f"\n| {versions} | " + " | ".join(row.values()) + " |")  # a row of README's matrix
    assert version == "installed" or result["transformers"] == version
    assert all(cell.startswith("✓") for cell in row.values()), row
    assert not missing_file_warnings(result), missing_file_warnings(result)


def matrix_row(result: dict, arrays: dict, want: dict, want_arrays: dict) -> dict[str, str]:
    """One cell per check: '✓ <figure or class>' or '✗ <why>'."""
    import numpy as np

    def cell(name: str, check) -> str:
        got = result[name]
        if "error" in got:
            return f"✗ {got['error']}"
        ok, detail = check(got)
        return f"{'✓' if ok else '✗'} {detail}"

    def model(got):
        if got["missing_keys"] or got["unexpected_keys"]:
            return False, f"missing {got['missing_keys']}, unexpected {got['unexpected_keys']}"
        delta = float(np.abs(arrays["logits"] - want_arrays["logits"]).max())
        return delta <= LOGITS_ATOL, f"logits Δ {delta:.1e}"

    def processor(got):
        delta = float(np.abs(arrays["pixel_values"] - want_arrays["pixel_values"]).max())
        return delta <= 1e-6, f"pixel Δ {delta:.1e}, {'/'.join(got['classes'][1:])}"

    def tokenizer(got):
        return got["ids"] == CLIP_IDS, got["class"] if got["ids"] == CLIP_IDS else f"ids {got['ids']}"

    snippet = result["snippet"]
    if snippet["returncode"] != 0:
        snippet_cell = f"✗ {snippet['stderr'].strip().splitlines()[-1:]}"
    else:
        got, expected = snippet_probs(result), snippet_probs(want)
        delta = max(abs(got[t] - expected[t]) for t in expected)
        ok = got.keys() == expected.keys() and delta <= PROBS_ATOL
        snippet_cell = f"✓ probabilities Δ {delta:.1e}" if ok else f"✗ {got}"
    return {
        "model": cell("model", model),
        "processor": cell("processor", processor),
        "tokenizer fast": cell("tokenizer_fast", tokenizer),
        "tokenizer slow": cell("tokenizer_slow", tokenizer),
        "snippet": snippet_cell,
    }


def test_card_snippet_runs_here(converted, reference):
    """With the installed transformers: the snippet runs, prints a probability per text, and the
    processor and tokenizers load without a word about missing files."""
    result, arrays = reference
    assert result["snippet"]["returncode"] == 0, result["snippet"]["stderr"]
    probs = snippet_probs(result)
    assert list(probs) == ["playing sports", "eating spaghetti", "go shopping"]
    assert abs(sum(probs.values()) - 1) < 1e-3
    row = matrix_row(result, arrays, result, arrays)
    assert all(cell.startswith("✓") for cell in row.values()), row
    assert not missing_file_warnings(result), missing_file_warnings(result)
    assert result["tokenizer_fast"]["ids"] == CLIP_IDS == result["tokenizer_slow"]["ids"]


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    probe(*sys.argv[2:4])
