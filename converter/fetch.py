"""Download layer: fetch release assets (HTTP) and Google Drive files into a per-source cache.

Every source gets its own cache path (``url/<hash of url>/<name>``, ``gdrive/<id>/<name>``), so two models can
never overwrite each other. A download streams into ``<final>.part`` and is renamed only when complete and
hashed; its sha256 is recorded beside it as ``<final>.sha256``. An inter-process lock on ``<final>.lock``
makes concurrent processes (pytest-xdist workers, parallel CLI runs) fetch a file once.

All user-facing failures are raised as :class:`~converter.errors.ConverterError` with one line that names
what failed and what to do.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from converter.errors import ConverterError

if TYPE_CHECKING:
    import requests

    from converter.registry import Source

RELEASE_BASE_URL = "https://github.com/nbl97/X-CLIP_Model_Zoo/releases/download/v1.0"

# Module constants rather than arguments so that tests (and impatient users) can shorten them in one place.
CONNECT_TIMEOUT = 10.0  # seconds to establish a TCP connection
READ_TIMEOUT = 60.0  # seconds of silence tolerated between bytes
MAX_RETRIES = 5  # extra attempts after a transient failure (drop, timeout, 5xx, short body)
BACKOFF_BASE = 1.0  # first retry waits this long, then doubles ...
BACKOFF_MAX = 30.0  # ... up to this cap
UNREACHABLE_RETRIES = 2  # quick extra tries when the host refuses connections before we ever reached it
UNREACHABLE_DELAY = 0.2  # seconds between those quick tries
CHUNK_SIZE = 1 << 20  # hashing block
# Network read block: bytes read into a block that a dropped connection interrupts are lost, so keep it small
# enough that a resume loses little.
NET_CHUNK_SIZE = 64 << 10

_OFFLINE_HINT = (
    "you appear to be offline. Use --checkpoint PATH for a local file, set XCLIP_CACHE to a cache that "
    "holds it, or XCLIP_RELEASE_URL to a mirror."
)
_GDRIVE_ID = re.compile(r"^[A-Za-z0-9_-]+$")


# ----------------------------------------------------------------------------------------------------
# Locations


def cache_dir() -> Path:
    """The cache root: ``$XCLIP_CACHE`` or ``~/.cache/xclip-converter``."""
    env = os.environ.get("XCLIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xclip-converter"


def release_base_url() -> str:
    """Base URL of the released checkpoints: ``$XCLIP_RELEASE_URL`` (a mirror) or the GitHub release."""
    env = os.environ.get("XCLIP_RELEASE_URL")
    return env.rstrip("/") if env else RELEASE_BASE_URL


def release_url(filename: str) -> str:
    """URL of one released checkpoint file."""
    return f"{release_base_url()}/{filename}"


def _sanitize(name: str) -> str:
    # Names come from URLs and users; keep them to one harmless path component.
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return name or "download"


def _url_cache_path(url: str, cache: Path) -> Path:
    # The URL hash keeps same-named files from different sources apart; the basename keeps the cache readable.
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return cache / "url" / key / _sanitize(unquote(PurePosixPath(urlsplit(url).path).name))


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


# ----------------------------------------------------------------------------------------------------
# Integrity records


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, streamed (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_record(path: Path) -> str | None:
    try:
        text = _record_path(path).read_text(encoding="ascii").strip().lower()
    except (OSError, UnicodeDecodeError):
        return None
    return text if re.fullmatch(r"[0-9a-f]{64}", text) else None


def recorded_sha256(path: Path | str) -> str | None:
    """The digest recorded when `path` was fetched, if any (no hashing)."""
    return _read_record(Path(path))


def _write_record(path: Path, digest: str) -> None:
    # Write-then-rename so a reader never sees a half-written record.
    record = _record_path(path)
    tmp = record.with_name(f"{record.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # unique per writer
    tmp.write_text(digest + "\n", encoding="ascii")
    os.replace(tmp, record)


def forget(path: Path | str) -> None:
    """Delete a cached file and its records (sha256, partial downloads); used by --force-download and
    to recover from a corrupt cache. The ``.lock`` file stays: another process may be waiting on it."""
    path = Path(path)
    # gdown keeps its own partial files as "<output><8 random chars>.part" next to our ".part" output.
    leftovers = list(path.parent.glob(glob.escape(path.name) + ".part*")) if path.parent.is_dir() else []
    for p in [path, _record_path(path), _part_path(path), *leftovers]:
        p.unlink(missing_ok=True)


def _cached(path: Path, sha256: str | None) -> bool:
    """Whether ``path`` is a usable cache hit (exists and, if pinned, matches the pin)."""
    if not path.is_file():
        return False
    if sha256 is None:
        return True
    recorded = _read_record(path)
    if recorded is None:  # record lost (older cache, manual copy): recompute once and keep it
        recorded = sha256_file(path)
        _write_record(path, recorded)
    return recorded == sha256.lower()


# ----------------------------------------------------------------------------------------------------
# Shared cache / lock / integrity wrapper


def _fetch_cached(
    final: Path, describe: str, download: Callable[[Path], None], *, sha256: str | None, force: bool
) -> Path:
    """Return ``final``, downloading it with ``download(part_path)`` unless a good copy is cached."""
    # Fast path without the lock: ``final`` only ever appears complete (atomic rename), record first.
    if not force and _cached(final, sha256):
        return final

    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(_lock_path(final))):
        # Another process may have finished the download while we waited for the lock.
        if not force and _cached(final, sha256):
            return final
        part = _part_path(final)
        if force:
            forget(final)
        else:
            # Drop a stale or mismatching final copy, but keep ``.part`` so the download can resume.
            final.unlink(missing_ok=True)
            _record_path(final).unlink(missing_ok=True)

        download(part)

        digest = sha256_file(part)
        if sha256 is not None and digest != sha256.lower():
            part.unlink(missing_ok=True)
            raise ConverterError(
                f"checksum mismatch for {describe}: expected sha256 {sha256.lower()}, got {digest}; "
                "the download was deleted. Re-run to retry, or use --checkpoint PATH with a verified copy."
            )
        _write_record(final, digest)
        os.replace(part, final)
    return final


# ----------------------------------------------------------------------------------------------------
# HTTP


def fetch_url(url: str, *, sha256: str | None = None, force: bool = False, cache: Path | None = None) -> Path:
    """Fetch ``http(s)://`` or ``file://`` ``url`` and return the local path.

    HTTP downloads are cached under ``<cache>/url/<sha256(url)[:16]>/<basename>``; a cache hit (matching
    ``sha256`` when pinned) touches no network unless ``force``. ``file://`` URLs return the local path.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return _local_file(url, sha256)
    if scheme not in ("http", "https"):
        raise ConverterError(
            f"unsupported URL scheme in {url!r}: use an http://, https:// or file:// URL, "
            "or --checkpoint PATH for a local file."
        )
    final = _url_cache_path(url, Path(cache) if cache is not None else cache_dir())
    return _fetch_cached(final, url, lambda part: _download_http(url, part), sha256=sha256, force=force)


