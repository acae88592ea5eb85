"""The download layer against real HTTP servers on 127.0.0.1 (no internet needed)."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from converter import fetch
from converter.errors import ConverterError
from tests._http import Fault, LoopbackServer

REPO = Path(__file__).resolve().parents[1]
DATA = random.Random(0).randbytes(256 * 1024 + 13)  # odd size: halves are not chunk-aligned
SHA = hashlib.sha256(DATA).hexdigest()
PATH = "/v1.0/k400_32_8.pth"


@pytest.fixture(autouse=True)
def _fast_and_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    # Short timeouts and backoff keep every failure path well under a second.
    monkeypatch.setattr(fetch, "CONNECT_TIMEOUT", 2.0)
    monkeypatch.setattr(fetch, "READ_TIMEOUT", 2.0)
    monkeypatch.setattr(fetch, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(fetch, "BACKOFF_MAX", 0.05)
    monkeypatch.setattr(fetch, "UNREACHABLE_DELAY", 0.01)
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
    assert (path.parent / (path.name + ".sha256")).read_text() == SHA + "\n"
    assert not (path.parent / (path.name + ".part")).exists()


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


def test_4xx_after_a_drop_removes_the_partial_file(server: LoopbackServer, _fast_and_isolated: Path) -> None:
    server.add_faults(PATH, Fault(truncate=0.5), Fault(status=403))
    with pytest.raises(ConverterError, match="403"):
        fetch.fetch_url(server.url(PATH))
    assert _cache_files(_fast_and_isolated) == []


def test_complete_partial_file_is_finished_without_a_body(server: LoopbackServer) -> None:
    # A crash between the last byte and the rename leaves a complete ".part": the resume gets 416.
    path = fetch.fetch_url(server.url(PATH))
    path.replace(path.parent / (path.name + ".part"))
    (path.parent / (path.name + ".sha256")).unlink()
    assert fetch.fetch_url(server.url(PATH), sha256=SHA).read_bytes() == DATA
    assert [h.status for h in server.hits_for(PATH)] == [200, 416]


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


def test_read_timeout_is_retried(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "READ_TIMEOUT", 0.3)
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


# -- integrity --------------------------------------------------------------------------------------------


def test_sha256_pin_mismatch_deletes_the_download(server: LoopbackServer, _fast_and_isolated: Path) -> None:
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


def test_cache_hit_with_wrong_record_redownloads(server: LoopbackServer) -> None:
    path = fetch.fetch_url(server.url(PATH))
    path.write_bytes(b"corrupt")
    (path.parent / (path.name + ".sha256")).write_text(hashlib.sha256(b"corrupt").hexdigest() + "\n")
    assert fetch.fetch_url(server.url(PATH), sha256=SHA).read_bytes() == DATA
    assert server.full_gets(PATH) == 2


def test_missing_record_is_recomputed(server: LoopbackServer) -> None:
    path = fetch.fetch_url(server.url(PATH))
    record = path.parent / (path.name + ".sha256")
    record.unlink()
    server.stop()
    assert fetch.fetch_url(server.url(PATH), sha256=SHA) == path
    assert record.read_text() == SHA + "\n"


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
    other = b"another model"
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


# -- offline ----------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_bad_urls_fail_at_once() -> None:
    with pytest.raises(ConverterError, match="ftp://"):
        fetch.fetch_url("ftp://example.org/x.pth")
    t0 = time.monotonic()
    with pytest.raises(ConverterError, match="http:///x.pth"):
        fetch.fetch_url("http:///x.pth")  # no host: not a network failure, so no retries
    assert time.monotonic() - t0 < 2.0


# -- Google Drive -----------------------------------------------------------------------------------------


def test_gdrive_uses_id_resume_and_unique_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import gdown

    calls: list[dict] = []

    def fake_download(*args: object, **kwargs: object) -> str:
        assert not args
        calls.append(kwargs)
        Path(str(kwargs["output"])).write_bytes(f"weights of {kwargs['id']}".encode())
        return str(kwargs["output"])

    monkeypatch.setattr(gdown, "download", fake_download)
    a = fetch.fetch_gdrive("1AbC-_x", filename="model.pth")
    b = fetch.fetch_gdrive("2XyZ", filename="model.pth")  # same name: the old shared-path bug
    c = fetch.fetch_gdrive("3Def")
    assert len({a, b, c}) == 3
    assert a.read_bytes() == b"weights of 1AbC-_x" and b.read_bytes() == b"weights of 2XyZ"
    assert c.name == "3Def.pth" and c.parent.name == "3Def" and c.parent.parent.name == "gdrive"
    assert all(k.get("url") is None and k["resume"] is True for k in calls)
    assert [k["id"] for k in calls] == ["1AbC-_x", "2XyZ", "3Def"]
    assert all(str(k["output"]).endswith(".part") for k in calls)

    assert fetch.fetch_gdrive("1AbC-_x", filename="model.pth") == a  # cache hit: gdown not called
    assert len(calls) == 3
    with pytest.raises(ConverterError, match="expected sha256"):
        fetch.fetch_gdrive("4Pin", sha256="0" * 64)
    assert not (fetch.cache_dir() / "gdrive" / "4Pin" / "4Pin.pth").exists()


def test_gdrive_errors_become_one_line_converter_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import gdown
    from gdown.exceptions import FileURLRetrievalError

    def offline(**kwargs: object) -> str:
        raise requests.exceptions.ConnectionError("Max retries exceeded with url: /uc?id=1Off")

    monkeypatch.setattr(gdown, "download", offline)
    with pytest.raises(ConverterError) as err:
        fetch.fetch_gdrive("1Off")
    msg = str(err.value)
    assert "1Off" in msg and "offline" in msg and "--checkpoint PATH" in msg and "XCLIP_CACHE" in msg
    assert "\n" not in msg

    def refused(**kwargs: object) -> str:
        raise FileURLRetrievalError("Failed to retrieve file url:\n\n\tToo many users have viewed it.\n")

    monkeypatch.setattr(gdown, "download", refused)
    with pytest.raises(ConverterError) as err:
        fetch.fetch_gdrive("2Quota")
    assert "2Quota" in str(err.value) and "\n" not in str(err.value)

    with pytest.raises(ConverterError, match="invalid Google Drive file id"):
        fetch.fetch_gdrive("../etc")


# -- environment ------------------------------------------------------------------------------------------


def test_env_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XCLIP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.cache_dir() == tmp_path / "home" / ".cache" / "xclip-converter"
    monkeypatch.setenv("XCLIP_CACHE", str(tmp_path / "elsewhere"))
    assert fetch.cache_dir() == tmp_path / "elsewhere"

    assert fetch.release_base_url() == fetch.RELEASE_BASE_URL
    assert fetch.release_url("k400_32_8.pth") == fetch.RELEASE_BASE_URL + "/k400_32_8.pth"
    with LoopbackServer({PATH: DATA}) as mirror:
        monkeypatch.setenv("XCLIP_RELEASE_URL", mirror.base_url + "/v1.0/")
        assert fetch.release_url("k400_32_8.pth") == mirror.url(PATH)
        path = fetch.fetch_url(fetch.release_url("k400_32_8.pth"))
    assert path.is_relative_to(tmp_path / "elsewhere") and path.read_bytes() == DATA
