"""Where each published checkpoint comes from and where the cache keeps it (registry.Source)."""

from __future__ import annotations

from pathlib import Path

import pytest

from converter import fetch, registry
from converter.errors import ConverterError
from converter.registry import VARIANTS
from tests._http import LoopbackServer

CHECKPOINT = b"\x80 weights"  # a pickle's first byte: fetch caches only what could be a checkpoint


def test_release_assets_come_from_the_release_or_a_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    source = VARIANTS["xclip-base-patch32"].source
    assert source.url() == registry.RELEASE_BASE_URL + "/k400_32_8.pth"
    monkeypatch.setenv("XCLIP_RELEASE_URL", "http://mirror.example/xclip/")
    assert source.url() == "http://mirror.example/xclip/k400_32_8.pth"


@pytest.mark.parametrize("mirror", ["/data/mirror", "ftp://mirror.example/xclip"])
def test_a_mirror_that_is_not_a_url_is_named(monkeypatch: pytest.MonkeyPatch, mirror: str) -> None:
    monkeypatch.setenv("XCLIP_RELEASE_URL", mirror)
    with pytest.raises(ConverterError, match=f"^XCLIP_RELEASE_URL='{mirror}' is not an http://"):
        VARIANTS["xclip-base-patch32"].source.url()


def test_drive_files_come_from_drive_unless_a_mirror_holds_them(monkeypatch: pytest.MonkeyPatch) -> None:
    source = VARIANTS["xclip-large-patch14"].source
    assert not source.from_release_url
    assert source.url() == "https://drive.google.com/file/d/1NUOImq0o5DlQTST17iIP3vG7DgmHQuCx"
    assert source.cache_path(Path("/c")) == Path("/c/gdrive/1NUOImq0o5DlQTST17iIP3vG7DgmHQuCx/k400_14_8.pth")
    monkeypatch.setenv("XCLIP_RELEASE_URL", "http://mirror.example/xclip")
    assert source.from_release_url and source.url() == "http://mirror.example/xclip/k400_14_8.pth"
    assert source.cache_path(Path("/c")) == fetch.url_cache_path(source.url(), Path("/c"))


def test_every_source_has_its_own_cache_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for mirror in (None, "http://mirror.example/xclip"):
        if mirror:
            monkeypatch.setenv("XCLIP_RELEASE_URL", mirror)
        paths = {v.source.cache_path(Path("/c")) for v in VARIANTS.values()}
        assert len(paths) == len(VARIANTS)
    # The mirror's copy and the release's never share a path.
    source = VARIANTS["xclip-base-patch32"].source
    on_mirror = source.cache_path(Path("/c"))
    monkeypatch.delenv("XCLIP_RELEASE_URL")
    assert source.cache_path(Path("/c")) != on_mirror


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: registry.gdrive("../etc", "m.pth"), "invalid Google Drive file id"),
        (lambda: registry.gdrive("1abc", "../m.pth"), "invalid checkpoint file name"),
        (lambda: registry.release("a/b.pth"), "invalid checkpoint file name"),
        (lambda: registry.release(".hidden"), "invalid checkpoint file name"),
        (lambda: registry.Source("ftp", "x", "x.pth"), "unknown source kind"),
    ],
    ids=[
        "gdrive-id-with-dots",
        "gdrive-name-with-dots",
        "release-name-with-slash",
        "release-hidden-name",
        "ftp",
    ],
)
def test_a_source_cannot_point_outside_its_folder(make, match: str) -> None:
    with pytest.raises(ConverterError, match=match):
        make()


def test_fetch_source_and_cached_source_use_the_registry_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    source = VARIANTS["xclip-base-patch32"].source
    with LoopbackServer({"/k400_32_8.pth": CHECKPOINT}) as mirror:
        monkeypatch.setenv("XCLIP_RELEASE_URL", mirror.base_url)
        assert fetch.cached_source(source) is None
        path = fetch.fetch_source(source, sha256=None)
        assert path == source.cache_path(fetch.cache_dir()) == fetch.cached_source(source)
        assert source.url() == mirror.url("/k400_32_8.pth")
    assert path.read_bytes() == CHECKPOINT


@pytest.mark.parametrize(
    ("url", "name"), [("https://h/a/..", "download"), ("https://h/.hidden.pth", "hidden.pth")]
)
def test_url_cache_path_never_names_a_dot_file_or_the_parent(url: str, name: str) -> None:
    """A URL's last part '..' (or '.x') must not climb out of, or hide in, its cache folder."""
    from converter.registry import url_cache_path

    path = url_cache_path(url, Path("/c"))
    assert path.name == name and path.parent.parent == Path("/c/url")
