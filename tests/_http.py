"""A real HTTP server on 127.0.0.1 (ephemeral port) for tests, with injectable faults.

Serves a dict of ``path -> bytes`` and/or a directory, honours ``Range: bytes=N-[M]`` (206) and ``If-Range``
(each file has an ETag and a Last-Modified, unless ``validators=False``), and records every request so tests
can assert what went over the wire::

    with LoopbackServer({"/m.pth": data}) as srv:
        srv.add_faults("/m.pth", Fault(status=503), Fault(truncate=0.5))  # next two requests, in order
        srv.set_always("/m.pth", Fault(ignore_range=True))                 # every later request
        fetch_url(srv.url("/m.pth"))
        assert srv.full_gets("/m.pth") == 1
"""

from __future__ import annotations

import gzip
import hashlib
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["Fault", "Hit", "LoopbackServer"]


@dataclass(frozen=True)
class Fault:
    """How to misbehave on one request (queued with add_faults) or on all of them (set_always).

    status:       answer this status code with a short text body instead of the file.
    truncate:     announce the full length, send only this many bytes (int) or this fraction (float) of the
                  answer's body, then close the connection (a dropped / short transfer).
    stall:        seconds of silence before that close (after the `truncate` bytes, or after the headers):
                  a server that stops sending without hanging up.
    ignore_range: answer 200 with the whole file even to a Range request.
    ignore_if_range: honour Range even when If-Range names another version (a broken cache or proxy).
    delay:        seconds to sleep before answering (slow server, read timeouts).
    pace:         seconds to sleep between 16 KiB pieces of the body (a slow but live server).
    no_length:    send no Content-Length; the end of the body is the end of the connection.
    body, content_type: answer 200 with this body and type instead of the file (an HTML page, say).
    swap:         after this answer, the file has these bytes (a new version, with a new ETag and date).
    redirect:     answer 302 with this Location.
    gzip:         send the file gzip-compressed (Content-Encoding: gzip), whatever the client accepts.
    """

    status: int | None = None
    truncate: int | float | None = None
    stall: float = 0.0
    ignore_range: bool = False
    ignore_if_range: bool = False
    delay: float = 0.0
    pace: float = 0.0
    no_length: bool = False
    body: bytes | None = None
    content_type: str | None = None
    swap: bytes | None = None
    redirect: str | None = None
    gzip: bool = False


@dataclass(frozen=True)
class Hit:
    """One request the server answered."""

    method: str
    path: str
    range: str | None  # the Range header, if any
    status: int
    length: int  # body length announced in Content-Length
    sent: int  # body bytes actually written
    if_range: str | None = None  # the If-Range header, if any

    @property
    def complete(self) -> bool:
        return self.sent == self.length


def _norm(path: str) -> str:
    path = unquote(urlsplit(path).path)
    return path if path.startswith("/") else "/" + path