def _local_file(url: str, sha256: str | None) -> Path:
    parts = urlsplit(url)
    path = Path(url2pathname(parts.path))
    if parts.netloc not in ("", "localhost"):
        raise ConverterError(f"cannot use {url}: only local file:// URLs (no host) are supported.")
    if not path.is_file():
        raise ConverterError(f"local file not found: {path} (from {url}); check the path.")
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256.lower():
            # The user's own file: report, never delete.
            raise ConverterError(
                f"checksum mismatch for {path}: expected sha256 {sha256.lower()}, got {digest}; "
                "the file is not the expected checkpoint."
            )
    return path


class _Transient(Exception):
    """A failure worth retrying (dropped connection, timeout, 5xx, short body)."""


class _Short(_Transient):
    """The body ended before the announced length."""


def _unreachable(exc: BaseException) -> tuple[str, bool] | None:
    """(why, worth a quick retry) when no connection could be established at all; None otherwise."""
    import requests
    import urllib3

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connection timed out", False  # the timeout itself already waited long enough
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(reason, urllib3.exceptions.NameResolutionError):
        return "host name could not be resolved", False  # offline: asking again will not help
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        cause = reason.__cause__ or reason.__context__
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused", True  # e.g. a mirror restarting
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower(), True
        return "connection failed", True
    return None


def _retryable(exc: BaseException) -> bool:
    """Whether a requests error is a transient network failure (not a TLS, proxy or URL problem)."""
    import requests

    e = requests.exceptions
    if isinstance(exc, (e.SSLError, e.ProxyError)):
        return False
    return isinstance(exc, (e.ConnectionError, e.Timeout, e.ChunkedEncodingError, e.ContentDecodingError))


def _backoff(retry: int) -> float:
    return min(BACKOFF_BASE * 2 ** (retry - 1), BACKOFF_MAX)


