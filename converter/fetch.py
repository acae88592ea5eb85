"""The download cache: what no library guarantees for checkpoints fetched over HTTP or from Google Drive.

Where a checkpoint comes from and where the cache keeps it is the registry's. This module caches nothing
bad: a download streams into ``<file>.part`` and becomes ``<file>`` only when the announced length arrived
(without one, when it is a zip or safetensors file that proves its own end), it is not a web page, and it
matches a ``--sha256`` pin; its digest is recorded in ``<file>.sha256``. A ``.part`` is resumed only with
``If-Range`` and the ETag or Last-Modified of the answer that started it (kept in ``<file>.part.json``), so
a file that changed on the server starts over instead of splicing two versions. urllib3 retries 5xx
answers; a cut-off or stalled body is resumed here. A lock in ``<cache>/locks/`` makes processes fetch a
file once. Every failure is a one-line :class:`~converter.errors.ConverterError`: what failed, what to do.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from converter.errors import ConverterError, escape, reason
from converter.registry import Source, url_cache_path

if TYPE_CHECKING:
    import requests

# The HTTP client, tqdm and filelock are imported where a download needs them: a local conversion,
# which uses this module for the cache's paths and sha256 records, does not pay for them.

# Module constants rather than arguments so that tests (and impatient users) can shorten them in one place.
CONNECT_TIMEOUT = 10.0  # seconds to establish a TCP connection
STALL_TIMEOUT = 60.0  # seconds without a byte before a transfer counts as stalled (and is resumed)
MAX_RETRIES = 5  # extra tries after a 5xx (urllib3) and after a cut-off or stalled transfer (resumed here)
BACKOFF_FACTOR = 1.0  # urllib3's backoff between 5xx retries: 0, 2, 4, ... seconds ...
BACKOFF_MAX = 30.0  # ... up to this (Retry-After is not obeyed: it may ask for hours)
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
_HTML_START = re.compile(rb"\s*<(!doctype\s+html|html|head|body|\?xml|!--|script|title|meta)", re.I)
_SNIFF = 64 << 10  # enough of a page to read its title
_log = logging.getLogger(__name__)


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


def _cache_error(exc: OSError, root: Path) -> ConverterError:
    where = Path(exc.filename or root)
    blocker = next((p for p in [where, *where.parents] if p.exists() and not p.is_dir()), None)
    why = (
        f"{blocker} is a file, not a folder"
        if blocker
        else f"{where}: {(exc.strerror or reason(exc)).lower()}"
    )
    return ConverterError(
        f"cannot use the download cache {root} ({why}): set XCLIP_CACHE to a writable folder with free "
        "space, or pass --checkpoint PATH for a local file."
    )


def _beside(path: Path, suffix: str) -> Path:
    """``<file><suffix>``: ``.sha256`` (its record), ``.part`` (its download), ``.part.json`` (validator)."""
    return path.with_name(path.name + suffix)


def _lock_path(path: Path, root: Path) -> Path:
    # Apart from the file's own folder, so a failed first download can leave that folder empty and
    # remove it; the lock file itself must outlive any process that may wait on it.
    locks = root / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return locks / ("__".join(path.relative_to(root).parts) + ".lock")


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
    from converter.reader import CONFIG_LIMIT, read_bytes

    try:  # bounded: a FIFO or a huge file in the cache's place is no record
        text = (
            read_bytes(_beside(Path(path), ".sha256"), "a record", CONFIG_LIMIT)
            .decode("ascii")
            .strip()
            .lower()
        )
    except (ConverterError, UnicodeDecodeError):
        return None
    return text if _SHA256.fullmatch(text) else None


def _write_atomically(path: Path, text: str) -> None:
    from converter.export import write_file  # the one writer: whole or not at all

    write_file(path, text, flag="the download cache")


def forget(path: Path | str) -> None:
    """Delete a cached file and its records (sha256, partial download); used by tests and to recover from
    a corrupt cache. The ``.lock`` file stays: another process may be waiting on it."""
    for suffix in ("", ".sha256", ".part", ".part.json"):
        _beside(Path(path), suffix).unlink(missing_ok=True)


def _discard_partial(part: Path) -> None:
    part.unlink(missing_ok=True)
    _beside(part, ".json").unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# Plausibility: never cache a web page or a cut-off file


def _format(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return "zip"  # torch.save's format since torch 1.6
    if head[8:9] == b"{":
        return "safetensors"  # 8-byte header length, then the JSON header
    return "pickle" if head.startswith(b"\x80") else None  # torch's legacy format: no end marker to check


def _web_page(head: bytes, content_type: str | None) -> str | None:
    """What `head` (a file's first bytes) is when it is a web page rather than a checkpoint, else None."""
    kind = (content_type or "").split(";")[0].strip().lower()
    text = head.lower()
    if kind in ("text/html", "application/xhtml+xml") or _HTML_START.match(head):
        if b"google" in text and (b"quota" in text or b"too many users" in text):
            return "an HTML page: the Google Drive quota page (too many downloads of this file lately)"
        return "an HTML page"
    return f"a {kind} page" if kind.startswith("text/") and _format(head) is None else None


def _cut_off(path: Path) -> str | None:
    """Why a zip or safetensors checkpoint ends before its end, or None (also for a format that cannot say).
    Cheap: reads the zip's directory or the safetensors header, never the weights."""
    from safetensors import SafetensorError, safe_open

    with open(path, "rb") as f:
        kind = _format(f.read(9))
    try:
        if kind == "zip":
            zipfile.ZipFile(path).close()  # reads the end-of-archive record and the central directory
        elif kind == "safetensors":
            with safe_open(path, framework="numpy"):  # checks that the data covers what the header says
                pass
    except (zipfile.BadZipFile, SafetensorError, OSError, EOFError) as exc:
        what = "zip archive without its central directory" if kind == "zip" else "safetensors file too short"
        return f"{what}: {reason(exc)}"
    return None


@dataclass(frozen=True)
class _Download:
    """What a finished transfer proved: ``sized`` when an announced length arrived in full."""

    sized: bool
    content_type: str | None = None


def _refuse_implausible(part: Path, describe: str, fetched: _Download) -> None:
    """Refuse (and delete) a finished ``.part`` that is a web page, or cut off where no length proved it."""
    with open(part, "rb") as f:
        head = f.read(_SNIFF)
    kind, page, problem = _format(head), _web_page(head, fetched.content_type), None
    if page is not None:
        advice = f"check the URL (a login, error or confirmation page?), {_LOCAL_COPY}."
        if "Google Drive" in page:
            advice = f"Google Drive limits downloads of popular files: try again in a day, {_LOCAL_COPY}."
        problem = f"is {page}, not a checkpoint; nothing was cached. {advice}"
    elif not fetched.sized and kind not in ("zip", "safetensors"):
        what = "a legacy torch pickle" if kind == "pickle" else "not a checkpoint"
        problem = (
            f"came without a length and is {what}, so it cannot be proven complete; nothing was cached. Pin "
            f"its digest with --sha256 HEX, {_LOCAL_COPY}."
        )
    elif not fetched.sized and (why := _cut_off(part)):
        problem = f"is incomplete ({why}); nothing was cached. Re-run to fetch it again, {_LOCAL_COPY}."
    if problem is not None:
        _discard_partial(part)
        raise ConverterError(f"the download of {describe} {problem}")


# ----------------------------------------------------------------------------------------------------
# The cache: hit, pin, lock, promote


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
    part = _beside(final, ".part")
    try:
        # Fast path without the lock: ``final`` only ever appears complete (atomic rename), record first.
        if not force and final.is_file() and (pin is None or recorded_sha256(final) == pin):
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with _lock_announced(_lock_path(final, root), describe), _pruned_if_failed(final.parent, root):
            # Another process may have finished the download while we waited for the lock.
            if not force and final.is_file() and _cached_is_usable(final, pin):
                return final
            fetched = download(part, force)
            digest = sha256_file(part)
            if pin is not None and digest != pin:
                _discard_partial(part)
                raise ConverterError(
                    f"checksum mismatch for {describe}: expected sha256 {pin}, got {digest}; nothing was "
                    f"cached. Check --sha256, {_LOCAL_COPY} with a verified copy."
                )
            if pin is None:
                _refuse_implausible(part, describe, fetched)
            _write_atomically(_beside(final, ".sha256"), digest + "\n")
            os.replace(part, final)
            _discard_partial(part)  # its validator
    except OSError as exc:  # the cache folder: a file, no permission, disk full
        raise _cache_error(exc, root) from None
    return final


@contextmanager
def _lock_announced(lock_path: Path, describe: str) -> Iterator[None]:
    """Hold the fetch lock; a process that has to wait for another one's download says so once,
    rather than sitting silent for minutes."""
    from filelock import FileLock, Timeout

    lock = FileLock(lock_path)
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
    """Whether the cached ``final`` meets the pin, hashed once and recorded when no record says so. A copy
    that no longer matches its own record went bad in the cache and is removed (False); a good copy that
    is not the pinned file is kept and reported."""
    recorded = recorded_sha256(final)
    if pin is None or recorded == pin:
        return True
    actual = sha256_file(final)
    if actual == pin:
        _write_atomically(_beside(final, ".sha256"), actual + "\n")
        return True
    if recorded is not None and actual != recorded:
        forget(final)  # our own copy went bad: fetch it again
        return False
    if recorded is None:
        _write_atomically(_beside(final, ".sha256"), actual + "\n")
    raise ConverterError(
        f"the cached {final} has sha256 {actual}, not the pinned {pin}; the file was kept. If the pin is "
        "right, fetch it again with --force-download; otherwise correct --sha256."
    )


# ----------------------------------------------------------------------------------------------------
# Entry points


def fetch_url(url: str, *, sha256: str | None = None, force: bool = False, cache: Path | None = None) -> Path:
    """Fetch ``http(s)://`` or ``file://`` ``url`` and return the local path.

    HTTP downloads are cached at the registry's ``url_cache_path``; a cache hit (matching ``sha256`` when
    pinned) touches no network unless ``force``. ``file://`` URLs return the local path.
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
    download = functools.partial(_download_http, url)
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
    parts = urlsplit(url)
    path = Path(url2pathname(parts.path))
    if parts.netloc not in ("", "localhost"):
        raise ConverterError(f"cannot use {url}: only local file:// URLs (no host) are supported.")
    if not path.is_file():
        raise ConverterError(f"local file not found: {path} (from {url}); check the path.")
    if pin is not None and (digest := sha256_file(path)) != pin:  # the user's own file: report, never delete
        raise ConverterError(
            f"checksum mismatch for {path}: expected sha256 {pin}, got {digest}; "
            "the file is not the expected checkpoint."
        )
    return path


@contextmanager
def _progress(part: Path, done: int, total: int | None) -> Iterator[Callable[[int, int | None], None]]:
    """Yield ``report(bytes so far, total)`` for the download into ``part``: it moves a tqdm bar on a
    terminal (tqdm decides), and elsewhere logs a line every PROGRESS_EVERY seconds, so that a slow
    download is visibly alive in a log and a fast one says nothing. Silent when INFO is off (-q)."""
    import tqdm

    if not _log.isEnabledFor(logging.INFO):
        yield lambda done, total: None
        return
    name, first, start = part.name.removesuffix(".part"), done, time.monotonic()
    last = start
    options: dict[str, Any] = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "desc": name}
    with tqdm.tqdm(total=total, initial=done, disable=None, **options) as bar:

        def report(done: int, total: int | None) -> None:
            nonlocal last
            bar.total = total
            bar.update(done - bar.n)
            now = time.monotonic()
            if bar.disable and now - last >= PROGRESS_EVERY:
                last = now
                rate = (done - first) / max(now - start, 1e-9)
                of = f" of {total / 1e6:.1f}" if total else ""
                _log.info("downloading %s: %.1f%s MB, %.2f MB/s", name, done / 1e6, of, rate / 1e6)

        yield report


# ----------------------------------------------------------------------------------------------------
# HTTP: urllib3 retries 5xx answers; a cut-off or stalled body is resumed here, validated


class _Cut(Exception):
    """A transfer that ended early and may be resumed: ``kind`` is "truncated", "stalled" or "incomplete"."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def _session() -> requests.Session:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util import Retry

    retry = Retry(
        total=None,
        connect=0,  # a host that never answered is reported at once (offline); later drops are resumed
        read=False,  # a read error mid-answer is resumed by _download_http, with a validator
        other=0,
        status=MAX_RETRIES,
        status_forcelist=(500, 502, 503, 504),
        backoff_factor=BACKOFF_FACTOR,
        backoff_max=BACKOFF_MAX,
        respect_retry_after_header=False,
        raise_on_status=False,  # the last 5xx answer comes back and is reported with its status
    )
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def _classify(exc: requests.RequestException) -> tuple[str, str]:
    """(kind, why) of a requests error: kind is "unreachable", "stalled", "truncated" or "fatal"."""
    import requests
    from urllib3.exceptions import NameResolutionError, NewConnectionError, ReadTimeoutError

    inner = exc.args[0] if exc.args else None  # the urllib3 error that requests wraps
    cause = getattr(inner, "reason", None)  # a MaxRetryError's: why no connection was made
    if isinstance(exc, requests.ConnectTimeout):
        return "unreachable", "connection timed out"
    if isinstance(exc, requests.ReadTimeout) or isinstance(inner, ReadTimeoutError):
        return "stalled", "no data"
    if isinstance(exc, (requests.exceptions.SSLError, requests.exceptions.ProxyError)):
        return "fatal", reason(exc)
    if isinstance(cause, NameResolutionError):
        return "unreachable", "host name could not be resolved"
    if isinstance(cause, NewConnectionError):
        return "unreachable", (getattr(cause.__cause__, "strerror", None) or "connection failed").lower()
    if isinstance(exc, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return "truncated", "connection dropped"
    return "fatal", reason(exc)


def _download_http(url: str, part: Path, fresh: bool) -> _Download:
    """Download ``url`` into ``part``, resuming a validated partial file unless ``fresh``."""
    import requests

    if fresh:
        _discard_partial(part)
    cuts: list[_Cut] = []
    with _session() as session:
        while len(cuts) <= MAX_RETRIES:
            try:
                return _attempt_http(session, url, part)
            except _Cut as cut:
                cuts.append(cut)
            except requests.RequestException as exc:
                kind, why = _classify(exc)
                if kind == "unreachable" and not cuts:  # once the host has answered, it is a drop to resume
                    host = urlsplit(url).hostname
                    raise ConverterError(f"cannot reach {host} ({why} for {url}): {_OFFLINE_HINT}") from None
                if kind == "fatal":
                    raise ConverterError(
                        f"download of {url} failed ({why}); check the URL, proxy and TLS settings, or pass "
                        "--checkpoint PATH for a local copy."
                    ) from None
                cuts.append(_Cut("stalled" if kind == "stalled" else "truncated", why))
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
    what = {"stalled": f"stalled (no data for {STALL_TIMEOUT:g} s)", "incomplete": "ended incomplete"}
    raise ConverterError(
        f"download of {url} {what.get(cuts[-1].kind, 'was truncated')} on {len(cuts)} tries ({cuts[-1]}); "
        f"{keep}; or use --checkpoint PATH for a local copy."
    )


def _read_validator(part: Path) -> dict[str, Any] | None:
    """The validator recorded when ``part`` was started, if it has one."""
    from converter.reader import read_json

    try:  # bounded, as every record read back from the cache
        data = read_json(_beside(part, ".json"), "a validator")
    except ConverterError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("validator"), str) else None


def _attempt_http(session: requests.Session, url: str, part: Path) -> _Download:
    """One GET; writes or appends to ``part``. Raises _Cut / requests errors for the caller's loop."""
    have = part.stat().st_size if part.exists() else 0
    known = _read_validator(part) if have else None
    # identity: Content-Length and Range offsets must count the bytes we write to disk.
    headers = {"Accept-Encoding": "identity"}
    if known is None:
        _discard_partial(part)  # nothing proves these bytes belong to today's file: start over
        have = 0
    else:
        headers.update({"Range": f"bytes={have}-", "If-Range": known["validator"]})
    with session.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, STALL_TIMEOUT)) as resp:
        status, etag = resp.status_code, resp.headers.get("ETag")
        # "bytes START-END/TOTAL" (206) or "bytes */TOTAL" (416)
        m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+)\s*", resp.headers.get("Content-Range", ""))
        start, total = (int(m[1]) if m and m[1] else None), (int(m[2]) if m else None)
        if status == 416 and known is not None:
            # The validator held and our file is at or past the end: complete if the sizes agree.
            if total == have and known.get("total") in (None, have):
                return _Download(sized=True)
            _discard_partial(part)
            raise _Cut("truncated", f"HTTP 416 for a resume at byte {have}; restarting")
        if status >= 500:
            raise ConverterError(
                f"download of {url} failed: HTTP {status} {resp.reason} on {MAX_RETRIES + 1} tries; the "
                "server is failing: re-run later, or pass --checkpoint PATH for a local copy."
            )
        if status not in (200, 206):
            _discard_partial(part)
            raise ConverterError(
                f"download of {url} failed: HTTP {status} {resp.reason}; check the model name, the URL or "
                f"XCLIP_RELEASE_URL, {_LOCAL_COPY}."
            )
        if status == 206:
            changed = bool(known and etag and known.get("etag") and etag != known["etag"])
            if known is None or start != have or changed or known.get("total") not in (None, total):
                # A resume we cannot trust (a server ignoring If-Range, a wrong offset): start over.
                _discard_partial(part)
                raise _Cut("truncated", f"the server resumed at byte {start} of another version, not {have}")
        else:  # a full body: the file is new or changed (If-Range failed), so it starts afresh
            _discard_partial(part)
            have = 0
            encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", "")
            total = None if encoded else resp.raw.length_remaining  # urllib3's reading of Content-Length
            # If-Range needs a strong validator: a strong ETag, else Last-Modified.
            validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
            if validator is not None:
                record = {"validator": validator, "etag": etag, "total": total}
                _write_atomically(_beside(part, ".json"), json.dumps(record))
        size = _stream(resp, part, have, total)
    if total is not None and size != total:  # more than announced: the resume's 416 will restart it
        raise _Cut("truncated", f"got {size} of {total} bytes")
    if total is None and (why := _cut_off(part)):  # without a length, a closed connection looks like the end
        raise _Cut("incomplete", f"{why}, after {size} bytes")
    return _Download(sized=total is not None, content_type=resp.headers.get("Content-Type"))


