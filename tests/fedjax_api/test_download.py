"""Downloads and the dataset catalog, against a real HTTP server on 127.0.0.1."""

import hashlib
import http.server
import lzma
import random
import re
import socket
import sys
import threading
import types
from pathlib import Path

import pytest

from fedjax_api.datasets import catalog
from fedjax_api.datasets import download as dl
from fedjax_api.datasets.catalog import CatalogEntry, RemoteFile
from fedjax_api.datasets.download import DownloadError, cache_dir, download
from fedjax_api.errors import ConfigError

DATA = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


class Knobs:
    """What the test server serves, how it misbehaves, and what it saw."""

    def __init__(self):
        self.files = {"/data.bin": DATA}
        self.cut_after = None      # send this many body bytes, then drop the connection (once)
        self.stall_after = None    # send this many body bytes, then go quiet (once)
        self.ignore_range = False  # answer every request with 200 and the whole file
        self.status = None         # answer every request with this error status
        self.wrong_bytes = False   # flip one byte of the body
        self.no_length = False     # no Content-Length: the body ends when the connection closes
        self.requests = []         # (path, Range header or None) per request
        self.release = threading.Event()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        k = self.server.knobs
        rng = self.headers.get("Range")
        k.requests.append((self.path, rng))
        if k.status is not None:
            self.send_error(k.status)
            return
        body = k.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        if k.wrong_bytes:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        start = 0
        if rng and not k.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        if not k.no_length:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if k.cut_after is not None:
            n, k.cut_after = k.cut_after, None
            self.wfile.write(payload[:n])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        elif k.stall_after is not None:
            n, k.stall_after = k.stall_after, None
            self.wfile.write(payload[:n])
            self.wfile.flush()
            k.release.wait(10)
        else:
            self.wfile.write(payload)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hangs up mid-body is part of the tests


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No proxies, no backoff sleeps, and a private cache for every test."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "*")
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)
    monkeypatch.setenv("FEDJAX_DATA", str(tmp_path / "cache"))


@pytest.fixture
def server():
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.knobs = Knobs()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    httpd.knobs.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield httpd.knobs
    finally:
        httpd.knobs.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert isinstance(excinfo.value, ConfigError)
    return message


def test_success_verifies_and_reports_progress(server, tmp_path):
    dest = tmp_path / "out" / "data.bin"
    calls = []
    got = download(f"{server.url}/data.bin", dest, sha256=SHA.upper(), size=len(DATA),
                   progress=lambda done, total: calls.append((done, total)))
    assert got == dest
    assert dest.read_bytes() == DATA
    assert not dl.partial_path(dest).exists()
    assert calls[0] == (0, len(DATA)) and calls[-1] == (len(DATA), len(DATA))
    assert all(total == len(DATA) for _, total in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert server.requests == [("/data.bin", None)]


def test_cut_connection_keeps_partial_and_next_call_resumes(server, tmp_path):
    dest = tmp_path / "data.bin"
    server.cut_after = 100_000
    with pytest.raises(DownloadError) as excinfo:
        download(f"{server.url}/data.bin", dest, sha256=SHA, size=len(DATA), retries=0)
    message = one_line_error(excinfo)
    assert "re-run the same command to resume" in message
    assert dl.partial_path(dest).read_bytes() == DATA[:100_000]
    assert not dest.exists()

    calls = []
    download(f"{server.url}/data.bin", dest, sha256=SHA, size=len(DATA),
             progress=lambda done, total: calls.append((done, total)))
    assert dest.read_bytes() == DATA
    assert not dl.partial_path(dest).exists()
    assert server.requests == [("/data.bin", None), ("/data.bin", "bytes=100000-")]
    assert calls[0] == (100_000, len(DATA)) and calls[-1] == (len(DATA), len(DATA))


def test_retries_resume_within_one_call(server, tmp_path):
    dest = tmp_path / "data.bin"
    server.cut_after = 12_345
    download(f"{server.url}/data.bin", dest, sha256=SHA, size=None, retries=1)
    assert dest.read_bytes() == DATA
    assert server.requests == [("/data.bin", None), ("/data.bin", "bytes=12345-")]


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    dest = tmp_path / "data.bin"
    dl.partial_path(dest).write_bytes(b"\0" * 1000)  # not even a prefix of the file
    server.ignore_range = True
    download(f"{server.url}/data.bin", dest, sha256=SHA, size=len(DATA))
    assert dest.read_bytes() == DATA
    assert server.requests == [("/data.bin", "bytes=1000-")]


def test_416_with_a_complete_partial_file_finishes_it(server, tmp_path):
    dest = tmp_path / "data.bin"
    dl.partial_path(dest).write_bytes(DATA)
    download(f"{server.url}/data.bin", dest, sha256=SHA, size=None)
    assert dest.read_bytes() == DATA
    assert server.requests == [("/data.bin", f"bytes={len(DATA)}-")]


def test_416_with_an_overlong_partial_file_restarts(server, tmp_path):
    dest = tmp_path / "data.bin"
    dl.partial_path(dest).write_bytes(DATA + b"junk")
    download(f"{server.url}/data.bin", dest, sha256=SHA, size=None)
    assert dest.read_bytes() == DATA
    assert server.requests == [("/data.bin", f"bytes={len(DATA) + 4}-"), ("/data.bin", None)]


def test_complete_partial_of_known_size_needs_no_request(server, tmp_path):
    dest = tmp_path / "data.bin"
    dl.partial_path(dest).write_bytes(DATA)
    download(f"{server.url}/data.bin", dest, sha256=SHA, size=len(DATA))
    assert dest.read_bytes() == DATA
    assert server.requests == []


def test_checksum_mismatch_deletes_partial(server, tmp_path):
    dest = tmp_path / "data.bin"
    server.wrong_bytes = True
    with pytest.raises(DownloadError) as excinfo:
        download(f"{server.url}/data.bin", dest, sha256=SHA, size=len(DATA))
    message = one_line_error(excinfo)
    assert message.startswith("checksum mismatch for data.bin")
    assert SHA in message
    assert not dl.partial_path(dest).exists()
    assert not dest.exists()


def test_size_reported_by_server_differs_from_catalog(server, tmp_path):
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError) as excinfo:
        download(f"{server.url}/data.bin", dest, sha256=None, size=len(DATA) + 1)
    assert f"is {len(DATA)} bytes but {len(DATA) + 1} were expected" in one_line_error(excinfo)
    assert not dl.partial_path(dest).exists() and not dest.exists()


