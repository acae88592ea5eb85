"""The download layer against real HTTP servers on 127.0.0.1 (no internet needed)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

from converter import fetch, registry
from converter.errors import ConverterError
from tests._http import Fault, LoopbackServer

REPO = Path(__file__).resolve().parents[1]
# Stand-ins for a checkpoint: a pickle's first byte (fetch caches no other kind of file), then noise.
DATA = b"\x80" + random.Random(0).randbytes(256 * 1024 + 12)  # odd size: halves are not chunk-aligned
SHA = hashlib.sha256(DATA).hexdigest()
V2 = b"\x80" + random.Random(1).randbytes(len(DATA) + 999)  # a new version of the file on the server
PATH = "/v1.0/k400_32_8.pth"


@pytest.fixture(autouse=True)
def _fast_and_isolated(fast_network, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("XCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("XCLIP_RELEASE_URL", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def server():
    with LoopbackServer({PATH: DATA}) as srv:
        yield srv


def _cache_files(cache: Path) -> list[str]:
    """Everything left in the cache except lock files (which may outlive a fetch by design)."""
    if not cache.exists():
        return []
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock")


# -- resume / retry ----------------------------------------------------------------------------------------


def test_dropped_transfer_resumes_with_range(server: LoopbackServer) -> None:
    server.add_faults(PATH, Fault(truncate=0.5))
    path = fetch.fetch_url(server.url(PATH))
    assert path.read_bytes() == DATA
    hits = server.hits_for(PATH)
    assert [h.status for h in hits] == [200, 206]
    assert hits[0].range is None and not hits[0].complete
    # Resumed from what was saved (at most the bytes sent; a read block cut by the drop is lost).
    assert hits[1].range is not None and hits[1].range.startswith("bytes=") and hits[1].complete
    assert 0 < int(hits[1].range[len("bytes=") : -1]) <= hits[0].sent
    assert hits[1].if_range is not None  # resumed only with the validator of the first answer
    assert (path.parent / (path.name + ".sha256")).read_text() == SHA + "\n"
    assert not (path.parent / (path.name + ".part")).exists()


def test_a_resumed_download_leaves_only_the_file_and_its_record(
    server: LoopbackServer, _fast_and_isolated: Path
) -> None:
    """The resume's validator (<file>.part.json) goes once the file is complete: nothing stale is cached."""
    server.add_faults(PATH, Fault(truncate=0.5))
    path = fetch.fetch_url(server.url(PATH))
    where = path.relative_to(_fast_and_isolated)
    assert _cache_files(_fast_and_isolated) == sorted([str(where), f"{where}.sha256"])


def test_bytes_another_writer_appended_are_never_cached(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, _fast_and_isolated: Path
) -> None:
    """A second process writing the same .part (someone removed the lock file meanwhile): the file on disk
    is not the one announced, so it starts over instead of caching the mix with a digest on record."""
    progress = fetch._progress
    interfered: list[Path] = []

    @contextlib.contextmanager
    def with_a_second_writer(name: str, done: int, total: int | None):
        with progress(name, done, total) as report:

            def report_and_append(done: int, total: int | None) -> None:
                report(done, total)
                if done == total and not interfered:  # the other run's bytes go past the end of ours
                    interfered.append(part := next(_fast_and_isolated.rglob("*.part")))
                    with open(part, "r+b") as other:
                        other.seek(total)
                        other.write(b"another run's bytes")

            yield report_and_append

    monkeypatch.setattr(fetch, "_progress", with_a_second_writer)
    path = fetch.fetch_url(server.url(PATH))
    assert interfered and path.read_bytes() == DATA
    assert [h.status for h in server.hits_for(PATH)] == [200, 200]  # started over, not resumed


def test_a_cache_removed_during_the_download_says_to_run_again(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, _fast_and_isolated: Path
) -> None:
    """Not 'set XCLIP_CACHE to a writable folder': the folder was fine until something removed it."""
    progress = fetch._progress

    @contextlib.contextmanager
    def with_a_cache_cleaner(name: str, done: int, total: int | None):
        with progress(name, done, total) as report:
            yield lambda done, total: (
                report(done, total),
                shutil.rmtree(_fast_and_isolated, ignore_errors=True),
            )

    monkeypatch.setattr(fetch, "_progress", with_a_cache_cleaner)
    with pytest.raises(ConverterError, match="something removed it while this run used it; run again"):
        fetch.fetch_url(server.url(PATH))
    monkeypatch.setattr(fetch, "_progress", progress)
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == DATA


def test_server_ignoring_range_restarts_cleanly(server: LoopbackServer) -> None:
    server.add_faults(PATH, Fault(truncate=0.5))
    server.set_always(PATH, Fault(ignore_range=True))
    path = fetch.fetch_url(server.url(PATH))
    assert path.read_bytes() == DATA
    hits = server.hits_for(PATH)
    assert [h.status for h in hits] == [200, 200]
    assert hits[1].range is not None  # it asked to resume, got the whole file, and started over
    assert server.full_gets(PATH) == 1


def test_404_fails_at_once_and_leaves_nothing(server: LoopbackServer, _fast_and_isolated: Path) -> None:
    url = server.url("/v1.0/missing.pth")
    t0 = time.monotonic()
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(url)
    assert time.monotonic() - t0 < 2.0
    assert "404" in str(err.value) and url in str(err.value)
    assert len(server.hits_for("/v1.0/missing.pth")) == 1  # no retries on 4xx
    assert _cache_files(_fast_and_isolated) == []


def test_416_to_a_request_without_range_fails_at_once(
    server: LoopbackServer, _fast_and_isolated: Path
) -> None:
    """A 416 answers only a resume: to a fresh request it is a server's mistake, not a cut to retry."""
    server.set_always(PATH, Fault(status=416))
    with pytest.raises(ConverterError, match="HTTP 416") as err:
        fetch.fetch_url(server.url(PATH))
    assert server.url(PATH) in str(err.value)
    assert len(server.hits_for(PATH)) == 1
    assert _cache_files(_fast_and_isolated) == []


def test_4xx_after_a_drop_removes_the_partial_file(server: LoopbackServer, _fast_and_isolated: Path) -> None:
    server.add_faults(PATH, Fault(truncate=0.5), Fault(status=403))
    with pytest.raises(ConverterError, match="403"):
        fetch.fetch_url(server.url(PATH))
    assert _cache_files(_fast_and_isolated) == []


