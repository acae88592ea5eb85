"""The download cache: checkpoints fetched over HTTP or from Google Drive, and nothing bad ever cached.

A download streams into ``<file>.part`` and becomes ``<file>`` only when proven complete, not a web page and
matching any ``--sha256`` pin. A ``.part`` resumes only with ``If-Range`` on the validator that started it
(``<file>.part.json``), so a changed file starts over.
"""

from __future__ import annotations

import errno
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
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from converter.errors import ConverterError, escape, reason
from converter.export import write_file
from converter.paths import local_path
from converter.reader import CONFIG_LIMIT, check_regular, file_format, read_bytes, read_json_object
from converter.registry import Source, cache_dir, url_cache_path

# Module constants, not arguments: tests (and impatient users) shorten them in one place.
CONNECT_TIMEOUT = 10.0  # seconds to establish a TCP connection
STALL_TIMEOUT = 60.0  # seconds without a byte before a transfer counts as stalled (and is resumed)
MAX_RETRIES = 5  # extra tries after a 5xx answer or a cut-off or stalled transfer
BACKOFF_FACTOR = 1.0  # seconds before the first retry, doubling for each next one ...
BACKOFF_MAX = 30.0  # ... up to this (Retry-After is not obeyed: it may ask for hours)
PROGRESS_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal (a log)
NET_CHUNK_SIZE = 64 << 10  # small: the part of a block that a dropped connection interrupts is lost
MAX_DOWNLOAD_BYTES = 16 << 30  # the largest published checkpoint is 1.7 GB: a server sending more lies

_OFFLINE_HINT = (
    "you appear to be offline. Use --checkpoint PATH for a local file, set XCLIP_CACHE to a cache that "
    "holds it, or XCLIP_RELEASE_URL to a mirror."
)
_LOCAL_COPY = "or download it yourself and pass --checkpoint PATH"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEADER_VALUE = re.compile(r"[!-~][ -~]*")  # what a validator must be to be sent back in If-Range
_log = logging.getLogger(__name__)

# Writes the .part given (afresh if asked); says whether an announced length arrived, and the Content-Type.
Downloader = Callable[[Path, bool], tuple[bool, str | None]]


def cache_folder(*parts: str) -> Path:
    """``<cache>/<parts...>``, created, for other users of the cache (the processor files)."""
    folder = cache_dir().joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(folder))
    except OSError as exc:
        raise _cache_error(exc, cache_dir()) from None
    return folder


def _cache_error(exc: OSError, root: Path) -> ConverterError:
    where = Path(exc.filename2 or exc.filename or root)  # filename2: where a rename was going
    why = f"{where}: {(exc.strerror or reason(exc)).lower()}"
    blockers = (p for p in [where, *where.parents] if p.exists() and not p.is_dir())
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and (blocker := next(blockers, None)):
        why = f"{blocker} is a file, not a folder"
    advice = (
        "set XCLIP_CACHE to a writable folder with free space, or pass --checkpoint PATH for a local file."
    )
    if exc.errno == errno.ENOENT:  # the folders were made a moment ago: something removed them meanwhile
        advice = "something removed it while this run used it; run again."
    return ConverterError(f"cannot use the download cache {root} ({why}): {advice}")


def _lock_path(path: Path, root: Path) -> Path:
    # Apart from the file's folder, which a failed first download removes: a lock outlives its waiters.
    (root / "locks").mkdir(parents=True, exist_ok=True)
    return root / "locks" / ("__".join(path.relative_to(root).parts) + ".lock")