@pytest.mark.parametrize("status, reason", [(500, "Internal Server Error"), (404, "Not Found")])
def test_http_error_status_is_one_line(server, tmp_path, status, reason):
    dest = tmp_path / "data.bin"
    server.status = status
    with pytest.raises(DownloadError) as excinfo:
        download(f"{server.url}/data.bin", dest, sha256=SHA, size=len(DATA), retries=1)
    assert f"HTTP {status} {reason}" in one_line_error(excinfo)
    # 5xx is retried once; 404 is not.
    assert len(server.requests) == (2 if status == 500 else 1)
    assert not dl.partial_path(dest).exists() and not dest.exists()


def test_unknown_size(server, tmp_path):
    dest = tmp_path / "data.bin"
    server.no_length = True
    calls = []
    download(f"{server.url}/data.bin", dest, sha256=None, size=None,
             progress=lambda done, total: calls.append((done, total)))
    assert dest.read_bytes() == DATA
    assert calls[-1] == (len(DATA), None)
    assert all(total is None for _, total in calls)


def test_stalled_server_times_out_and_keeps_partial(server, tmp_path):
    dest = tmp_path / "data.bin"
    server.stall_after = 5_000
    with pytest.raises(DownloadError) as excinfo:
        download(f"{server.url}/data.bin", dest, sha256=SHA, size=len(DATA), timeout=0.3,
                 retries=0)
    message = one_line_error(excinfo)
    assert "timed out" in message and "resume" in message
    assert dl.partial_path(dest).read_bytes() == DATA[:5_000]


def test_connection_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError) as excinfo:
        download(f"http://127.0.0.1:{port}/data.bin", dest, sha256=None, size=None, retries=0,
                 timeout=2)
    assert "re-run the same command to try again" in one_line_error(excinfo)
    assert not dl.partial_path(dest).exists()


def test_only_http_urls(tmp_path):
    with pytest.raises(DownloadError, match="only http"):
        download("ftp://example.org/x", tmp_path / "x", sha256=None, size=None)


