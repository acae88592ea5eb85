"""The 18 published X-CLIP checkpoints: what each is, where it comes from and where the cache keeps it."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import unquote, urlsplit

from converter.errors import ConverterError

# The original release; ``$XCLIP_RELEASE_URL`` replaces it with a mirror that holds every file by name.
RELEASE_BASE_URL = "https://github.com/nbl97/X-CLIP_Model_Zoo/releases/download/v1.0"


@dataclass(frozen=True)
class Arch:
    name: str
    patch_size: int
    vision_width: int
    vision_layers: int
    embed_dim: int  # also the text, MIT and prompt width
    text_layers: int = 12


B32 = Arch("ViT-B/32", patch_size=32, vision_width=768, vision_layers=12, embed_dim=512)
B16 = Arch("ViT-B/16", patch_size=16, vision_width=768, vision_layers=12, embed_dim=512)
L14 = Arch("ViT-L/14", patch_size=14, vision_width=1024, vision_layers=24, embed_dim=768)


def cache_dir() -> Path:
    """The cache root: ``$XCLIP_CACHE`` or ``~/.cache/xclip-converter``."""
    if env := os.environ.get("XCLIP_CACHE"):
        return Path(env).expanduser()
    try:
        return Path.home() / ".cache" / "xclip-converter"
    except RuntimeError:  # no HOME, and a user id without a passwd entry (a container's, say)
        raise ConverterError(
            "no home folder to keep the download cache in: set XCLIP_CACHE to a folder"
        ) from None


def url_cache_path(url: str, cache: Path) -> Path:
    """``<cache>/url/<hash of the URL>/<file name>``: the hash keeps same-named files of two sources apart."""
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    name = unquote(PurePosixPath(urlsplit(url).path).name)[-100:]  # the end: its suffix; the hash tells apart
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return cache / "url" / key / (name or "download")


@dataclass(frozen=True)
class Source:
    kind: Literal["release", "gdrive"]
    ref: str  # release file name, or Drive file id
    filename: str  # the name the file goes by in --checkpoint-dir, on a mirror and in the cache

    def __post_init__(self) -> None:
        # Both end up in cache paths and URLs: refuse anything that could leave its folder.
        if self.kind not in ("release", "gdrive"):
            raise ConverterError(f"unknown source kind {self.kind!r}: expected 'release' or 'gdrive'")
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", self.filename):
            raise ConverterError(f"invalid checkpoint file name {self.filename!r}: not a plain file name")
        if self.kind == "gdrive" and not re.fullmatch(r"[A-Za-z0-9_-]+", self.ref):
            raise ConverterError(f"invalid Google Drive file id {self.ref!r}: use letters, digits, - and _")

    @property
    def from_release_url(self) -> bool:
        """A release asset, or any file when a mirror is set (a mirror holds the Drive-hosted ones too)."""
        return self.kind == "release" or bool(os.environ.get("XCLIP_RELEASE_URL"))

    @property
    def published_url(self) -> str:
        """Where the authors published it (the release or Drive), whatever mirror is set."""
        if self.kind == "gdrive":
            return f"https://drive.google.com/file/d/{self.ref}"
        return f"{RELEASE_BASE_URL}/{self.filename}"

    def url(self) -> str:
        """Where it is downloaded from: a mirror set with XCLIP_RELEASE_URL, else where it was published."""
        mirror = os.environ.get("XCLIP_RELEASE_URL", "").rstrip("/")
        if mirror and mirror.partition("://")[0].lower() not in ("http", "https", "file"):
            raise ConverterError(f"XCLIP_RELEASE_URL={mirror!r} is not an http://, https:// or file:// URL")
        return f"{mirror}/{self.filename}" if mirror else self.published_url

    def cache_path(self, cache: Path) -> Path:
        """Its URL's cache path (a mirror and the release never share one), or gdrive/<id>/<filename>."""
        if self.from_release_url:
            return url_cache_path(self.url(), cache)
        return cache / "gdrive" / self.ref / self.filename


def release(filename: str) -> Source:
    """A release asset, known by its file name."""
    return Source("release", filename, filename)


def gdrive(file_id: str, filename: str) -> Source:
    """A Google Drive file, known by its id; `filename` names it in the cache and on mirrors."""
    return Source("gdrive", file_id, filename)


@dataclass(frozen=True)
class Variant:
    name: str
    arch: Arch
    frames: int
    source: Source
    image_size: int = 224


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        # Kinetics-400, fully supervised
        Variant("xclip-base-patch32", B32, 8, release("k400_32_8.pth")),
        Variant("xclip-base-patch32-16-frames", B32, 16, release("k400_32_16.pth")),
        Variant("xclip-base-patch16", B16, 8, release("k400_16_8.pth")),
        Variant("xclip-base-patch16-16-frames", B16, 16, release("k400_16_16.pth")),
        Variant("xclip-large-patch14", L14, 8, gdrive("1NUOImq0o5DlQTST17iIP3vG7DgmHQuCx", "k400_14_8.pth")),
        Variant(
            "xclip-large-patch14-16-frames",
            L14,
            16,
            gdrive("1FOYgnJc097OJ4lGwtRCCydQyVPJEOH7d", "k400_14_16_336.pth"),
            image_size=336,
        ),
        # Kinetics-600
        Variant("xclip-base-patch16-kinetics-600", B16, 8, release("k600_16_8.pth")),
        Variant("xclip-base-patch16-kinetics-600-16-frames", B16, 16, release("k600_16_16.pth")),
        Variant(
            "xclip-large-patch14-kinetics-600",
            L14,
            8,
            gdrive("1FV8C1INuM91sLAN4ImjzePLIlpMSihwV", "k600_14_8.pth"),
        ),
        # few-shot HMDB-51 / UCF-101
        *(
            Variant(f"xclip-base-patch16-{data}-{shots}-shot", B16, 32, release(f"few_{data}_{shots}.pth"))
            for data in ("hmdb", "ucf")
            for shots in (2, 4, 8, 16)
        ),
        # zero-shot
        Variant("xclip-base-patch16-zero-shot", B16, 32, release("zero.pth")),
    )
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ConverterError(
            f"unknown model name {name!r}; the published variants are: {', '.join(VARIANTS)} "
            "(for your own checkpoint, omit --model-name)"
        )
    return VARIANTS[name]