def test_complete_partial_file_is_finished_without_a_body(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A crash between the last byte and the rename leaves a complete ".part": the resume gets 416.
    real_replace = os.replace

    def crash(src: object, dst: object) -> None:
        if str(src).endswith(".part"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            fetch.fetch_url(server.url(PATH))
    assert fetch.fetch_url(server.url(PATH), sha256=SHA).read_bytes() == DATA
    hits = server.hits_for(PATH)
    assert [h.status for h in hits] == [200, 416] and hits[1].if_range is not None


def test_a_partial_file_is_not_complete_because_a_shorter_new_version_ends_there(
    server: LoopbackServer, _fast_and_isolated: Path
) -> None:
    """A .part of the old version, recorded with its full length, and a new version exactly as long as the
    .part behind a proxy that ignores If-Range: the 416 says 'complete' for another file. The recorded
    length shows it is not, so it starts over and caches the new version, never the old one's head."""
    half = len(DATA) // 2
    final = fetch.url_cache_path(server.url(PATH), _fast_and_isolated)
    final.parent.mkdir(parents=True)
    Path(f"{final}.part").write_bytes(DATA[:half])
    validator = server._validators(PATH, DATA)["ETag"]
    Path(f"{final}.part.json").write_text(json.dumps({"validator": validator, "total": len(DATA)}))
    server.files[PATH] = V2[:half]
    server.set_always(PATH, Fault(ignore_if_range=True))
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == V2[:half]
    assert [h.status for h in server.hits_for(PATH)] == [416, 200]


def test_a_resume_announcing_another_length_than_recorded_restarts(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, _fast_and_isolated: Path
) -> None:
    """A server whose validator did not change with the file (a Last-Modified within the same second): the
    length it announces does, and the .part starts over instead of being finished with the new file's tail."""
    monkeypatch.setattr(server, "_validators", lambda path, body: {"ETag": '"same"'})
    half = len(DATA) // 2
    final = fetch.url_cache_path(server.url(PATH), _fast_and_isolated)
    final.parent.mkdir(parents=True)
    Path(f"{final}.part").write_bytes(DATA[:half])
    Path(f"{final}.part.json").write_text(json.dumps({"validator": '"same"', "total": len(DATA)}))
    server.files[PATH] = V2
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == V2
    assert [h.status for h in server.hits_for(PATH)] == [206, 200]


def test_a_resume_answered_from_another_offset_restarts(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 206 whose Content-Range starts elsewhere than the bytes on disk end (a broken cache) would leave a
    gap in the file if appended: the .part starts over instead."""
    from tests import _http

    parse, skipped = _http._parse_range, []

    def once_from_further_on(header: str, size: int) -> tuple[int, int] | None:
        parsed = parse(header, size)
        if parsed is None or skipped:
            return parsed
        skipped.append(parsed)
        return parsed[0] + 1000, parsed[1]

    monkeypatch.setattr(_http, "_parse_range", once_from_further_on)
    server.add_faults(PATH, Fault(truncate=0.5))
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == DATA
    assert skipped and [h.status for h in server.hits_for(PATH)] == [200, 206, 200]


def test_503_twice_then_success(server: LoopbackServer) -> None:
    server.add_faults(PATH, Fault(status=503), Fault(status=503))
    path = fetch.fetch_url(server.url(PATH))
    assert path.read_bytes() == DATA
    assert [h.status for h in server.hits_for(PATH)] == [503, 503, 200]


def test_5xx_forever_gives_up_after_bounded_retries(server: LoopbackServer) -> None:
    server.set_always(PATH, Fault(status=502))
    with pytest.raises(ConverterError, match="502") as err:
        fetch.fetch_url(server.url(PATH))
    assert server.url(PATH) in str(err.value)
    assert len(server.hits_for(PATH)) == fetch.MAX_RETRIES + 1


def test_silence_before_the_answer_is_retried(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "STALL_TIMEOUT", 0.3)
    server.add_faults(PATH, Fault(delay=1.0))
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == DATA


def test_short_body_on_every_attempt_is_reported(server: LoopbackServer) -> None:
    # Announces the full length, sends half, and ignores Range: no attempt can ever complete.
    server.set_always(PATH, Fault(truncate=0.5, ignore_range=True))
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(server.url(PATH))
    msg = str(err.value)
    assert "truncated" in msg and server.url(PATH) in msg and str(len(DATA)) in msg
    assert "\n" not in msg
    assert len(server.hits_for(PATH)) == fetch.MAX_RETRIES + 1


def test_giving_up_without_a_validator_keeps_nothing_and_says_so(_fast_and_isolated: Path) -> None:
    """A server without ETag or Last-Modified cannot be resumed (nothing proves the next answer is the same
    file): after the last try its bytes are removed, not kept under the promise of a resume."""
    with LoopbackServer({PATH: DATA}, validators=False) as server:
        server.set_always(PATH, Fault(truncate=0.5))
        with pytest.raises(ConverterError, match="was truncated") as err:
            fetch.fetch_url(server.url(PATH))
    assert "nothing was kept" in str(err.value) and "resumes" not in str(err.value)
    assert _cache_files(_fast_and_isolated) == []


# -- integrity --------------------------------------------------------------------------------------------


def test_sha256_pin_mismatch_caches_nothing(server: LoopbackServer, _fast_and_isolated: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(server.url(PATH), sha256=wrong)
    assert wrong in str(err.value) and SHA in str(err.value)
    assert _cache_files(_fast_and_isolated) == []


def test_sha256_pin_match_and_cached_pin(server: LoopbackServer) -> None:
    path = fetch.fetch_url(server.url(PATH), sha256=SHA.upper())
    assert fetch.sha256_file(path) == SHA
    server.stop()
    assert fetch.fetch_url(server.url(PATH), sha256=SHA) == path  # from the record, no network


def test_corrupt_cached_file_is_fetched_again(server: LoopbackServer) -> None:
    # The cached file no longer matches the digest recorded when it was fetched: our own copy went bad,
    # so a pin it cannot meet fetches it again (an intact one would be kept: see below).
    path = fetch.fetch_url(server.url(PATH))
    path.write_bytes(b"corrupt")
    server.files[PATH] = V2
    assert fetch.fetch_url(server.url(PATH), sha256=hashlib.sha256(V2).hexdigest()).read_bytes() == V2
    assert server.full_gets(PATH) == 2


def test_missing_record_is_recomputed(server: LoopbackServer) -> None:
    path = fetch.fetch_url(server.url(PATH))
    record = path.parent / (path.name + ".sha256")
    record.unlink()
    server.stop()
    assert fetch.fetch_url(server.url(PATH), sha256=SHA) == path
    assert record.read_text() == SHA + "\n"


def test_a_record_that_is_not_a_digest_is_no_record(tmp_path: Path) -> None:
    """`sha256sum FILE > FILE.sha256` beside a checkpoint writes the name too: that is not read as a digest
    (it would reach the model card's sha256, and fail the publishing check against the file)."""
    path = tmp_path / "k400_32_8.pth"
    path.write_bytes(DATA)
    for text in (f"{SHA}  k400_32_8.pth\n", "not a digest\n", SHA[:-1]):
        Path(f"{path}.sha256").write_text(text)
        assert fetch.recorded_sha256(path) is None
    Path(f"{path}.sha256").write_text(f" {SHA.upper()}\n")
    assert fetch.recorded_sha256(path) == SHA


# -- cache ------------------------------------------------------------------------------------------------


def test_cache_hit_does_not_touch_the_network(server: LoopbackServer) -> None:
    url = server.url(PATH)
    path = fetch.fetch_url(url)
    server.stop()
    assert fetch.fetch_url(url) == path
    assert path.read_bytes() == DATA


def test_force_and_forget_redownload(server: LoopbackServer) -> None:
    url = server.url(PATH)
    path = fetch.fetch_url(url)
    assert fetch.fetch_url(url, force=True) == path
    assert server.full_gets(PATH) == 2
    fetch.forget(path)
    assert not path.exists() and not (path.parent / (path.name + ".sha256")).exists()
    fetch.fetch_url(url)
    assert server.full_gets(PATH) == 3


def test_same_basename_from_two_sources_gets_two_paths(tmp_path: Path) -> None:
    other = b"\x80 another model"  # a pickle's first byte, as DATA
    with LoopbackServer({"/a/model.pth": DATA, "/b/model.pth": other}) as srv:
        pa = fetch.fetch_url(srv.url("/a/model.pth"), cache=tmp_path / "c")
        pb = fetch.fetch_url(srv.url("/b/model.pth"), cache=tmp_path / "c")
    assert pa != pb and pa.name == pb.name == "model.pth"
    assert pa.is_relative_to(tmp_path / "c" / "url")
    assert pa.read_bytes() == DATA and pb.read_bytes() == other


_CHILD = """
import sys, time, pathlib
from converter import fetch
pathlib.Path(sys.argv[2]).touch()
while not pathlib.Path(sys.argv[3]).exists():
    time.sleep(0.005)
print(fetch.fetch_url(sys.argv[1]))
"""


def test_two_processes_fetch_once(server: LoopbackServer, tmp_path: Path, _fast_and_isolated: Path) -> None:
    # A slow answer guarantees that the second process arrives while the first is still downloading.
    server.set_always(PATH, Fault(delay=0.5))
    go = tmp_path / "go"
    env = {**os.environ, "XCLIP_CACHE": str(_fast_and_isolated), "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, server.url(PATH), str(tmp_path / f"ready{i}"), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 15
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.01)
        go.touch()
        outs = [p.communicate(timeout=15) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    paths = {Path(out.strip()) for out, _ in outs}
    assert len(paths) == 1
    assert paths.pop().read_bytes() == DATA
    assert len(server.hits_for(PATH)) == 1 and server.full_gets(PATH) == 1


def test_a_process_waiting_for_another_ones_download_says_so(
    server: LoopbackServer, _fast_and_isolated: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.url(PATH)
    lock = FileLock(str(fetch._lock_path(fetch.url_cache_path(url, _fast_and_isolated), _fast_and_isolated)))
    result: dict[str, object] = {}
    with caplog.at_level(logging.INFO, logger="converter"), lock:  # "another process" holds the lock
        waiter = threading.Thread(target=lambda: result.update(path=fetch.fetch_url(url)))
        waiter.start()
        deadline = time.monotonic() + 15
        while "waiting for another process" not in caplog.text:
            assert time.monotonic() < deadline and waiter.is_alive(), "the waiting fetch said nothing"
            time.sleep(0.01)
        assert server.hits_for(PATH) == []  # it waits; it does not download meanwhile
    waiter.join(15)
    assert Path(result["path"]).read_bytes() == DATA
    said = [r.getMessage() for r in caplog.records if "waiting for another process" in r.getMessage()]
    assert said == [f"waiting for another process fetching {url} (lock: {lock.lock_file})"]


# -- offline ----------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_connection_after_a_drop_is_retried_not_called_offline(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline is said only when the first try cannot connect: a server that drops a transfer and refuses
    the next connection (restarting, say) is tried again, and the download resumes."""
    import requests

    real_get, urls = requests.get, []

    def refused_once(url: str, **kwargs: object) -> object:
        urls.append(url)
        return real_get(f"http://127.0.0.1:{_closed_port()}/x" if len(urls) == 2 else url, **kwargs)

    monkeypatch.setattr(requests, "get", refused_once)
    server.add_faults(PATH, Fault(truncate=0.5))
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == DATA
    assert len(urls) == 3 and [h.status for h in server.hits_for(PATH)] == [200, 206]


def test_connection_refused_is_reported_fast_as_offline() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1.0/x.pth"
    t0 = time.monotonic()
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(url)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert msg.startswith("cannot reach 127.0.0.1 (connection refused")
    assert "offline" in msg and "--checkpoint PATH" in msg and "XCLIP_RELEASE_URL" in msg
    assert "\n" not in msg


def test_a_redirect_to_an_unreachable_host_names_that_host(server: LoopbackServer) -> None:
    # As GitHub redirects a release asset to another host, which a firewall may block.
    target = f"http://localhost:{_closed_port()}/asset.pth"
    server.add_faults(PATH, Fault(redirect=target))
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(server.url(PATH))
    msg = str(err.value)
    assert msg.startswith(
        f"cannot reach localhost (connection refused for {target}), where {server.url(PATH)}"
    )
    assert "offline" not in msg and "--checkpoint PATH" in msg


def test_unresolvable_host_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate the resolver of an offline machine, so the test does not depend on this machine's DNS.
    calls = []

    def no_dns(*args: object, **kwargs: object) -> object:
        calls.append(args)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    t0 = time.monotonic()
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url("https://github.invalid/nbl97/x.pth")
    assert time.monotonic() - t0 < 3
    assert str(err.value).startswith("cannot reach github.invalid (host name could not be resolved")
    assert "offline" in str(err.value)
    assert len(calls) == 1


# -- file:// ----------------------------------------------------------------------------------------------


def test_file_url_returns_local_path_and_checks_pin(tmp_path: Path) -> None:
    local = tmp_path / "local.pth"
    local.write_bytes(DATA)
    assert fetch.fetch_url(local.as_uri()) == local
    assert fetch.fetch_url(local.as_uri(), sha256=SHA) == local
    with pytest.raises(ConverterError, match="0{64}"):
        fetch.fetch_url(local.as_uri(), sha256="0" * 64)
    assert local.exists()  # the user's own file is never deleted
    with pytest.raises(ConverterError, match="not found"):
        fetch.fetch_url((tmp_path / "nope.pth").as_uri())


def test_a_file_url_names_no_other_host(tmp_path: Path) -> None:
    """file://localhost/PATH is this machine's file; file://HOST/PATH is another's, never read as ours."""
    local = tmp_path / "local.pth"
    local.write_bytes(DATA)
    assert fetch.fetch_url(f"file://localhost{local}") == local
    url = f"file://fileserver{local}"
    with pytest.raises(ConverterError, match="only local file:// URLs") as err:
        fetch.fetch_url(url)
    assert url in str(err.value)


def test_bad_urls_fail_at_once() -> None:
    with pytest.raises(ConverterError, match="ftp://"):
        fetch.fetch_url("ftp://example.org/x.pth")
    t0 = time.monotonic()
    with pytest.raises(ConverterError, match="http:///x.pth"):
        fetch.fetch_url("http:///x.pth")  # no host: not a network failure, so no retries
    assert time.monotonic() - t0 < 2.0


# -- resume only what is provably the same file ------------------------------------------------------------


def test_changed_file_under_resume_restarts(server: LoopbackServer) -> None:
    # The first transfer is cut off, and the server has a new version when we come back.
    server.add_faults(PATH, Fault(truncate=0.5, swap=V2))
    path = fetch.fetch_url(server.url(PATH))
    assert path.read_bytes() == V2  # not the old half spliced onto the new file's tail
    hits = server.hits_for(PATH)
    assert [h.status for h in hits] == [200, 200] and hits[1].if_range is not None


def test_last_modified_is_a_validator_too(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only Last-Modified (the ETag is weak, so If-Range may not use it).
    real = server._validators
    monkeypatch.setattr(server, "_validators", lambda p, b: {**real(p, b), "ETag": 'W/"x"'})
    server.add_faults(PATH, Fault(truncate=0.5, swap=V2))
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == V2
    assert server.hits_for(PATH)[1].if_range.endswith("GMT")


def test_a_206_of_another_version_restarts(server: LoopbackServer) -> None:
    # A broken proxy honours Range although If-Range names the old version: its new ETag gives it away.
    server.add_faults(PATH, Fault(truncate=0.5, swap=V2))
    server.set_always(PATH, Fault(ignore_if_range=True))
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == V2
    assert [h.status for h in server.hits_for(PATH)] == [200, 206, 200]


def test_a_206_without_a_validator_restarts(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # A server ignoring If-Range whose 206 carries no validator, for a new version of the same size:
    # nothing shows the bytes belong to the version the .part started with.
    same_size = b"\x80" + random.Random(2).randbytes(len(DATA) - 1)
    real = server._validators
    monkeypatch.setattr(server, "_validators", lambda p, b: {} if b == same_size else real(p, b))
    server.add_faults(PATH, Fault(truncate=0.5, swap=same_size))
    server.set_always(PATH, Fault(ignore_if_range=True))
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == same_size  # not two versions spliced
    assert [h.status for h in server.hits_for(PATH)] == [200, 206, 200]


@pytest.mark.parametrize("etag", ['"abc\r\n def"', "\u2603"], ids=["folded", "not-latin-1"])
def test_a_validator_that_cannot_be_sent_back_is_none(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, etag: str
) -> None:
    # Recorded, it would fail every later run before a request is made.
    part = fetch.url_cache_path(server.url(PATH), fetch.cache_dir()).with_suffix(".pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA[:1000])
    Path(f"{part}.json").write_text(json.dumps({"validator": etag, "total": len(DATA)}))
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == DATA  # a .part.json written by hand
    assert [h.range for h in server.hits_for(PATH)] == [None]
    if etag.isascii():  # from the server: a folded header (a Latin-1 one is sent as such)
        real = server._validators
        monkeypatch.setattr(server, "_validators", lambda p, b: {**real(p, b), "ETag": etag})
        server.add_faults("/b.pth", Fault(truncate=0.5))
        server.files["/b.pth"] = DATA
        # urllib3 2.7 keeps the fold (the value cannot be sent back: the next try starts over); 2.8 unfolds
        # it into a value that can. Either way the download completes, and no fold is sent back.
        assert fetch.fetch_url(server.url("/b.pth")).read_bytes() == DATA
        assert all(h.if_range is None or "\n" not in h.if_range for h in server.hits_for("/b.pth"))


@pytest.mark.parametrize("validator", [None, 123, ["x"]], ids=["null", "number", "list"])
def test_a_part_recorded_without_a_string_validator_starts_over(server: LoopbackServer, validator) -> None:
    part = fetch.url_cache_path(server.url(PATH), fetch.cache_dir()).with_suffix(".pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(V2[:1000])  # another version's bytes: resumed without If-Range, they would stay
    Path(f"{part}.json").write_text(json.dumps({"validator": validator, "total": len(DATA)}))
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == DATA
    assert [h.range for h in server.hits_for(PATH)] == [None]


def test_too_many_requests_is_retried(server: LoopbackServer) -> None:
    server.add_faults(PATH, Fault(status=429), Fault(status=408))
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == DATA
    assert [h.status for h in server.hits_for(PATH)] == [429, 408, 200]


def test_part_without_a_validator_starts_over(_fast_and_isolated: Path) -> None:
    with LoopbackServer({PATH: DATA}, validators=False) as server:
        server.add_faults(PATH, Fault(truncate=0.5))
        assert fetch.fetch_url(server.url(PATH)).read_bytes() == DATA
        hits = server.hits_for(PATH)
    assert [h.status for h in hits] == [200, 200] and hits[1].range is None


def test_part_from_an_old_run_without_a_validator_starts_over(server: LoopbackServer) -> None:
    # A ".part" left by an older version of this tool (no validator beside it) is never resumed.
    part = fetch.url_cache_path(server.url(PATH), fetch.cache_dir()).with_suffix(".pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(V2[:1000])
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == DATA
    assert [h.range for h in server.hits_for(PATH)] == [None]


# -- nothing implausible is cached -------------------------------------------------------------------------

QUOTA_PAGE = (
    b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>"
    b'<p class="uc-error-subcaption">Too many users have viewed or downloaded this file recently. Please try '
    b"accessing the file again later.</p></body></html>"
)
LOGIN_PAGE = b"\n  <html><head><title>Sign in</title></head><body>Sign in to continue</body></html>"


@pytest.mark.parametrize(
    ("page", "content_type", "named"),
    [
        (QUOTA_PAGE, "text/html; charset=utf-8", "Google Drive quota"),
        (LOGIN_PAGE, "text/html", "HTML page"),
        (LOGIN_PAGE, "application/octet-stream", "HTML page"),  # the first bytes give it away
        (b"Service temporarily unavailable, try later\n", "text/plain", "text/plain page"),
        (b"\xef\xbb\xbf<!DOCTYPE html><html>Sign in</html>", "application/octet-stream", "HTML page"),
        (b'{"error": "token expired"}', "application/json", "not a checkpoint"),
        (b"Error: bandwidth limit exceeded", "application/octet-stream", "not a checkpoint"),
        (b"", "application/octet-stream", "not a checkpoint"),
    ],
    ids=["quota", "html", "html-bytes", "text", "html-bom", "json", "error-bytes", "empty"],
)
def test_a_web_page_is_never_cached(
    server: LoopbackServer, _fast_and_isolated: Path, page: bytes, content_type: str, named: str
) -> None:
    server.add_faults(PATH, Fault(body=page, content_type=content_type))
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(server.url(PATH))
    msg = str(err.value)
    assert named in msg and server.url(PATH) in msg and "nothing was cached" in msg and "\n" not in msg
    assert _cache_files(_fast_and_isolated) == []  # no file, no .sha256 to trust later
    assert len(server.hits_for(PATH)) == 1  # a page is not retried


def test_a_drive_page_saying_too_many_users_is_named_a_quota_page(
    server: LoopbackServer, _fast_and_isolated: Path
) -> None:
    """Drive's limit page does not always say "quota" (its title varies): its message alone names it, and
    the advice is to wait a day, not to check the URL."""
    page = QUOTA_PAGE.replace(b"Quota exceeded", b"Sorry")
    server.add_faults(PATH, Fault(body=page, content_type="text/html"))
    with pytest.raises(ConverterError, match="a Google Drive quota page") as err:
        fetch.fetch_url(server.url(PATH))
    assert "try again in a day" in str(err.value)
    assert _cache_files(_fast_and_isolated) == []


def _checkpoint_bytes() -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.arange(40000, dtype=torch.float32)}, buffer)
    return buffer.getvalue()


def test_no_length_and_a_drop_is_not_cached(_fast_and_isolated: Path) -> None:
    data = _checkpoint_bytes()
    with LoopbackServer({PATH: data, "/b.pth": data}) as server:
        server.set_always(PATH, Fault(no_length=True, truncate=0.5, ignore_range=True))
        with pytest.raises(ConverterError) as err:
            fetch.fetch_url(server.url(PATH))
        msg = str(err.value)
        assert "incomplete" in msg and "central directory" in msg and "a re-run resumes" in msg, msg
        # Only the resumable ".part" and its validator: no file, no digest.
        assert {Path(p).suffix for p in _cache_files(_fast_and_isolated)} == {".part", ".json"}
        # A drop once, then a resume that completes it.
        server.add_faults("/b.pth", Fault(no_length=True, truncate=0.5))
        assert fetch.fetch_url(server.url("/b.pth")).read_bytes() == data
        assert [h.status for h in server.hits_for("/b.pth")] == [200, 206]


def test_no_length_needs_a_checkpoint_that_proves_itself_complete(_fast_and_isolated: Path) -> None:
    data = _checkpoint_bytes()
    with LoopbackServer({"/a.pth": data, PATH: DATA}) as server:
        server.set_always("/a.pth", Fault(no_length=True))
        assert fetch.fetch_url(server.url("/a.pth")).read_bytes() == data  # a complete zip
        server.set_always(PATH, Fault(no_length=True))
        with pytest.raises(ConverterError, match="cannot be proven complete.*--sha256"):
            fetch.fetch_url(server.url(PATH))  # random bytes: nothing says where they end
        assert not fetch.url_cache_path(server.url(PATH), _fast_and_isolated).exists()
        assert fetch.fetch_url(server.url(PATH), sha256=SHA).read_bytes() == DATA  # the pin proves it


def test_a_server_compressing_despite_identity_delivers_the_file(_fast_and_isolated: Path) -> None:
    """A server that gzips though asked for `identity`: its Content-Length counts the compressed bytes,
    not the file's, so it is no length of the file; the file is cached decoded, as the archive proves it."""
    data = _checkpoint_bytes()
    with LoopbackServer({"/a.pth": data, PATH: DATA}) as server:
        server.set_always("/a.pth", Fault(gzip=True))
        assert fetch.fetch_url(server.url("/a.pth")).read_bytes() == data
        assert [h.status for h in server.hits_for("/a.pth")] == [200]
        server.set_always(PATH, Fault(gzip=True))  # a legacy pickle: the pin proves it, as without a length
        assert fetch.fetch_url(server.url(PATH), sha256=SHA).read_bytes() == DATA


@pytest.mark.parametrize("fault", [Fault(no_length=True), Fault()], ids=["endless", "announced"])
def test_a_body_larger_than_any_checkpoint_is_refused_and_discarded(
    _fast_and_isolated: Path, monkeypatch: pytest.MonkeyPatch, fault: Fault
) -> None:
    """A server that sends without end (or announces more than any checkpoint) does not fill the disk."""
    monkeypatch.setattr(fetch, "MAX_DOWNLOAD_BYTES", len(DATA) - 1)
    with LoopbackServer({PATH: DATA}) as server:
        server.set_always(PATH, fault)
        with pytest.raises(ConverterError, match="is larger than the 0 GiB any X-CLIP checkpoint comes near"):
            fetch.fetch_url(server.url(PATH))
        assert _cache_files(_fast_and_isolated) == [] and len(server.hits_for(PATH)) == 1


def test_an_announced_length_above_the_limit_is_refused_before_its_body_is_written(
    _fast_and_isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Content-Length beyond any checkpoint is refused on the first block, not after the limit's many
    gigabytes have been received and written."""
    monkeypatch.setattr(fetch, "MAX_DOWNLOAD_BYTES", len(DATA) // 2)
    progress, written = fetch._progress, []

    @contextlib.contextmanager
    def recorded(name: str, done: int, total: int | None):
        with progress(name, done, total) as report:
            yield lambda done, total: (written.append(done), report(done, total))

    monkeypatch.setattr(fetch, "_progress", recorded)
    with LoopbackServer({PATH: DATA}) as server:
        with pytest.raises(ConverterError, match="is larger than the 0 GiB any X-CLIP checkpoint comes near"):
            fetch.fetch_url(server.url(PATH))
    assert written == [] and _cache_files(_fast_and_isolated) == []


def test_a_zip_without_its_end_is_not_cached_even_with_a_length(_fast_and_isolated: Path) -> None:
    """A server announcing (and sending) the length of a cut-off file: the archive shows it."""
    data = _checkpoint_bytes()
    with LoopbackServer({PATH: data[: len(data) // 2]}) as server:
        with pytest.raises(ConverterError, match="is incomplete .zip archive without its central directory"):
            fetch.fetch_url(server.url(PATH))
    assert _cache_files(_fast_and_isolated) == []


def test_safetensors_without_length_is_checked_by_its_header(_fast_and_isolated: Path) -> None:
    import safetensors.torch
    import torch

    data = safetensors.torch.save({"w": torch.zeros(20000)})
    with LoopbackServer({"/m.safetensors": data}) as server:
        server.add_faults("/m.safetensors", Fault(no_length=True, truncate=0.5), Fault(no_length=True))
        assert fetch.fetch_url(server.url("/m.safetensors")).read_bytes() == data
        assert len(server.hits_for("/m.safetensors")) == 2


# -- stalls and slow servers ------------------------------------------------------------------------------


def test_a_stall_is_retried_and_resumed(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "STALL_TIMEOUT", 0.2)
    server.add_faults(PATH, Fault(truncate=0.5, stall=1.0))
    assert fetch.fetch_url(server.url(PATH)).read_bytes() == DATA
    hits = sorted(server.hits_for(PATH), key=lambda h: h.status)  # the stalled one ends last
    assert [h.status for h in hits] == [200, 206] and hits[1].if_range is not None


def test_a_stall_is_reported_as_a_stall(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "STALL_TIMEOUT", 0.2)
    monkeypatch.setattr(fetch, "MAX_RETRIES", 1)
    server.set_always(PATH, Fault(truncate=0.5, stall=0.6, ignore_range=True))
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(server.url(PATH))
    msg = str(err.value)
    assert "stalled" in msg and "no data for 0.2 s" in msg and "truncated" not in msg, msg
    assert server.url(PATH) in msg and "\n" not in msg


def test_a_trickle_is_a_stall(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server sending a few bytes at a time never lets a read time out: a slow window is a stall."""
    monkeypatch.setattr(fetch, "STALL_TIMEOUT", 0.3)
    monkeypatch.setattr(fetch, "MAX_RETRIES", 1)
    monkeypatch.setattr(fetch, "NET_CHUNK_SIZE", 200_000)  # more than the 16 KiB pieces sent in 0.3 s
    server.set_always(PATH, Fault(pace=0.1, ignore_range=True))  # 160 KiB/s: a file takes 1.6 s
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(server.url(PATH))
    msg = str(err.value)
    assert "stalled (under 195 KiB in 0.3 s) on 2 tries" in msg, msg
    assert len(server.hits_for(PATH)) == 2


def test_a_slow_download_shows_progress_in_a_log(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fetch, "PROGRESS_EVERY", 0.05)
    server.add_faults(PATH, Fault(pace=0.03))
    with caplog.at_level(logging.INFO, logger="converter.fetch"):
        fetch.fetch_url(server.url(PATH))
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(line.startswith("downloading k400_32_8.pth: ") for line in lines)
    assert f"of {len(DATA) / 1e6:.1f} MB" in lines[-1]


def test_a_fast_download_says_nothing(
    server: LoopbackServer, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="converter.fetch"):
        fetch.fetch_url(server.url(PATH))
    assert capsys.readouterr().err == "" and caplog.records == []


def test_a_terminal_gets_a_progress_bar_unless_quiet(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import tqdm

    bars = []
    real = tqdm.tqdm
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(tqdm, "tqdm", lambda **kw: bars.append(kw) or real(**{**kw, "disable": True}))
    with caplog.at_level(logging.WARNING, logger="converter.fetch"):  # the CLI's -q
        fetch.fetch_url(server.url(PATH))
    assert bars == []
    with caplog.at_level(logging.INFO, logger="converter.fetch"):
        fetch.fetch_url(server.url(PATH), force=True)
    assert bars and bars[0]["total"] == len(DATA)


# -- --sha256 ---------------------------------------------------------------------------------------------


def test_parse_sha256() -> None:
    assert fetch.parse_sha256(None) is None
    assert fetch.parse_sha256(f" {SHA.upper()}\n") == SHA
    for bad in ("xyz", SHA[:-1], SHA + "0", "g" * 64, "", f"sha256:{SHA}"):
        with pytest.raises(ConverterError, match=r"--sha256 .*64 hexadecimal digits"):
            fetch.parse_sha256(bad)


def test_a_malformed_pin_is_refused_before_any_download(server: LoopbackServer) -> None:
    with pytest.raises(ConverterError, match="--sha256 'xyz'"):
        fetch.fetch_url(server.url(PATH), sha256="xyz")
    assert server.hits_for(PATH) == []


def test_a_pin_that_disagrees_with_the_cache_keeps_the_file(server: LoopbackServer) -> None:
    path = fetch.fetch_url(server.url(PATH))
    wrong = "ab" * 32
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(server.url(PATH), sha256=wrong)
    msg = str(err.value)
    assert wrong in msg and SHA in msg and "kept" in msg and "--force-download" in msg
    assert path.read_bytes() == DATA and fetch.recorded_sha256(path) == SHA
    assert server.full_gets(PATH) == 1  # and no second download


def test_a_pin_that_disagrees_with_a_cached_file_without_a_record_keeps_it(server: LoopbackServer) -> None:
    """Without a record nothing shows that the cached copy went bad, so a wrong pin is the user's to
    correct: the copy is kept, never deleted and fetched again (it may be a 1.7 GB download)."""
    path = fetch.fetch_url(server.url(PATH))
    path.with_name(path.name + ".sha256").unlink()
    wrong = "ab" * 32
    with pytest.raises(ConverterError, match="the file was kept"):
        fetch.fetch_url(server.url(PATH), sha256=wrong)
    assert path.read_bytes() == DATA and fetch.recorded_sha256(path) == SHA
    assert server.full_gets(PATH) == 1


def test_a_forced_download_that_fails_its_pin_keeps_the_good_copy(server: LoopbackServer) -> None:
    path = fetch.fetch_url(server.url(PATH))
    server.set_always(PATH, Fault(body=V2, content_type="application/octet-stream"))
    with pytest.raises(ConverterError, match="nothing was cached"):
        fetch.fetch_url(server.url(PATH), sha256=SHA, force=True)
    assert path.read_bytes() == DATA and fetch.recorded_sha256(path) == SHA
    assert not path.with_name(path.name + ".part").exists()


# -- the cache folder --------------------------------------------------------------------------------------


def test_a_cache_that_is_a_file_is_named(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("XCLIP_CACHE", str(blocker))
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(server.url(PATH))
    msg = str(err.value)
    assert f"{blocker} is a file, not a folder" in msg and "XCLIP_CACHE" in msg and "\n" not in msg
    assert blocker.read_text() == "x"


def test_a_folder_in_the_cached_files_place_is_named(server: LoopbackServer) -> None:
    final = fetch.url_cache_path(server.url(PATH), fetch.cache_dir())
    final.mkdir(parents=True)
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(server.url(PATH))
    assert f"({final}: is a directory)" in str(err.value)  # not its .part, called a file


def test_a_long_file_name_is_cached_under_a_short_one(server: LoopbackServer) -> None:
    name = "a" * 300 + ".pth"
    server.files["/" + name] = DATA
    path = fetch.fetch_url(server.url("/" + name))
    assert path.read_bytes() == DATA and path.name == name[-100:]


def test_a_file_url_to_a_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConverterError, match=r"is a folder: give the file inside it"):
        fetch.fetch_url(tmp_path.as_uri())


def test_an_unwritable_cache_is_named(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: this suite may run as root, whom permissions do not stop.
    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(server.url(PATH))
    msg = str(err.value)
    assert str(fetch.cache_dir()) in msg and "permission denied" in msg and "XCLIP_CACHE" in msg


def test_a_full_disk_leaves_nothing_and_says_so(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, _fast_and_isolated: Path
) -> None:
    import builtins
    import errno

    real_open = builtins.open

    class Full:
        def __init__(self, f: object) -> None:
            self.f = f

        def write(self, block: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> object:
            return getattr(self.f, name)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    def full_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if str(file).endswith(".part") and "w" in mode or "a" in mode else f

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(ConverterError) as err:
        fetch.fetch_url(server.url(PATH))
    monkeypatch.undo()
    assert "no space left on device" in str(err.value) and "XCLIP_CACHE" in str(err.value)
    assert not any(name.endswith((".pth", ".sha256")) for name in _cache_files(_fast_and_isolated))


# -- Google Drive (gdown) ---------------------------------------------------------------------------------


@pytest.fixture
def drive_online(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests never reach Google: name resolution answers as if online.
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 443))],
    )


def test_gdrive_uses_the_id_and_unique_paths(monkeypatch: pytest.MonkeyPatch, drive_online: None) -> None:
    import gdown

    calls: list[dict] = []
    checkpoint = _checkpoint_bytes()

    def fake_download(*args: object, **kwargs: object) -> str:
        assert not args
        calls.append(kwargs)
        Path(str(kwargs["output"])).write_bytes(checkpoint + str(kwargs["id"]).encode())
        return str(kwargs["output"])

    monkeypatch.setattr(gdown, "download", fake_download)
    a = fetch.fetch_source(registry.gdrive("1AbC-_x", "model.pth"))
    b = fetch.fetch_source(registry.gdrive("2XyZ", "model.pth"))  # same name: the old shared-path bug
    assert a != b and a.parent.name == "1AbC-_x" and a.parent.parent.name == "gdrive"
    assert a.read_bytes().endswith(b"1AbC-_x") and b.read_bytes().endswith(b"2XyZ")
    # gdown's own resume across runs is not validated, so each run starts afresh (it resumes within a run).
    assert all(k.get("url") is None and k["resume"] is False and k["retries"] > 0 for k in calls)
    assert all(str(k["output"]).endswith(".part") for k in calls)

    assert fetch.fetch_source(registry.gdrive("1AbC-_x", "model.pth")) == a  # cache hit: gdown not called
    assert len(calls) == 2
    with pytest.raises(ConverterError, match="expected sha256"):
        fetch.fetch_source(registry.gdrive("4Pin", "m.pth"), sha256="0" * 64)
    assert not (fetch.cache_dir() / "gdrive" / "4Pin" / "m.pth").exists()


def test_gdrive_html_answers_are_never_cached(
    monkeypatch: pytest.MonkeyPatch, drive_online: None, _fast_and_isolated: Path
) -> None:
    import gdown
    from gdown.exceptions import FileURLRetrievalError

    def page(**kwargs: object) -> str:
        Path(str(kwargs["output"])).write_bytes(QUOTA_PAGE)
        return str(kwargs["output"])

    monkeypatch.setattr(gdown, "download", page)
    with pytest.raises(ConverterError) as err:
        fetch.fetch_source(registry.gdrive("1Page", "m.pth"))
    assert "Google Drive quota" in str(err.value) and "1Page" in str(err.value)
    assert _cache_files(_fast_and_isolated) == []

    def refused(**kwargs: object) -> str:
        raise FileURLRetrievalError("Failed to retrieve file url:\n\n\tToo many users have viewed it.\n")

    monkeypatch.setattr(gdown, "download", refused)
    with pytest.raises(ConverterError) as err:
        fetch.fetch_source(registry.gdrive("2Quota", "m.pth"))
    assert (
        "Google Drive quota" in str(err.value) and "2Quota" in str(err.value) and "\n" not in str(err.value)
    )


def test_gdrive_legacy_pickle_needs_a_pin(
    monkeypatch: pytest.MonkeyPatch, drive_online: None, _fast_and_isolated: Path
) -> None:
    """gdown does not say whether Drive sent a length, so a legacy pickle from Drive, which nothing shows
    complete, is cached only under a --sha256 pin."""
    import gdown

    def pickle(**kwargs: object) -> str:
        Path(str(kwargs["output"])).write_bytes(DATA)
        return str(kwargs["output"])

    monkeypatch.setattr(gdown, "download", pickle)
    source = registry.gdrive("1Pickle", "m.pth")
    with pytest.raises(ConverterError, match="cannot be proven complete.*--sha256"):
        fetch.fetch_source(source)
    assert _cache_files(_fast_and_isolated) == []
    assert fetch.fetch_source(source, sha256=SHA).read_bytes() == DATA


def test_gdrive_cut_off_file_is_not_cached(
    monkeypatch: pytest.MonkeyPatch, drive_online: None, _fast_and_isolated: Path
) -> None:
    import gdown

    def half(**kwargs: object) -> str:
        data = _checkpoint_bytes()
        Path(str(kwargs["output"])).write_bytes(data[: len(data) // 2])
        return str(kwargs["output"])

    monkeypatch.setattr(gdown, "download", half)
    with pytest.raises(ConverterError, match="incomplete"):
        fetch.fetch_source(registry.gdrive("1Half", "m.pth"))
    assert _cache_files(_fast_and_isolated) == []


@pytest.mark.parametrize("announced", [None, len(DATA)], ids=["endless", "announced"])
def test_gdrive_body_larger_than_any_checkpoint_is_refused(
    monkeypatch: pytest.MonkeyPatch, drive_online: None, _fast_and_isolated: Path, announced: int | None
) -> None:
    """gdown has no size limit of its own: its progress callback stops a Drive answer without end."""
    import gdown

    monkeypatch.setattr(fetch, "MAX_DOWNLOAD_BYTES", len(DATA) - 1)
    sent = []

    def endless(**kwargs: object) -> str:  # as gdown does: a chunk written, then progress(done, total)
        progress = kwargs["progress"]
        assert callable(progress)
        with open(str(kwargs["output"]), "wb") as f:
            while sum(sent) < 10 * len(DATA):  # "endless": ten times what the limit allows
                f.write(DATA[:4096])
                sent.append(4096)
                progress(sum(sent), announced)
        return str(kwargs["output"])

    monkeypatch.setattr(gdown, "download", endless)
    with pytest.raises(ConverterError, match="Google Drive file id 1Big is larger than the 0 GiB"):
        fetch.fetch_source(registry.gdrive("1Big", "m.pth"))
    assert sum(sent) <= len(DATA) + 4096 and _cache_files(_fast_and_isolated) == []


def test_gdrive_offline_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import gdown

    def no_dns(*args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(gdown, "download", lambda **kw: pytest.fail("gdown retries for minutes offline"))
    with pytest.raises(ConverterError) as err:
        fetch.fetch_source(registry.gdrive("1Off", "m.pth"))
    msg = str(err.value)
    assert "1Off" in msg and "offline" in msg and "--checkpoint PATH" in msg and "\n" not in msg


def test_gdrive_errors_become_one_line_converter_errors(
    monkeypatch: pytest.MonkeyPatch, drive_online: None
) -> None:
    import gdown
    from gdown.exceptions import DownloadError

    def stalled(**kwargs: object) -> str:
        raise DownloadError("Download failed after 5 retries: HTTPSConnectionPool: Read timed out.")

    monkeypatch.setattr(gdown, "download", stalled)
    with pytest.raises(ConverterError) as err:
        fetch.fetch_source(registry.gdrive("1Slow", "m.pth"))
    assert "stalled" in str(err.value) and "1Slow" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConverterError, match="invalid Google Drive file id"):
        registry.gdrive("../etc", "m.pth")


def test_cache_dir_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XCLIP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.cache_dir() == tmp_path / "home" / ".cache" / "xclip-converter"
    monkeypatch.setenv("XCLIP_CACHE", str(tmp_path / "elsewhere"))
    assert fetch.cache_dir() == tmp_path / "elsewhere"


def test_cache_folder_for_other_users_of_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert fetch.cache_folder("processor") == fetch.cache_dir() / "processor"
    assert (fetch.cache_dir() / "processor").is_dir()
    (tmp_path / "blocker").write_text("x")
    monkeypatch.setenv("XCLIP_CACHE", str(tmp_path / "blocker"))
    with pytest.raises(ConverterError, match="blocker is a file, not a folder.*XCLIP_CACHE"):
        fetch.cache_folder("processor")


def test_an_unwritable_cache_folder_for_other_users_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing folder the user may not write is named here, not met later as another module's failed
    write. Simulated: this suite may run as root, whom permissions do not stop."""
    folder = fetch.cache_folder("processor")
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != folder)
    with pytest.raises(ConverterError) as err:
        fetch.cache_folder("processor")
    assert f"({folder}: permission denied)" in str(err.value) and "XCLIP_CACHE" in str(err.value)