def parse_sha256(text: str | None) -> str | None:
    """A ``--sha256`` value as 64 lower-case hex digits (None stays None), refused before any work."""
    if text is None:
        return None
    if not _SHA256.fullmatch(digest := text.strip().lower()):
        shown = text if len(text) <= 80 else text[:80] + "..."
        raise ConverterError(
            f"--sha256 {shown!r} is not a sha256 digest: expected 64 hexadecimal digits, as `sha256sum FILE` "
            "prints them."
        )
    return digest


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, streamed (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()  # hashlib.file_digest needs Python 3.11; 3.10 is supported
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def recorded_sha256(path: Path | str) -> str | None:
    """The digest recorded when `path` was fetched, if any (no hashing)."""
    try:  # bounded: a FIFO or a huge file in the record's place is no record
        text = read_bytes(Path(f"{path}.sha256"), "a record", CONFIG_LIMIT).decode("ascii").strip().lower()
    except (ConverterError, UnicodeDecodeError):
        return None
    return text if _SHA256.fullmatch(text) else None


def forget(path: Path | str) -> None:
    """Delete a cached file and its records; the lock file stays (another process may wait on it)."""
    for suffix in ("", ".sha256", ".part", ".part.json"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _discard_partial(part: Path) -> None:
    part.unlink(missing_ok=True)
    Path(f"{part}.json").unlink(missing_ok=True)


def _cut_off(path: Path) -> str | None:
    """Why a zip or safetensors file is cut off (from its directory or header, not the weights), or None."""
    from safetensors import SafetensorError, safe_open

    with open(path, "rb") as f:
        kind = file_format(f.read(9))
    try:
        if kind == "zip":
            zipfile.ZipFile(path).close()  # reads the end-of-archive record and the central directory
        elif kind == "safetensors":
            safe_open(path, framework="numpy")  # checks that the data covers what the header says
    except (zipfile.BadZipFile, SafetensorError, OSError, EOFError) as exc:
        what = "zip archive without its central directory" if kind == "zip" else "safetensors file too short"
        return f"{what}: {reason(exc)}"
    return None


def _refuse_implausible(part: Path, what: str, sized: bool, content_type: str | None) -> None:
    """Refuse (and delete) a finished ``.part`` that is no checkpoint (a web page, an error text), shows
    itself cut off, or is a legacy pickle that came without a length (nothing shows where it ends)."""
    with open(part, "rb") as f:
        head = f.read(64 << 10)  # enough of a page to read its title
    kind, mime = file_format(head), (content_type or "").split(";")[0].strip().lower()
    advice = f"Check the URL (a login, error or confirmation page?), {_LOCAL_COPY}."
    if kind in ("html", None):  # a checkpoint is a zip archive, a safetensors file or a pickle
        page = "not a checkpoint (neither a zip archive, a safetensors file nor a pickle)"
        if kind == "html" or mime in ("text/html", "application/xhtml+xml"):
            page = "an HTML page, not a checkpoint"
            if b"google" in head.lower() and re.search(rb"quota|too many users", head, re.I):
                page = "a Google Drive quota page (too many downloads of this file lately), not a checkpoint"
                advice = f"Google Drive limits downloads of popular files: try again in a day, {_LOCAL_COPY}."
        elif mime.startswith("text/"):
            page = f"a {mime} page, not a checkpoint"
        problem = f"is {page}; nothing was cached. {advice}"
    elif not sized and kind == "pickle":
        problem = (
            "came without a length and is a legacy torch pickle, so it cannot be proven complete; nothing "
            f"was cached. Pin its digest with --sha256 HEX, {_LOCAL_COPY}."
        )
    elif why := _cut_off(part):  # also where a length came: a server may announce a wrong one
        problem = f"is incomplete ({why}); nothing was cached. Re-run to fetch it again, {_LOCAL_COPY}."
    else:
        return
    _discard_partial(part)
    raise ConverterError(f"the download of {what} {problem}")


def _fetch_cached(final: Path, what: str, download: Downloader, pin: str | None, force: bool) -> Path:
    from filelock import FileLock, Timeout

    # Fast path without the lock: ``final`` only ever appears complete (atomic rename), record first.
    if not force and final.is_file() and (pin is None or recorded_sha256(final) == pin):
        return final
    root = final.parents[2]  # the cache: <cache>/url/<hash>/<file> or <cache>/gdrive/<id>/<file>
    part = Path(f"{final}.part")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(_lock_path(final, root))
        try:
            held = lock.acquire(blocking=False)
        except Timeout:
            _log.info(
                "waiting for another process fetching %s (lock: %s)", escape(what), escape(lock.lock_file)
            )
            held = lock.acquire()
        with held:
            try:
                # Another process may have finished the download while we waited for the lock.
                if not force and final.is_file() and _cached_is_usable(final, pin):
                    return final
                sized, content_type = download(part, force)
                digest = sha256_file(part)
                if pin is not None and digest != pin:
                    _discard_partial(part)
                    raise ConverterError(
                        f"checksum mismatch for {what}: expected sha256 {pin}, got {digest}; nothing was "
                        f"cached. Check --sha256, {_LOCAL_COPY} with a verified copy."
                    )
                if pin is None:
                    _refuse_implausible(part, what, sized, content_type)
                write_file(Path(f"{final}.sha256"), digest + "\n", flag="the download cache")
                os.replace(part, final)
                _discard_partial(part)  # its validator
            finally:  # a failure leaves no empty folder (a resumable .part keeps its own)
                for folder in (final.parent, final.parent.parent):  # <cache>/url/<hash>, <cache>/gdrive/<id>
                    with suppress(OSError):
                        folder.rmdir()
    except OSError as exc:  # the cache folder: a file, no permission, disk full
        raise _cache_error(exc, root) from None
    return final


def _cached_is_usable(final: Path, pin: str | None) -> bool:
    """Whether the cached ``final`` meets the pin; a copy that no longer matches its own record is removed."""
    recorded = recorded_sha256(final)
    if pin is None or recorded == pin:
        return True
    actual = sha256_file(final)
    if actual != pin and recorded not in (None, actual):
        forget(final)  # our own copy went bad: fetch it again
        return False
    write_file(Path(f"{final}.sha256"), actual + "\n", flag="the download cache")
    if actual != pin:
        raise ConverterError(
            f"the cached {final} has sha256 {actual}, not the pinned {pin}; the file was kept. If the pin "
            "is right, fetch it again with --force-download; otherwise correct --sha256."
        )
    return True


def fetch_url(url: str, *, sha256: str | None = None, force: bool = False, cache: Path | None = None) -> Path:
    """The local path of an http(s):// or file:// URL; a cached copy meeting the pin skips the network."""
    pin = parse_sha256(sha256)
    try:
        parts = urlsplit(url)
    except ValueError as err:  # e.g. "http://[::1/x.pth"
        raise ConverterError(f"cannot use {escape(url)}: not a valid URL ({reason(err)})") from None
    if parts.scheme.lower() == "file":
        path = local_path(url)
        if parts.netloc not in ("", "localhost"):
            raise ConverterError(f"cannot use {url}: only local file:// URLs (no host) are supported.")
        if not path.exists():
            raise ConverterError(f"local file not found: {path} (from {url}); check the path.")
        check_regular(path, f"{path} (from {escape(url)})")  # a folder, FIFO or device is named
        if pin is not None and (digest := sha256_file(path)) != pin:  # the user's file: report, never delete
            raise ConverterError(f"checksum mismatch for {path}: expected sha256 {pin}, got {digest}.")
        return path
    if parts.scheme.lower() not in ("http", "https"):
        raise ConverterError(f"unsupported URL scheme in {url!r}: use an http://, https:// or file:// URL.")
    final = url_cache_path(url, Path(cache) if cache is not None else cache_dir())
    return _fetch_cached(final, url, functools.partial(_download_http, url), pin, force)


def fetch_source(source: Source, *, sha256: str | None = None, force: bool = False) -> Path:
    """Fetch a published checkpoint from where the registry says it lives (a mirror, if set)."""
    if source.from_release_url:
        return fetch_url(source.url(), sha256=sha256, force=force)
    download = functools.partial(_download_gdrive, source.ref)
    final, what = source.cache_path(cache_dir()), f"Google Drive file {source.ref}"
    return _fetch_cached(final, what, download, parse_sha256(sha256), force)


def cached_source(source: Source) -> Path | None:
    """The cached copy of a published checkpoint, if there is one (no network)."""
    path = source.cache_path(cache_dir())
    return path if os.path.isfile(path) else None  # False, not an error, for an unreadable cache


@contextmanager
def _progress(name: str, done: int, total: int | None) -> Iterator[Callable[[int, int | None], None]]:
    """Yield ``report(done, total)``: a tqdm bar on a terminal, else a log line each PROGRESS_EVERY s."""
    if not _log.isEnabledFor(logging.INFO):
        yield lambda done, total: None
        return
    import tqdm

    last = time.monotonic()
    with tqdm.tqdm(total=total, initial=done, disable=None, unit="B", unit_scale=True, desc=name) as bar:

        def report(done: int, total: int | None) -> None:
            nonlocal last
            bar.total = total
            bar.update(done - bar.n)
            if bar.disable and time.monotonic() - last >= PROGRESS_EVERY:
                last = time.monotonic()
                of = f" of {total / 1e6:.1f}" if total else ""
                _log.info("downloading %s: %.1f%s MB", name, done / 1e6, of)

        yield report


def _refuse_oversized(done: int, total: int | None, what: str, part: Path) -> None:
    """Refuse (and delete) a download that announces or sends more than any checkpoint is: endless."""
    if max(done, total or 0) > MAX_DOWNLOAD_BYTES:
        _discard_partial(part)
        raise ConverterError(
            f"download of {what} is larger than the {MAX_DOWNLOAD_BYTES >> 30} GiB any X-CLIP checkpoint "
            f"comes near; nothing was cached. Check the URL, {_LOCAL_COPY}."
        )


class _Cut(Exception):
    """An HTTP try that ended early, retried from where it stopped; args: (how it ended, detail)."""


def _download_http(url: str, part: Path, fresh: bool) -> tuple[bool, str | None]:
    import requests

    if fresh:
        _discard_partial(part)
    for tries in range(1, MAX_RETRIES + 2):
        if tries > 1:
            time.sleep(min(BACKOFF_MAX, BACKOFF_FACTOR * 2 ** (tries - 2)))
        try:
            return _attempt_http(url, part)
        except _Cut as exc:
            how, detail = exc.args
        except requests.RequestException as exc:
            how, detail = _cut_or_fail(exc, url, first=tries == 1).args
    have = part.stat().st_size if part.exists() else 0
    keep = f"the {have} bytes received are kept and a re-run resumes them"
    if not have or not Path(f"{part}.json").exists():  # nothing a re-run could resume
        _discard_partial(part)
        keep = "nothing was kept"
    raise ConverterError(
        f"download of {url} {how} on {tries} tries ({detail}); {keep}; re-run later, or use --checkpoint PATH"
        " for a local copy."
    )


def _cut_or_fail(exc: Exception, url: str, first: bool, got: str | None = None) -> _Cut:
    """The retryable cut that ``exc`` is, or a ConverterError where retrying cannot help (offline, TLS)."""
    from requests.exceptions import ChunkedEncodingError, ConnectionError, ProxyError, ReadTimeout, SSLError
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, ProtocolError, ReadTimeoutError

    inner = exc.args[0] if exc.args else None  # the urllib3 error that requests wraps
    cause = getattr(inner, "reason", None)  # why urllib3 made no connection
    if first and isinstance(cause, ConnectTimeoutError):  # also the base of a refusal and of an unknown host
        why = (getattr(cause.__cause__, "strerror", None) or "connection timed out").lower()
        if isinstance(cause, NameResolutionError):
            why = "host name could not be resolved"
        host, failed = urlsplit(url).hostname, getattr(exc.request, "url", None) or url
        if urlsplit(failed).hostname == host:
            raise ConverterError(f"cannot reach {host} ({why} for {url}): {_OFFLINE_HINT}") from None
        raise ConverterError(  # the first host answered, with a redirect: not offline, but kept from the next
            f"cannot reach {urlsplit(failed).hostname} ({why} for {failed}), where {url} redirects (a "
            "firewall or proxy?): download it yourself and pass --checkpoint PATH."
        ) from None
    if isinstance(exc, ReadTimeout | ReadTimeoutError) or isinstance(inner, ReadTimeoutError):
        return _Cut(f"stalled (no data for {STALL_TIMEOUT:g} s)", got or "no answer")
    if isinstance(exc, ConnectionError | ChunkedEncodingError | ProtocolError) and not isinstance(
        exc, SSLError | ProxyError
    ):
        return _Cut("was truncated", got or "connection dropped")
    raise ConverterError(
        f"download of {url} failed ({reason(exc)}); check the URL, proxy and TLS settings, or pass "
        "--checkpoint PATH for a local copy."
    ) from None


def _attempt_http(url: str, part: Path) -> tuple[bool, str | None]:
    """One GET, written or appended to ``part``; a failure worth retrying raises _Cut or a requests error."""
    import requests
    from urllib3.exceptions import HTTPError

    known: dict[str, Any] = {}
    with suppress(ConverterError):  # the validator of the answer that started ``part``
        known = read_json_object(Path(f"{part}.json"), "a validator")
    if not (
        part.exists()
        and isinstance(known.get("validator"), str)
        and _HEADER_VALUE.fullmatch(known["validator"])
    ):
        _discard_partial(part)  # nothing proves these bytes belong to today's file: start over
        known = {}
    have = part.stat().st_size if known else 0
    # identity: Content-Length and Range offsets must count the bytes written to disk.
    headers = {"Accept-Encoding": "identity"}
    if known:
        headers |= {"Range": f"bytes={have}-", "If-Range": known["validator"]}
    with requests.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, STALL_TIMEOUT)) as resp:
        status, etag = resp.status_code, resp.headers.get("ETag")
        # If-Range needs a strong validator: a strong ETag, else Last-Modified; one that could not be sent
        # back (a folded header) is none.
        validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
        validator = validator if _HEADER_VALUE.fullmatch(validator or "") else None
        # "bytes START-END/TOTAL" (206) or "bytes */TOTAL" (416)
        m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+)\s*", resp.headers.get("Content-Range", ""))
        start, total = (int(m[1]) if m and m[1] else None), (int(m[2]) if m else None)
        if status == 416 and known and total == have and known.get("total") in (None, have):
            return True, None  # the validator held and our file is complete
        if status >= 500 or status in (408, 429):  # the server's trouble, or too many requests: try again
            raise _Cut("failed", f"HTTP {status} {resp.reason}")
        if status not in (200, 206) and not (status == 416 and known):  # 416 answers only a resume
            _discard_partial(part)
            raise ConverterError(
                f"download of {url} failed: HTTP {status} {resp.reason}; check the model name, the URL or "
                f"XCLIP_RELEASE_URL, {_LOCAL_COPY}."
            )
        if status != 200 and (
            status == 416
            or start != have
            or validator != known.get("validator")  # absent: nothing shows it is the same version
            or known.get("total") not in (None, total)
        ):  # a resume we cannot trust (past the end, a server ignoring If-Range, a wrong offset): start over
            _discard_partial(part)
            raise _Cut("was truncated", f"HTTP {status} for a resume at byte {have} of another version")
        if status == 200:  # a full body: the file is new or changed (If-Range failed), so it starts afresh
            _discard_partial(part)
            have = 0
            encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", "")
            total = None if encoded else resp.raw.length_remaining  # urllib3's reading of Content-Length
            if validator is not None:
                record = json.dumps({"validator": validator, "total": total})
                write_file(Path(f"{part}.json"), record, flag="the download cache")
        size = window_size = have
        window_start = time.monotonic()

        def received() -> str:
            return f"got {size} of {total} bytes" if total is not None else f"after {size} bytes"

        with open(part, "ab" if have else "wb") as f, _progress(part.stem, have, total) as report:
            try:
                # read1 returns what has arrived: a server sending a trickle is timed, not waited for.
                while block := resp.raw.read1(NET_CHUNK_SIZE, decode_content=True):
                    _refuse_oversized(size + len(block), total, url, part)
                    f.write(block)
                    size += len(block)
                    report(size, total)
                    if time.monotonic() - window_start >= STALL_TIMEOUT:  # a trickle is a stall too
                        if size - window_size < NET_CHUNK_SIZE:
                            less = f"under {NET_CHUNK_SIZE >> 10} KiB in {STALL_TIMEOUT:g} s"
                            raise _Cut(f"stalled ({less})", received())
                        window_start, window_size = time.monotonic(), size
            except (requests.RequestException, HTTPError) as exc:  # what was written stays: a resume
                raise _cut_or_fail(exc, url, first=False, got=received()) from None
    if total is not None and size != total:  # more than announced: the resume's 416 will restart it
        raise _Cut("was truncated", received())
    if total is not None and (on_disk := part.stat().st_size) != total:  # a second writer: its lock removed
        _discard_partial(part)
        raise _Cut("was written to by another process", f"{on_disk} bytes on disk, {total} announced")
    if total is None and (why := _cut_off(part)):  # without a length, a closed connection looks like the end
        raise _Cut("ended incomplete", f"{why}, after {size} bytes")
    return total is not None, resp.headers.get("Content-Type")