def _stream(resp: requests.Response, part: Path, have: int, total: int | None) -> int:
    """Append the body to ``part`` (which holds ``have`` bytes); returns its size."""
    import requests

    size = have
    with open(part, "ab" if have else "wb") as f, _progress(part, have, total) as report:
        try:
            for block in resp.iter_content(NET_CHUNK_SIZE):
                f.write(block)
                size += len(block)
                report(size, total)
        except requests.RequestException as exc:  # what was written stays, so the next attempt resumes
            got = f"got {size} of {total} bytes" if total is not None else f"after {size} bytes"
            if _classify(exc)[0] == "stalled":
                raise _Cut("stalled", got) from None
            raise _Cut("truncated", f"connection dropped, {got}") from None
    return size


# ----------------------------------------------------------------------------------------------------
# Google Drive (through gdown, which resolves Drive's confirmation pages)


def _download_gdrive(file_id: str, part: Path) -> _Download:
    import gdown
    import requests
    from gdown.exceptions import DownloadError, FileURLRetrievalError

    options = "download it in a browser and pass --checkpoint PATH, or set XCLIP_RELEASE_URL to a mirror"
    try:  # gdown retries an unresolvable host for minutes: ask DNS first, so that offline is said at once
        socket.getaddrinfo("drive.google.com", 443)
    except OSError:
        raise ConverterError(
            f"cannot reach drive.google.com (host name could not be resolved for Google Drive file id "
            f"{file_id}): {_OFFLINE_HINT}"
        ) from None
    # gdown would resume an earlier run's partial file without checking that it is the same version, and
    # leaves its partial files behind on failure: each run downloads afresh into a folder removed after it
    # (within a run, gdown resumes with If-Range itself).
    with (
        tempfile.TemporaryDirectory(prefix=".gdown-", dir=part.parent) as scratch,
        _progress(part, 0, None) as report,
    ):
        output = Path(scratch) / part.name
        try:
            gdown.download(
                id=file_id,
                output=str(output),
                quiet=True,
                progress=report,
                resume=False,
                retries=MAX_RETRIES,
                timeout=(CONNECT_TIMEOUT, STALL_TIMEOUT),
            )
        except (FileURLRetrievalError, DownloadError, requests.RequestException) as exc:
            text = str(exc).lower()
            if "too many users" in text or "quota" in text:
                what = "was refused: Google Drive quota exceeded (too many downloads of this file lately)"
            elif isinstance(exc, FileURLRetrievalError):
                what = "was refused: Drive gave no download link (the file may be private or removed)"
            else:
                what = f"{'stalled' if 'timed out' in text else 'failed'} ({reason(exc)})"
            raise ConverterError(
                f"download of Google Drive file id {file_id} {what}; re-run later, or {options}."
            ) from None
        if not output.is_file():
            raise ConverterError(f"gdown wrote no file for Google Drive file id {file_id}; {options}.")
        os.replace(output, part)
    return _Download(sized=False)  # gdown checks a length it was given, but does not say whether it had one
