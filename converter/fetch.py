"""The download cache: lock, validated resume and integrity for checkpoints fetched over HTTP or from Drive.

Where a published checkpoint lives and where the cache keeps it is the registry's (`Source.url()`,
`Source.cache_path()`); this module makes sure nothing bad is ever cached:

- A download streams into ``<file>.part`` and is renamed to ``<file>`` only when it is complete and
  plausible: the announced length arrived (or, with none, the file is a complete zip/safetensors
  checkpoint), it is not an HTML or text page, and it matches a ``--sha256`` pin. Its sha256 is recorded
  as ``<file>.sha256``.
- A ``.part`` is resumed only with a validator: the ETag or Last-Modified of the answer that started it is
  kept in ``<file>.part.json`` and sent as ``If-Range``, so a file that changed on the server restarts
  instead of splicing two versions. A ``.part`` without a validator starts over.
- Connection and 5xx retries are urllib3's ``Retry``; a transfer that is cut off or stalls (no byte for
  ``STALL_TIMEOUT`` seconds) is resumed here, because only here is the resume validated.
- A lock in ``<cache>/locks/`` makes concurrent processes (pytest-xdist workers, parallel runs) fetch once.

Every failure is a :class:`~converter.errors.ConverterError` with one line: what failed, what to do.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from converter.errors import ConverterError, escape, reason
from converter.registry import url_cache_path

if TYPE_CHECKING:
    import requests

    from converter.registry import Source

# Module constants rather than arguments so that tests (and impatient users) can shorten them in one place.
CONNECT_TIMEOUT = 10.0  # seconds to establish a TCP connection
STALL_TIMEOUT = 60.0  # seconds without a byte before a transfer counts as stalled (and is resumed)
MAX_RETRIES = 5  # extra tries after a 5xx (urllib3) and after a cut-off or stalled transfer (resumed here)
CONNECT_RETRIES = 2  # extra tries after a refused connection (a mirror restarting); none when offline
BACKOFF_FACTOR = 1.0  # urllib3's backoff between retries: 0, 2, 4, ... seconds ...
BACKOFF_MAX = 30.0  # ... up to this, also the most a Retry-After header may make us wait
PROGRESS_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal (a log)
CHUNK_SIZE = 1 << 20  # hashing block
# Network read block: bytes of a block that a dropped connection interrupts are lost, so keep it small.
NET_CHUNK_SIZE = 64 << 10

_OFFLINE_HINT = (
    "you appear to be offline. Use --checkpoint PATH for a local file, set XCLIP_CACHE to a cache that "
    "holds it, or XCLIP_RELEASE_URL to a mirror."
)
_LOCAL_COPY = "or download it yourself and pass --checkpoint PATH"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Locations


def cache_dir() -> Path:
    """The cache root: ``$XCLIP_CACHE`` or ``~/.cache/xclip-converter``."""
    env = os.environ.get("XCLIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xclip-converter"


def cache_folder(*parts: str) -> Path:
    """``<cache>/<parts...>``, created; a ConverterError naming the cache when it cannot be (a file, no
    permission). For other users of the cache, e.g. the processor files."""
    root = cache_dir()
    folder = root.joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(folder))
    except OSError as exc:
        raise _cache_error(exc, root) from None
    return folder


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _record_path(path: Path) -> Path:
    return _sidecar(path, ".sha256")


def _part_path(path: Path) -> Path:
    return _sidecar(path, ".part")


def _validator_path(part: Path) -> Path:
    return _sidecar(part, ".json")  # "<file>.part.json": forget()'s "<file>.part*" covers it


def _lock_path(path: Path, root: Path) -> Path:
    # Apart from the file's own folder, so a failed first download can leave that folder empty and
    # remove it; the lock file itself must outlive any process that may wait on it.
    relative = "__".join(path.relative_to(root).parts) if root in path.parents else path.name
    locks = root / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return locks / f"{relative}.lock"


# ----------------------------------------------------------------------------------------------------
# Integrity records


def parse_sha256(text: str | None) -> str | None:
    """A ``--sha256`` value as 64 lower-case hex digits (None stays None); anything else is refused
    before any work is done."""
    if text is None:
        return None
    digest = text.strip().lower()
    if not _SHA256.fullmatch(digest):
        shown = text if len(text) <= 80 else text[:80] + "..."
        raise ConverterError(
            f"--sha256 {shown!r} is not a sha256 digest: expected 64 hexadecimal digits, as `sha256sum FILE` "
            "prints them."
        )
    return digest


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, streamed (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_sha256(path: Path | str) -> str | None:
    """The digest recorded when `path` was fetched, if any (no hashing)."""
    try:
        text = _record_path(Path(path)).read_text(encoding="ascii").strip().lower()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _SHA256.fullmatch(text) else None


def _write_atomically(path: Path, text: str) -> None:
    # Write-then-rename so a reader never sees a half-written file; unique per writer.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def forget(path: Path | str) -> None:
    """Delete a cached file and its records (sha256, partial downloads); used by tests and to recover from
    a corrupt cache. The ``.lock`` file stays: another process may be waiting on it."""
    path = Path(path)
    # "<file>.part", its validator "<file>.part.json", and gdown's "<file>.part<8 random chars>.part".
    leftovers = list(path.parent.glob(glob.escape(path.name) + ".part*")) if path.parent.is_dir() else []
    for p in [path, _record_path(path), *leftovers]:
        p.unlink(missing_ok=True)


def _discard_partial(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validator_path(part).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# Plausibility: never cache a web page or a cut-off file

_HTML_START = re.compile(rb"\s*(<!doctype\s+html|<html|<head|<body|<\?xml|<!--|<script|<title|<meta)", re.I)
_SNIFF = 64 << 10  # enough of a page to read its title


def _web_page(head: bytes, content_type: str | None = None) -> str | None:
    """What `head` (a file's first bytes) is when it is a web page rather than a checkpoint, else None."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in ("text/html", "application/xhtml+xml") or _HTML_START.match(head):
        text = head.decode("utf-8", "replace").lower()
        if "google" in text and ("quota" in text or "too many users" in text):
            return "an HTML page: the Google Drive quota page (too many downloads of this file lately)"
        if "google" in text and "virus" in text:
            return "an HTML page: the Google Drive virus-scan warning page"
        return "an HTML page"
    if kind.startswith("text/") and _format(head) is None:
        return f"a {kind} page"
    return None


def _page_advice(page: str) -> str:
    if "Google Drive" in page:
        return (
            "Google Drive limits downloads of popular files: try again in a day, set XCLIP_RELEASE_URL to a "
            f"mirror, {_LOCAL_COPY}."
        )
    return f"check the URL (a login, error or confirmation page?), {_LOCAL_COPY}."


def _format(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return "zip"  # torch.save's format since torch 1.6
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # 8-byte header length, then the JSON header
    if head.startswith(b"\x80"):
        return "pickle"  # torch's legacy format: no end marker to check
    return None


class _Incomplete(Exception):
    """A file cut off before its end (a zip without its central directory, a short safetensors)."""


def _check_complete(path: Path) -> None:
    """Raise _Incomplete if a checkpoint is cut off, ValueError (saying what it is) if its completeness
    cannot be judged. Cheap: reads the zip directory or the safetensors header, never the weights."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(9)
        kind = _format(head)
        if kind == "zip":
            try:
                zipfile.ZipFile(f).close()  # reads the end-of-archive record and the central directory
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise _Incomplete(f"zip archive without its central directory: {reason(exc)}") from None
            return
        if kind == "safetensors":
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(head[:8], "little")
            try:
                f.seek(8)
                header = json.loads(f.read(n)) if 8 + n <= size else {}
                ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                header, ends = {}, []
            if not header or 8 + n + max(ends, default=0) > size:
                raise _Incomplete(f"safetensors file of {size} bytes, shorter than its header says")
            return
    what = "a legacy torch pickle, which has no end to check" if kind == "pickle" else "not a checkpoint"
    raise ValueError(what)


# ----------------------------------------------------------------------------------------------------
# The cache: hit, pin, lock, promote


@dataclass(frozen=True)
class _Download:
    """What a finished transfer proved: ``sized`` when the announced length arrived in full."""

    sized: bool


def _cache_error(exc: BaseException, root: Path) -> ConverterError:
    where = getattr(exc, "filename", None) or root
    for p in [Path(where), *Path(where).parents]:
        if p.exists() and not p.is_dir():
            why = f"{p} is a file, not a folder"
            break
    else:
        why = f"{where}: {(getattr(exc, 'strerror', None) or reason(exc)).lower()}"
    return ConverterError(
        f"cannot use the download cache {root} ({why}): set XCLIP_CACHE to a writable folder with free "
        "space, or pass --checkpoint PATH for a local file."
    )


def _fetch_cached(
    final: Path,
    describe: str,
    download: Callable[[Path, bool], _Download],
    *,
    root: Path,
    sha256: str | None,
    force: bool,
) -> Path:
    """Return ``final``, downloading it with ``download(part, fresh)`` unless a good copy is cached."""
    pin = parse_sha256(sha256)
    try:
        # Fast path without the lock: ``final`` only ever appears complete (atomic rename), record first.
        if not force and final.is_file() and (pin is None or recorded_sha256(final) == pin):
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with _lock_announced(_lock_path(final, root), describe), _pruned_if_failed(final.parent, root):
            # Another process may have finished the download while we waited for the lock.
            if not force and final.is_file() and _cached_is_usable(final, pin):
                return final
            fetched = download(_part_path(final), force)
            part = _part_path(final)
            digest = sha256_file(part)
            if pin is not None and digest != pin:
                _discard_partial(part)
                raise ConverterError(
                    f"checksum mismatch for {describe}: expected sha256 {pin}, got {digest}; nothing was "
                    f"cached. Check --sha256, {_LOCAL_COPY} with a verified copy."
                )
            if pin is None:
                _refuse_implausible(part, describe, fetched)
            _write_atomically(_record_path(final), digest + "\n")
            os.replace(part, final)
            _validator_path(part).unlink(missing_ok=True)
    except OSError as exc:  # the cache folder: a file, no permission, disk full
        raise _cache_error(exc, root) from None
    return final


@contextmanager
def _lock_announced(lock_path: Path, describe: str) -> Iterator[None]:
    """Hold the fetch lock; a process that has to wait for another one's download says so once,
    rather than sitting silent for minutes."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        what, where = escape(describe), escape(str(lock_path))
        _log.info("waiting for another process fetching %s (lock: %s)", what, where)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _pruned_if_failed(folder: Path, root: Path) -> Iterator[None]:
    """A failed first download leaves no empty folders behind in the cache (only its lock file)."""
    try:
        yield
    except BaseException:
        while folder != root and root in folder.parents:
            try:
                folder.rmdir()  # only when empty: a resumable .part or another file keeps it
            except OSError:
                break
            folder = folder.parent
        raise


def _cached_is_usable(final: Path, pin: str | None) -> bool:
    """Whether the cached ``final`` may be used; False when it is corrupt (and removed, it is ours). A pin
    that disagrees with an intact file is refused and the file kept: it may be the pin that is wrong."""
    recorded = recorded_sha256(final)
    if pin is None or recorded == pin:
        return True
    actual = sha256_file(final)
    if actual == pin:
        _write_atomically(_record_path(final), actual + "\n")
        return True
    if recorded is not None and actual != recorded:
        forget(final)  # changed since it was fetched: our own corrupt copy, fetch it again
        return False
    if recorded is None:
        _write_atomically(_record_path(final), actual + "\n")
    raise ConverterError(
        f"the cached {final} has sha256 {actual}, not the pinned {pin}; the file was kept. If the pin is "
        "right, fetch it again with --force-download; otherwise correct --sha256."
    )


def _refuse_implausible(part: Path, describe: str, fetched: _Download) -> None:
    """Refuse (and delete) a finished ``.part`` that is a web page, or cut off where no length proved it."""
    with open(part, "rb") as f:
        page = _web_page(f.read(_SNIFF))
    problem = None
    if page is not None:
        problem = f"is {page}, not a checkpoint; nothing was cached. {_page_advice(page)}"
    elif not fetched.sized:
        try:
            _check_complete(part)
        except _Incomplete as exc:
            problem = f"is incomplete ({exc}); nothing was cached. Re-run to fetch it again, {_LOCAL_COPY}."
        except ValueError as exc:
            problem = (
                f"came without a length and is {exc}, so it cannot be proven complete; nothing was cached. "
                f"Pin its digest with --sha256 HEX, {_LOCAL_COPY}."
            )
    if problem is not None:
        _discard_partial(part)
        raise ConverterError(f"the download of {describe} {problem}")


# ----------------------------------------------------------------------------------------------------
# Entry points


def fetch_url(url: str, *, sha256: str | None = None, force: bool = False, cache: Path | None = None) -> Path:
    """Fetch ``http(s)://`` or ``file://`` ``url`` and return the local path.

    HTTP downloads are cached under ``<cache>/url/<sha256(url)[:16]>/<basename>``; a cache hit (matching
    ``sha256`` when pinned) touches no network unless ``force``. ``file://`` URLs return the local path.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return _local_file(url, parse_sha256(sha256))
    if scheme not in ("http", "https"):
        raise ConverterError(
            f"unsupported URL scheme in {url!r}: use an http://, https:// or file:// URL, "
            "or --checkpoint PATH for a local file."
        )
    root = Path(cache) if cache is not None else cache_dir()

    def download(part: Path, fresh: bool) -> _Download:
        return _download_http(url, part, fresh)

    return _fetch_cached(url_cache_path(url, root), url, download, root=root, sha256=sha256, force=force)


def fetch_source(source: Source, *, sha256: str | None = None, force: bool = False) -> Path:
    """Fetch a published checkpoint from where the registry says it lives (a mirror, if set)."""
    if source.from_release_url:
        return fetch_url(source.url(), sha256=sha256, force=force)
    root = cache_dir()
    return _fetch_cached(
        source.cache_path(root),
        f"Google Drive file {source.ref}",
        lambda part, fresh: _download_gdrive(source.ref, part),
        root=root,
        sha256=sha256,
        force=force,
    )


def source_url(source: Source) -> str:
    """Where a published checkpoint is downloaded from (for messages and model cards)."""
    return source.url()


def cached_source(source: Source) -> Path | None:
    """The cached copy of a published checkpoint, if there is one (no network)."""
    path = source.cache_path(cache_dir())
    try:
        return path if path.is_file() else None
    except OSError:  # an unreadable cache holds nothing we can use
        return None


def _local_file(url: str, pin: str | None) -> Path:
    from urllib.request import url2pathname

    parts = urlsplit(url)
    path = Path(url2pathname(parts.path))
    if parts.netloc not in ("", "localhost"):
        raise ConverterError(f"cannot use {url}: only local file:// URLs (no host) are supported.")
    if not path.is_file():
        raise ConverterError(f"local file not found: {path} (from {url}); check the path.")
    if pin is not None:
        digest = sha256_file(path)
        if digest != pin:
            # The user's own file: report, never delete.
            raise ConverterError(
                f"checksum mismatch for {path}: expected sha256 {pin}, got {digest}; "
                "the file is not the expected checkpoint."
            )
    return path


# ----------------------------------------------------------------------------------------------------
# HTTP: urllib3 retries connections and 5xx; a cut-off or stalled body is resumed here, validated


class _Cut(Exception):
    """A transfer that ended early and may be resumed: ``kind`` is "truncated", "stalled" or "incomplete"."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@functools.cache
def _retry_class() -> type:
    from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NameResolutionError, NewConnectionError
    from urllib3.util import Retry

    class OfflineFastRetry(Retry):
        """urllib3's Retry, except that an unresolvable host or a connect timeout is not asked again
        (offline: another try only delays the answer) and Retry-After is capped at BACKOFF_MAX."""

        def increment(
            self,
            method: Any = None,
            url: Any = None,
            response: Any = None,
            error: Any = None,
            _pool: Any = None,
            _stacktrace: Any = None,
        ) -> Retry:
            # (NewConnectionError, a refused connection, subclasses ConnectTimeoutError: that one is retried.)
            timed_out = isinstance(error, ConnectTimeoutError) and not isinstance(error, NewConnectionError)
            if isinstance(error, NameResolutionError) or timed_out:
                raise MaxRetryError(_pool, url, error)
            return super().increment(method, url, response, error, _pool, _stacktrace)

        def get_retry_after(self, response: Any) -> float | None:
            after = super().get_retry_after(response)
            return None if after is None else min(after, BACKOFF_MAX)

    return OfflineFastRetry


def _session() -> requests.Session:
    import requests
    from requests.adapters import HTTPAdapter

    retry = _retry_class()(
        total=None,
        connect=CONNECT_RETRIES,
        read=False,  # a read error mid-answer is resumed by _download_http, with a validator
        status=MAX_RETRIES,
        other=0,
        status_forcelist=frozenset({500, 502, 503, 504}),
        allowed_methods=frozenset({"GET"}),
        backoff_factor=BACKOFF_FACTOR,
        backoff_max=BACKOFF_MAX,
        raise_on_status=False,  # the last 5xx answer comes back and is reported with its status
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _classify(exc: BaseException) -> tuple[str, str]:
    """(kind, why) of a requests error: kind is "unreachable", "stalled", "truncated" or "fatal"."""
    import requests
    import urllib3.exceptions as u

    e = requests.exceptions
    if isinstance(exc, e.ConnectTimeout):
        return "unreachable", "connection timed out"
    if isinstance(exc, e.ReadTimeout):
        return "stalled", "no answer"
    if isinstance(exc, (e.SSLError, e.ProxyError)):
        return "fatal", reason(exc)
    if isinstance(exc, (e.ChunkedEncodingError, e.ContentDecodingError)):
        return "truncated", "connection dropped"
    if isinstance(exc, e.ConnectionError):
        inner = exc.args[0] if exc.args else None
        cause_of = getattr(inner, "reason", inner)  # urllib3 keeps the cause in .reason
        if isinstance(cause_of, u.NameResolutionError):
            return "unreachable", "host name could not be resolved"
        if isinstance(cause_of, u.NewConnectionError):
            cause = cause_of.__cause__ or cause_of.__context__
            if isinstance(cause, ConnectionRefusedError):
                return "unreachable", "connection refused"
            strerror = cause.strerror if isinstance(cause, OSError) else None
            return "unreachable", (strerror or "connection failed").lower()
        if isinstance(cause_of, u.ConnectTimeoutError):
            return "unreachable", "connection timed out"
        if isinstance(cause_of, u.ReadTimeoutError):
            return "stalled", "no data"
        return "truncated", "connection dropped"
    return "fatal", reason(exc)


def _download_http(url: str, part: Path, fresh: bool) -> _Download:
    """Download ``url`` into ``part``, resuming a validated partial file unless ``fresh``."""
    import requests

    if fresh:
        _discard_partial(part)
    host = urlsplit(url).hostname or url
    reached = False  # once the host has answered, a failed connection is a drop to resume, not "offline"
    cuts: list[_Cut] = []
    with _session() as session:
        while True:
            try:
                return _attempt_http(session, url, part)
            except _Cut as cut:
                cuts.append(cut)
            except requests.exceptions.RequestException as exc:
                kind, why = _classify(exc)
                if kind == "unreachable" and not reached:
                    raise ConverterError(f"cannot reach {host} ({why} for {url}): {_OFFLINE_HINT}") from None
                if kind == "fatal":
                    raise ConverterError(
                        f"download of {url} failed ({why}); check the URL, proxy and TLS settings, or pass "
                        "--checkpoint PATH for a local copy."
                    ) from None
                cuts.append(_Cut("stalled" if kind == "stalled" else "truncated", why))
            reached = True
            if len(cuts) > MAX_RETRIES:
                raise _gave_up(url, part, cuts)


def _gave_up(url: str, part: Path, cuts: list[_Cut]) -> ConverterError:
    last = cuts[-1]
    have = part.stat().st_size if part.exists() else 0
    if have and _read_validator(part) is not None:
        keep = f"the {have} bytes received are kept and a re-run resumes them"
    else:
        _discard_partial(part)
        keep = (
            "the server sent no ETag or Last-Modified, so a re-run starts over"
            if have
            else "nothing was kept"
        )
    if last.kind == "stalled":
        what = f"stalled (no data for {STALL_TIMEOUT:g} s)"
    elif last.kind == "incomplete":
        what = "ended incomplete"
    else:
        what = "was truncated"
    return ConverterError(
        f"download of {url} {what} on {len(cuts)} tries ({last}); {keep}; or use --checkpoint PATH for a "
        "local copy."
    )


def _read_validator(part: Path) -> dict[str, Any] | None:
    """The validator recorded when ``part`` was started, if it has one."""
    try:
        data = json.loads(_validator_path(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("validator"), str) else None


def _validator_of(resp: requests.Response) -> str | None:
    # If-Range needs a strong validator: a strong ETag, else Last-Modified.
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified")


def _attempt_http(session: requests.Session, url: str, part: Path) -> _Download:
    """One GET; writes or appends to ``part``. Raises _Cut / requests errors for the caller's loop."""
    have = part.stat().st_size if part.exists() else 0
    known = _read_validator(part) if have else None
    # identity: Content-Length and Range offsets must count the bytes we write to disk.
    headers = {"Accept-Encoding": "identity"}
    if known is not None:
        headers.update({"Range": f"bytes={have}-", "If-Range": known["validator"]})
    elif part.exists():
        _discard_partial(part)  # nothing proves these bytes belong to today's file: start over
        have = 0
    with session.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, STALL_TIMEOUT)) as resp:
        status = resp.status_code
        if status == 416 and known is not None:
            # The validator held and our file is at or past the end: complete if the sizes agree.
            total = _content_range_total(resp.headers.get("Content-Range", ""))
            if total == have and known.get("total") in (None, have):
                return _Download(sized=True)
            _discard_partial(part)
            raise _Cut("truncated", f"HTTP 416 for a resume at byte {have}; restarting")
        if 400 <= status < 500:
            _discard_partial(part)
            raise ConverterError(
                f"download of {url} failed: HTTP {status} {resp.reason}; {_status_hint(status)}"
            )
        if status >= 500:
            raise ConverterError(
                f"download of {url} failed: HTTP {status} {resp.reason} on {MAX_RETRIES + 1} tries; the "
                "server is failing: re-run later, or pass --checkpoint PATH for a local copy."
            )
        if status not in (200, 206):
            raise ConverterError(
                f"download of {url} failed: unexpected HTTP {status} {resp.reason}; "
                "check the URL, or pass --checkpoint PATH for a local copy."
            )
        encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", "")
        if status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range", ""))
            etag = resp.headers.get("ETag")
            changed = bool(known and etag and known.get("etag") and etag != known["etag"])
            if known is None or start != have or changed or known.get("total") not in (None, total):
                # A resume we cannot trust (a server ignoring If-Range, a wrong offset): start over.
                _discard_partial(part)
                raise _Cut("truncated", f"the server resumed at byte {start} of another version, not {have}")
            mode = "ab"
        else:
            # A full body: the file is new or changed (If-Range failed), so it starts afresh.
            _discard_partial(part)
            have, mode = 0, "wb"
            total = None if encoded else _int_or_none(resp.headers.get("Content-Length"))
            validator = _validator_of(resp)
            if validator is not None:
                record = {
                    "url": url,
                    "validator": validator,
                    "etag": resp.headers.get("ETag"),
                    "total": total,
                }
                _write_atomically(_validator_path(part), json.dumps(record))
        size = _stream(resp, part, mode, have, total, url)
    if total is not None and size < total:
        raise _Cut("truncated", f"got {size} of {total} bytes")
    if total is not None and size > total:
        _discard_partial(part)
        raise _Cut("truncated", f"got {size} bytes, more than the announced {total}; restarting")
    if total is None:
        try:
            _check_complete(part)
        except _Incomplete as exc:  # the connection closed early: without a length that looks like the end
            raise _Cut("incomplete", f"{exc}, after {size} bytes") from None
        except ValueError:
            pass  # not a checkpoint format we can judge: _refuse_implausible names it
    return _Download(sized=total is not None)


def _stream(resp: requests.Response, part: Path, mode: str, have: int, total: int | None, url: str) -> int:
    """Write the body to ``part``; returns its size. A web page is refused on its first block."""
    import requests

    size = have
    blocks = resp.iter_content(NET_CHUNK_SIZE)
    with open(part, mode) as f, _progress(total, have, part.name.removesuffix(".part")) as bar:
        try:
            for block in blocks:
                if size == 0:
                    _refuse_page(block, blocks, resp, part, url)
                f.write(block)
                size += len(block)
                bar.update(len(block))
        except requests.exceptions.RequestException as exc:
            f.flush()  # keep what we have so the next attempt resumes
            got = f"got {size} of {total} bytes" if total is not None else f"after {size} bytes"
            if _classify(exc)[0] == "stalled":
                raise _Cut("stalled", got) from None
            raise _Cut("truncated", f"connection dropped, {got}") from None
    return size


def _refuse_page(first: bytes, rest: Iterator[bytes], resp: requests.Response, part: Path, url: str) -> None:
    if _web_page(first[:_SNIFF], resp.headers.get("Content-Type")) is None:
        return
    head = bytearray(first)
    for block in rest:  # read a little more, to recognise which page it is
        head += block
        if len(head) >= _SNIFF:
            break
    page = _web_page(bytes(head[:_SNIFF]), resp.headers.get("Content-Type")) or "a web page"
    _discard_partial(part)
    raise ConverterError(f"download of {url} returned {page} instead of a checkpoint; nothing was cached. "
                         f"{_page_advice(page)}")  # fmt: skip


def _status_hint(status: int) -> str:
    if status == 404:
        return (
            "the file does not exist there; check the model name, or XCLIP_RELEASE_URL if you use a mirror, "
            "or pass --checkpoint PATH for a local copy."
        )
    if status in (401, 403):
        return "access was denied; download it manually and pass --checkpoint PATH."
    return "check the URL (or XCLIP_RELEASE_URL), or pass --checkpoint PATH for a local copy."


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _parse_content_range(header: str) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", header)
    if not m:
        return -1, None  # never our offset: the caller restarts
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


def _content_range_total(header: str) -> int | None:
    m = re.search(r"/(\d+)\s*$", header)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------------
# Progress: INFO lines on the "converter.fetch" logger (the CLI shows them unless -q) every PROGRESS_EVERY
# seconds, so a fast download says nothing and a slow one is visibly alive; a tqdm bar instead on a terminal.


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _show_bar() -> bool:
    return _log.isEnabledFor(logging.INFO) and _stderr_is_tty()


class _LogProgress:
    def __init__(self, total: int | None, initial: int, name: str) -> None:
        self.total, self.done, self.initial, self.name = total, initial, initial, name
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            rate = (self.done - self.initial) / max(now - self.start, 1e-9)
            of = f" of {self.total / 1e6:.1f}" if self.total else ""
            _log.info("downloading %s: %.1f%s MB, %.2f MB/s", self.name, self.done / 1e6, of, rate / 1e6)

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress(total: int | None, initial: int, name: str) -> Any:
    if not _show_bar():
        return _LogProgress(total, initial, name)
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr
    )


# ----------------------------------------------------------------------------------------------------
# Google Drive (through gdown, which resolves Drive's confirmation pages)


def _download_gdrive(file_id: str, part: Path) -> _Download:
    import gdown
    import requests
    from gdown.exceptions import DownloadError, FileURLRetrievalError

    options = "download it in a browser and pass --checkpoint PATH, or set XCLIP_RELEASE_URL to a mirror"
    # gdown retries every connection error with its own backoff, an unresolvable host too: ask DNS first so
    # that offline is reported at once.
    try:
        socket.getaddrinfo("drive.google.com", 443)
    except OSError:
        raise ConverterError(
            f"cannot reach drive.google.com (host name could not be resolved for Google Drive file id "
            f"{file_id}): {_OFFLINE_HINT}"
        ) from None
    # gdown resumes a partial file from an earlier run without checking it is the same version, so every run
    # starts afresh; within a run, gdown resumes with If-Range itself.
    with _gdown_leftovers_removed(part):
        try:
            gdown.download(
                id=file_id,
                output=str(part),
                quiet=not _show_bar(),
                resume=False,
                retries=MAX_RETRIES,
                timeout=(CONNECT_TIMEOUT, STALL_TIMEOUT),
            )
        except FileURLRetrievalError as exc:
            text = str(exc).lower()
            if "too many users" in text or "quota" in text:
                why = (
                    "Google Drive quota exceeded: too many downloads of this file lately; try again in a day"
                )
            else:
                why = f"{reason(exc).split('. ')[0]}; it may be private or removed"
            raise ConverterError(
                f"Google Drive would not serve file id {file_id} ({why}); {options}."
            ) from None
        except (DownloadError, requests.exceptions.RequestException) as exc:
            text = reason(exc)
            what = "stalled" if "timed out" in text.lower() else "failed"
            raise ConverterError(
                f"download of Google Drive file id {file_id} {what} ({text}); re-run to retry, or {options}."
            ) from None
    if not part.is_file():
        raise ConverterError(f"gdown wrote no file for Google Drive file id {file_id}; {options}.")
    return _Download(sized=False)  # gdown checks a length it was given, but does not say whether it had one


@contextmanager
def _gdown_leftovers_removed(part: Path) -> Iterator[None]:
    """gdown leaves "<output><8 random chars>.part" behind on failure; they cannot be resumed safely."""

    def remove() -> None:
        for p in part.parent.glob(glob.escape(part.name) + "????????.part"):
            p.unlink(missing_ok=True)

    remove()
    _discard_partial(part)
    try:
        yield
    finally:
        remove()