def _status_hint(status: int) -> str:
    if status == 404:
        return (
            "the file does not exist there; check the model name, or XCLIP_RELEASE_URL if you use a mirror, "
            "or pass --checkpoint PATH for a local copy."
        )
    if status in (401, 403):
        return "access was denied; download it manually and pass --checkpoint PATH."
    return "check the URL (or XCLIP_RELEASE_URL), or pass --checkpoint PATH for a local copy."


def _download_http(url: str, part_path: Path) -> None:
    """Download ``url`` into ``part_path``, resuming an existing partial file.

    Retries dropped connections, timeouts, 5xx and short bodies with exponential backoff, resuming with a
    ``Range`` request; fails at once on 4xx (removing the partial file) and fast when the host is unreachable.
    """
    import requests

    host = urlsplit(url).hostname or url
    reached = False  # once the host has answered, connection failures are transient, not "offline"
    retries = 0
    quick_tries = 0
    with requests.Session() as session:
        while True:
            try:
                _attempt_http(session, url, part_path)
                return
            except requests.exceptions.RequestException as exc:
                unreachable = None if reached else _unreachable(exc)
                if unreachable is not None:
                    # Report "offline" fast instead of spending the whole backoff budget on it.
                    why, quick_retry = unreachable
                    if not quick_retry or quick_tries >= UNREACHABLE_RETRIES:
                        msg = f"cannot reach {host} ({why} for {url}): {_OFFLINE_HINT}"
                        raise ConverterError(msg) from None
                    quick_tries += 1
                    time.sleep(UNREACHABLE_DELAY)
                    continue
                if not _retryable(exc):
                    raise ConverterError(
                        f"download of {url} failed ({_one_line(exc)}); check the URL, proxy and TLS "
                        "settings, or pass --checkpoint PATH for a local copy."
                    ) from None
                last: Exception = exc
            except _Transient as exc:
                last = exc
            reached = True
            retries += 1
            if retries > MAX_RETRIES:
                break
            time.sleep(_backoff(retries))

    if isinstance(last, _Short):
        raise ConverterError(
            f"download of {url} was truncated ({last}) on {MAX_RETRIES + 1} attempts; the partial file is "
            "kept and a re-run resumes it, or use --checkpoint PATH for a local copy."
        )
    raise ConverterError(
        f"download of {url} failed after {MAX_RETRIES + 1} attempts ({_one_line(last)}); "
        "re-run to resume, or use --checkpoint PATH for a local copy."
    )


def _one_line(exc: BaseException | None) -> str:
    text = str(exc) if exc is not None else "unknown error"
    return " ".join(text.split())[:300] or type(exc).__name__


def _attempt_http(session: requests.Session, url: str, part_path: Path) -> None:
    """One GET; appends to ``part_path``. Raises _Transient / requests errors for the retry loop."""
    import requests

    have = part_path.stat().st_size if part_path.exists() else 0
    # identity: Content-Length and Range offsets must count the bytes we write to disk.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with session.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as resp:
        status = resp.status_code
        if status == 416 and have:
            # Our partial file is at or past the end. Complete if it matches the total; else start over.
            total = _content_range_total(resp.headers.get("Content-Range", ""))
            if total == have:
                return
            part_path.unlink(missing_ok=True)
            raise _Transient(f"HTTP 416 for a resume at byte {have}; restarting")
        if 400 <= status < 500:
            part_path.unlink(missing_ok=True)
            msg = f"download of {url} failed: HTTP {status} {resp.reason}; {_status_hint(status)}"
            raise ConverterError(msg)
        if status >= 500:
            raise _Transient(f"HTTP {status} {resp.reason}")
        if status not in (200, 206):
            raise ConverterError(
                f"download of {url} failed: unexpected HTTP {status} {resp.reason}; "
                "check the URL, or pass --checkpoint PATH for a local copy."
            )

        mode = "ab"
        if status == 200:
            # A full body: the server ignored our Range (or there was none), so start the file afresh.
            have = 0
            mode = "wb"
            total = _int_or_none(resp.headers.get("Content-Length"))
        else:
            start, total = _parse_content_range(resp.headers.get("Content-Range", ""))
            if start != have:
                part_path.unlink(missing_ok=True)
                raise _Transient(f"server resumed at byte {start}, not {have}; restarting")
        if resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
            total = None  # a length that counts encoded bytes says nothing about the decoded file

        size = have
        with open(part_path, mode) as f, _progress(total, have, part_path.name) as bar:
            try:
                for block in resp.iter_content(NET_CHUNK_SIZE):
                    f.write(block)
                    size += len(block)
                    bar.update(len(block))
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as exc:
                # A dropped connection mid-body; keep what we have so the next attempt resumes.
                if total is not None and size < total:
                    raise _Short(f"got {size} of {total} bytes") from exc
                raise _Transient(_one_line(exc)) from exc
        if total is not None and size < total:
            raise _Short(f"got {size} of {total} bytes")
        if total is not None and size > total:
            part_path.unlink(missing_ok=True)
            raise _Transient(f"got {size} bytes, more than the announced {total}; restarting")


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _parse_content_range(header: str) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", header)
    if not m:
        raise _Transient(f"bad Content-Range {header!r} in a 206 answer")
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


