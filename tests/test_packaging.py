"""What `pip install` and an index get: the licence in the repository, sdist and wheel; no tests in the
sdist (they need the repository's data); metadata that setuptools can read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import converter

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LICENCES = ["LICENSE", "converter/data/LICENSE-CLIP.txt"]

_BUILD = """
import contextlib, sys
from setuptools import build_meta
out = sys.argv[1]
with contextlib.redirect_stdout(sys.stderr):  # setuptools' progress
    built = [build_meta.build_sdist(out), build_meta.build_wheel(out)]
print(*built)
"""


def test_the_licence_is_mit_as_the_metadata_says():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    assert PYPROJECT["project"]["license-files"] == LICENCES
    # `license = "MIT"` (an SPDX expression, PEP 639) needs setuptools 77.
    assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]


def test_metadata_has_urls_and_classifiers_for_every_supported_python():
    project = PYPROJECT["project"]
    assert project["requires-python"] == ">=3.10"
    versions = {
        c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if c.count("::") == 2 and "Python :: 3." in c
    }
    assert versions == {"3.10", "3.11", "3.12", "3.13"}
    assert all(url.startswith("https://") for url in project["urls"].values())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("setuptools", minversion="77")
    tmp = tmp_path_factory.mktemp("build")
    source = tmp / "source"
    ignored = shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "dist", ".*_cache", "data", "*.npz", "*.pth"
    )
    shutil.copytree(ROOT, source, ignore=ignored)
    shutil.copytree(ROOT / "converter" / "data", source / "converter" / "data")
    out = tmp / "dist"
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sdist, wheel = (out / name for name in done.stdout.split())
    return sdist, wheel


def test_the_sdist_has_the_licences_and_no_tests(built):
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert set(LICENCES) <= names and "converter/data/bpe_simple_vocab_16e6.txt.gz" in names
    assert not [
        n for n in names if n.startswith(("tests/", "benchmarks/", "expected/")) or n == "conftest.py"
    ]


def test_the_wheel_has_the_licences_and_the_vocabulary(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    info = next(n.split("/", 1)[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert {f"{info}/licenses/{licence}" for licence in LICENCES} <= names
    assert (
        "converter/data/bpe_simple_vocab_16e6.txt.gz" in names and "converter/data/LICENSE-CLIP.txt" in names
    )
    assert not [n for n in names if n.startswith("tests/")]
    assert (
        "License-Expression: MIT" in metadata
        and "Project-URL: Paper, https://arxiv.org/abs/2208.02816" in metadata
    )
    assert f"\nVersion: {converter.__version__}\n" in metadata  # the one version, which --version prints