def _download_gdrive(file_id: str, part: Path, fresh: bool) -> tuple[bool, str | None]:
    """Download a Drive file through gdown (it resolves Drive's confirmation pages), afresh on every run."""
    import gdown
    import requests
    from gdown.exceptions import DownloadError, FileURLRetrievalError

    what = f"Google Drive file id {file_id}"
    try:  # gdown retries an unresolvable host for minutes: ask DNS first, so that offline is said at once
        socket.getaddrinfo("drive.google.com", 443)
    except OSError:
        raise ConverterError(
            f"cannot reach drive.google.com (host name could not be resolved for {what}): {_OFFLINE_HINT}"
        ) from None
    # gdown would resume an earlier run's partial file unvalidated, and leaves partial files behind on
    # failure: each run starts afresh in a folder removed after it (within a run, gdown resumes itself).
    with (
        tempfile.TemporaryDirectory(prefix=".gdown-", dir=part.parent) as scratch,
        _progress(part.stem, 0, None) as report,
    ):
        output = Path(scratch) / part.name

        def bounded(done: int, total: int | None) -> None:  # gdown aborts on what its callback raises
            _refuse_oversized(done, total, what, part)
            report(done, total)

        try:
            gdown.download(
                id=file_id,
                output=str(output),
                quiet=True,
                progress=bounded,
                resume=False,
                retries=MAX_RETRIES,
                timeout=(CONNECT_TIMEOUT, STALL_TIMEOUT),
            )
        except (FileURLRetrievalError, DownloadError, requests.RequestException) as exc:
            text = str(exc).lower()
            if "too many users" in text or "quota" in text:
                why = "was refused: Google Drive quota exceeded (too many downloads of this file lately)"
            elif isinstance(exc, FileURLRetrievalError):
                why = "was refused: Drive gave no download link (the file may be private or removed)"
            else:
                why = f"{'stalled' if 'timed out' in text else 'failed'} ({reason(exc)})"
            raise ConverterError(
                f"download of {what} {why}; re-run later, or download it in a browser and pass "
                "--checkpoint PATH, or set XCLIP_RELEASE_URL to a mirror."
            ) from None
        os.replace(output, part)
    return False, None  # gdown checks a length it was given, but does not say whether it had one