def _content_range_total(header: str) -> int | None:
    m = re.search(r"/(\d+)\s*$", header)
    return int(m.group(1)) if m else None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _progress(total: int | None, initial: int, name: str) -> Any:
    # Progress bars only for a human watching a terminal; logs and CI stay clean.
    if not _stderr_is_tty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr
    )


# ----------------------------------------------------------------------------------------------------
# Google Drive


def fetch_gdrive(
    file_id: str,
    *,
    filename: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    cache: Path | None = None,
) -> Path:
    """Fetch a Google Drive file by id (through gdown) into ``<cache>/gdrive/<id>/<filename or id.pth>``.

    The path is unique per id, so two Drive models can never overwrite each other.
    """
    if not _GDRIVE_ID.fullmatch(file_id):
        raise ConverterError(
            f"invalid Google Drive file id {file_id!r}: expected only letters, digits, '-' and '_'."
        )
    final = _gdrive_cache_path(file_id, filename, Path(cache) if cache is not None else cache_dir())
    return _fetch_cached(
        final,
        f"Google Drive file {file_id}",
        lambda part: _download_gdrive(file_id, part),
        sha256=sha256,
        force=force,
    )


def _gdrive_cache_path(file_id: str, filename: str | None, cache: Path) -> Path:
    return cache / "gdrive" / file_id / _sanitize(filename or f"{file_id}.pth")


# ----------------------------------------------------------------------------------------------------
# Registry sources (a release asset or a Drive file)


def fetch_source(source: Source, *, sha256: str | None = None, force: bool = False) -> Path:
    """Fetch a published checkpoint from where the registry says it lives.

    A mirror (`XCLIP_RELEASE_URL`) holds every file under its name, the Drive-hosted ones too.
    """
    if _from_release_url(source):
        return fetch_url(release_url(source.filename), sha256=sha256, force=force)
    return fetch_gdrive(source.ref, filename=source.filename, sha256=sha256, force=force)


def _from_release_url(source: Source) -> bool:
    # A mirror holds every file under its name, so there even Drive files come from the release URL.
    return source.kind == "release" or bool(os.environ.get("XCLIP_RELEASE_URL"))


def source_url(source: Source) -> str:
    """Where a published checkpoint is downloaded from (for messages and model cards)."""
    if _from_release_url(source):
        return release_url(source.filename)
    return f"https://drive.google.com/file/d/{source.ref}"


def cached_source(source: Source) -> Path | None:
    """The cached copy of a published checkpoint, if there is one (no network)."""
    if _from_release_url(source):
        path = _url_cache_path(release_url(source.filename), cache_dir())
    else:
        path = _gdrive_cache_path(source.ref, source.filename, cache_dir())
    return path if path.is_file() else None


def _download_gdrive(file_id: str, part_path: Path) -> None:
    import gdown
    import requests
    from gdown.exceptions import DownloadError, FileURLRetrievalError

    options = "download it manually and pass --checkpoint PATH, or set XCLIP_CACHE to a cache that holds it."
    try:
        # resume=True reuses gdown's own partial file from an interrupted earlier run.
        gdown.download(
            id=file_id,
            output=str(part_path),
            quiet=not _stderr_is_tty(),
            resume=True,
            timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
        )
    except requests.exceptions.ConnectionError as exc:
        why = (_unreachable(exc) or (_one_line(exc), False))[0]
        raise ConverterError(
            f"cannot reach Google Drive for file id {file_id} ({why}): you appear to be offline; {options}"
        ) from None
    except FileURLRetrievalError as exc:
        first = _one_line(exc).split(". ")[0]
        raise ConverterError(
            f"Google Drive would not serve file id {file_id} ({first}): it may be private, removed or over "
            f"its download quota; {options}"
        ) from None
    except (DownloadError, requests.exceptions.RequestException) as exc:
        raise ConverterError(
            f"download of Google Drive file id {file_id} failed ({_one_line(exc)}): "
            f"re-run to resume, or {options}"
        ) from None
    if not part_path.is_file():
        raise ConverterError(f"gdown wrote no file for Google Drive file id {file_id}; {options}")