class LoopbackServer:
    """Context manager running a ThreadingHTTPServer on 127.0.0.1 in a daemon thread."""

    def __init__(
        self,
        files: Mapping[str, bytes] | None = None,
        *,
        root: Path | str | None = None,
        range_support: bool = True,
        validators: bool = True,
    ) -> None:
        self.files: dict[str, bytes] = {_norm(k): v for k, v in (files or {}).items()}
        self.root = Path(root).resolve() if root is not None else None
        self.range_support = range_support
        self.validators = validators  # ETag and Last-Modified on every file, If-Range honoured
        self._versions: dict[str, int] = {}  # bumped by Fault(swap=...): a new Last-Modified
        self.hits: list[Hit] = []
        self._faults: dict[str, list[Fault]] = {}
        self._always: dict[str, Fault] = {}
        self._lock = threading.Condition()  # guards hits/faults; notified when a request finishes
        self._in_flight = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._port: int | None = None  # kept after stop(): a stopped server's URLs stay valid (and refused)
        self._thread: threading.Thread | None = None

    # -- configuration ------------------------------------------------------------------------------------
    def add_faults(self, path: str, *faults: Fault) -> None:
        """Queue faults for the next requests to ``path``, one per request, in order."""
        with self._lock:
            self._faults.setdefault(_norm(path), []).extend(faults)

    def set_always(self, path: str, fault: Fault | None) -> None:
        """Apply ``fault`` to every request to ``path`` once its queue is empty (None clears it)."""
        with self._lock:
            if fault is None:
                self._always.pop(_norm(path), None)
            else:
                self._always[_norm(path)] = fault

    # -- inspection ---------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._port is not None, "server not started"
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + _norm(path)

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until no request is being answered, so ``hits`` is final.

        A client can finish reading a response before the handler thread has recorded it; asserting on
        ``hits`` without this would race.
        """
        with self._lock:
            self._lock.wait_for(lambda: self._in_flight == 0, timeout=timeout)

    def hits_for(self, path: str, method: str = "GET") -> list[Hit]:
        """Requests to ``path`` (after settle())."""
        self.settle()
        with self._lock:
            return [h for h in self.hits if h.path == _norm(path) and h.method == method]

    def full_gets(self, path: str) -> int:
        """GETs of ``path`` that sent the whole file (200, every byte)."""
        return sum(1 for h in self.hits_for(path) if h.status == 200 and h.complete)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> LoopbackServer:
        handler = type("_Handler", (_Handler,), {"owner": self})
        self._httpd = _QuietServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._port = self._httpd.server_address[1]
        # A short poll interval makes stop() quick (the default 0.5 s would dominate short tests).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="loopback-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; later connections are refused. Idempotent."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals used by the handler --------------------------------------------------------------------
    def _body(self, path: str) -> bytes | None:
        if path in self.files:
            return self.files[path]
        if self.root is not None:
            target = (self.root / path.lstrip("/")).resolve()
            if target.is_relative_to(self.root) and target.is_file():
                return target.read_bytes()
        return None

    def _validators(self, path: str, body: bytes) -> dict[str, str]:
        if not self.validators:
            return {}
        with self._lock:
            version = self._versions.get(path, 0)
        return {
            "ETag": '"' + hashlib.sha256(body).hexdigest()[:16] + '"',
            "Last-Modified": formatdate(1_600_000_000 + 3600 * version, usegmt=True),
        }

    def _swap(self, path: str, body: bytes) -> None:
        with self._lock:
            self.files[path] = body
            self._versions[path] = self._versions.get(path, 0) + 1

    def _begin(self, path: str) -> Fault:
        """Count a request as in flight and pick its fault."""
        with self._lock:
            self._in_flight += 1
            queue = self._faults.get(path)
            if queue:
                return queue.pop(0)
            return self._always.get(path, Fault())

    def _end(self, hit: Hit) -> None:
        with self._lock:
            self.hits.append(hit)
            self._in_flight -= 1
            self._lock.notify_all()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hanging up mid-answer is what these tests provoke; the default handler would print a
        # traceback to stderr, where the tests read the CLI's own messages.
        pass


class _Handler(BaseHTTPRequestHandler):
    owner: LoopbackServer
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers; faults close the connection explicitly

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass  # keep test output clean

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        path = _norm(self.path)
        fault = self.owner._begin(path)
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        hit = Hit(self.command, path, range_header, 0, 0, 0, if_range)  # recorded even if answering fails
        try:
            if fault.delay:
                time.sleep(fault.delay)
            status, payload, headers = self._answer(path, range_header, fault)
            hit = Hit(self.command, path, range_header, status, len(payload), 0, if_range)
            hit = self._send(hit, payload, headers, fault, head=head)
            if fault.swap is not None:
                self.owner._swap(path, fault.swap)
        finally:
            self.owner._end(hit)

    def _answer(self, path: str, range_header: str | None, fault: Fault) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, extra headers) for this request."""
        owner = self.owner
        if fault.redirect is not None:
            return 302, b"", {"Location": fault.redirect}
        if fault.body is not None:
            return 200, fault.body, {"Content-Type": fault.content_type or "text/html; charset=utf-8"}
        body = owner._body(path)
        if fault.status is not None or body is None:
            status = fault.status if fault.status is not None else 404
            return status, f"{status} for {path}\n".encode(), {"Content-Type": "text/plain"}
        size = len(body)
        headers = {
            "Accept-Ranges": "bytes" if owner.range_support else "none",
            **owner._validators(path, body),
        }
        if fault.content_type:
            headers["Content-Type"] = fault.content_type
        if_range = self.headers.get("If-Range")
        current = (headers.get("ETag"), headers.get("Last-Modified"))
        # RFC 9110: a Range whose If-Range names another version is ignored (the whole new file, 200).
        range_valid = if_range is None or if_range in current or fault.ignore_if_range
        if range_header and owner.range_support and not fault.ignore_range and range_valid:
            parsed = _parse_range(range_header, size)
            if parsed is None:
                return 416, b"", {**headers, "Content-Range": f"bytes */{size}"}
            start, end = parsed
            return 206, body[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        if fault.gzip:
            return 200, gzip.compress(body), {**headers, "Content-Encoding": "gzip"}
        return 200, body, headers

    def _send(self, hit: Hit, payload: bytes, headers: dict[str, str], fault: Fault, *, head: bool) -> Hit:
        n = len(payload)
        if fault.truncate is not None:
            n = int(n * fault.truncate) if isinstance(fault.truncate, float) else min(n, fault.truncate)
        cut = fault.truncate is not None or fault.stall > 0
        if cut or fault.no_length:
            self.close_connection = True  # the body ends with the connection, as a real drop does
        sent = 0
        try:
            self.send_response(hit.status)
            headers = {"Content-Type": "application/octet-stream", **headers}
            if not fault.no_length:
                headers["Content-Length"] = str(len(payload))
            for k, v in headers.items():
                self.send_header(k, v)
            if cut or fault.no_length:
                self.send_header("Connection", "close")
            self.end_headers()
            if head:
                return hit
            piece = 16 << 10 if fault.pace else max(n, 1)
            while sent < n:
                self.wfile.write(payload[sent : min(n, sent + piece)])
                self.wfile.flush()
                sent = min(n, sent + piece)
                if fault.pace and sent < n:
                    time.sleep(fault.pace)
            if fault.stall:
                time.sleep(fault.stall)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its read timed out)
            self.close_connection = True
            return replace(hit, sent=sent)
        return replace(hit, sent=n)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=N-`` / ``bytes=N-M`` -> inclusive (start, end); None when unsatisfiable."""
    spec = header.strip()
    if not spec.startswith("bytes=") or "," in spec:
        return None
    first, _, last = spec[len("bytes=") :].partition("-")
    try:
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)