def test_a_partial_file_in_use_is_refused(server, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    dest = tmp_path / "data.bin"
    with open(dl.partial_path(dest), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match="another process is downloading"):
            download(f"{server.url}/data.bin", dest, sha256=None, size=None)
    assert server.requests == []


def test_cache_dir_honours_fedjax_data(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAX_DATA", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("FEDJAX_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "fedjax"


def test_fetch_a_catalog_entry(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAX_DATA", str(tmp_path / "data"))
    test_bytes = DATA[:777]
    server.files["/d/fake_test.sqlite"] = test_bytes
    server.files["/d/fake_train.sqlite"] = DATA
    entry = CatalogEntry(
        name="fake", description="a fake entry", splits=("train", "test"),
        files={"train": RemoteFile(url=f"{server.url}/d/fake_train.sqlite", sha256=SHA,
                                   size=len(DATA)),
               "test": RemoteFile(url=f"{server.url}/d/fake_test.sqlite")})
    monkeypatch.setitem(catalog.CATALOG, "fake", entry)

    assert not catalog.is_cached("fake") and catalog.cached_size("fake") == 0
    train = catalog.fetch("fake", split="train")
    assert train == tmp_path / "data" / "fake" / "fake_train.sqlite"
    assert train.read_bytes() == DATA
    assert catalog.is_cached("fake", "train") and not catalog.is_cached("fake")

    seen = []
    paths = catalog.fetch("fake", progress=lambda label, done, total: seen.append(label))
    assert paths == {"train": train, "test": train.with_name("fake_test.sqlite")}
    assert paths["test"].read_bytes() == test_bytes
    assert set(seen) == {"fake_test.sqlite"}  # train was cached already
    assert catalog.is_cached("fake")
    assert catalog.cached_size("fake") == len(DATA) + len(test_bytes)
    assert len(server.requests) == 2
    catalog.fetch("fake")
    assert len(server.requests) == 2  # all cached: no request

    with pytest.raises(ConfigError, match="has no split 'validation'"):
        catalog.fetch("fake", split="validation")
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        catalog.fetch("nope")


def test_lzma_postprocess_decompresses_and_converts(server, tmp_path, monkeypatch):
    raw = b"pretend this is TFF's sqlite file\n" * 3000
    server.files["/tff/fake.sqlite.lzma"] = lzma.compress(raw, format=lzma.FORMAT_ALONE)
    calls = []

    def tff_to_sqlite(tff_path, split, out_path):
        calls.append((Path(tff_path), split))
        Path(out_path).write_bytes(split.encode() + b":" + Path(tff_path).read_bytes()[:10])

    fake = types.ModuleType("fedjax_core.data.convert")
    fake.tff_to_sqlite = tff_to_sqlite
    monkeypatch.setitem(sys.modules, "fedjax_core.data.convert", fake)
    entry = CatalogEntry(
        name="fake-tff", description="TFF file converted locally", splits=("train", "test"),
        files={"tff": RemoteFile(url=f"{server.url}/tff/fake.sqlite.lzma")},
        postprocess="tff_lzma_to_sqlite", output_name="federated_fake_{split}.sqlite")
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)

    labels = set()
    paths = catalog.fetch("fake-tff", progress=lambda label, done, total: labels.add(label))
    folder = tmp_path / "cache" / "fake-tff"
    assert paths == {"train": folder / "federated_fake_train.sqlite",
                     "test": folder / "federated_fake_test.sqlite"}
    assert (folder / "fake.sqlite").read_bytes() == raw
    assert calls == [(folder / "fake.sqlite", "train"), (folder / "fake.sqlite", "test")]
    assert paths["test"].read_bytes() == b"test:" + raw[:10]
    assert labels == {"fake.sqlite.lzma", "unpacking fake.sqlite.lzma"}
    assert len(server.requests) == 1
    assert not list(folder.glob("*.partial"))
    assert catalog.is_cached("fake-tff")
    assert catalog.fetch("fake-tff", split="test") == paths["test"]
    assert len(calls) == 2


def test_corrupt_lzma_is_deleted(server, tmp_path, monkeypatch):
    server.files["/tff/bad.sqlite.lzma"] = b"this is not lzma data" * 10
    entry = CatalogEntry(
        name="bad-tff", description="corrupt", splits=("train",),
        files={"tff": RemoteFile(url=f"{server.url}/tff/bad.sqlite.lzma")},
        postprocess="tff_lzma_to_sqlite", output_name="bad_{split}.sqlite")
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    with pytest.raises(DownloadError) as excinfo:
        catalog.fetch("bad-tff", split="train")
    assert "bad.sqlite.lzma is corrupt" in one_line_error(excinfo)
    assert not any((tmp_path / "cache" / "bad-tff").iterdir())


def test_published_catalog():
    assert catalog.names() == ["cifar100", "emnist", "emnist-digits", "shakespeare",
                               "stackoverflow"]
    for name in catalog.names():
        entry = catalog.get(name)
        urls = [f.url for f in entry.files.values()]
        assert all(u.startswith("https://storage.googleapis.com/") for u in urls)
        assert len({f.filename for f in entry.files.values()}) == len(entry.files)
        assert entry.postprocess is None or entry.postprocess in catalog.POSTPROCESSORS
    assert catalog.get("stackoverflow").outputs == ("train", "held_out", "test", "word_count")
    cifar = catalog.get("cifar100")
    assert cifar.outputs == ("train", "test")
    assert cifar.download_size == 153019920
    assert len(cifar.files["tff"].sha256) == 64


def test_missing_converter_is_a_one_line_error(server, monkeypatch):
    server.files["/tff/x.sqlite.lzma"] = lzma.compress(b"x" * 100)
    entry = CatalogEntry(
        name="x-tff", description="needs a converter", splits=("train",),
        files={"tff": RemoteFile(url=f"{server.url}/tff/x.sqlite.lzma")},
        postprocess="tff_lzma_to_sqlite", output_name="x_{split}.sqlite")
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    monkeypatch.setattr(catalog, "TFF_CONVERTER", ("no_such_module_for_tests", "convert"))
    with pytest.raises(ConfigError) as excinfo:
        catalog.fetch("x-tff", split="train")
    assert "needs no_such_module_for_tests.convert" in one_line_error(excinfo)
