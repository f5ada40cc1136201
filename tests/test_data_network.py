"""Shards over HTTP: a server that stalls is an error after data.read_timeout_s, a connection cut short is read
again (no sample twice), and a dead server is a network error, never "corrupt, prepare the dataset again"; a corrupt
shard at a URL says to prepare locally and upload."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import signal
import threading
from pathlib import Path

import pytest

from capsdist.data import DataOptions, eval_loader, load_manifest
from capsdist.core.errors import DataError
from fixtures import prepare_idx_shards
from train_helpers import free_port

N_TRAIN, N_TEST = 20, 20
TIMEOUT_S = 1.0  # data.read_timeout_s of these tests


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A tiny Fashion-MNIST-format dataset, 10 samples per shard: two test shards."""
    return prepare_idx_shards(tmp_path_factory.mktemp("fm"), N_TRAIN, N_TEST, shard_size=10)


class _Server(http.server.ThreadingHTTPServer):
    """Serves `root`; shard requests behave as `fault` says: "stall" sends half a shard and then nothing,
    "cut" sends half a shard and closes the connection (once per shard, then the whole shard). `requests` lists
    the paths asked for."""

    daemon_threads = True

    def __init__(self, root: Path, fault: str | None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.fault, self.requests, self.release = root, fault, [], threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self):  # noqa: N802 (http.server's naming)
        name = self.path.lstrip("/")
        data = (self.server.root / name).read_bytes()
        fault = self.server.fault if name.endswith(".tar") else None
        if fault == "cut" and self.server.requests.count(self.path):
            fault = None  # cut once per shard
        self.server.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data if fault is None else data[: len(data) // 2])
        self.wfile.flush()
        if fault == "stall":
            self.server.release.wait(60)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(root: Path, fault: str | None = None):
    server = _Server(root, fault)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail the test instead of hanging it when the block runs longer than `seconds`."""

    def expired(signum, frame):
        raise AssertionError(f"still reading after {seconds} s: a stalled read is not bounded")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _test_indices(location: str) -> list[int]:
    manifest = load_manifest(location, read_timeout_s=TIMEOUT_S)
    opts = DataOptions(shards=location, num_workers=0, read_timeout_s=TIMEOUT_S)
    batches = eval_loader(manifest, opts, "test", rank=0, world_size=1, per_rank_batch=5)
    return [i for batch in batches for i in batch.index.tolist()]


def test_a_stalled_server_is_a_network_error_after_the_read_timeout(shards):
    with serving(shards, "stall") as server, deadline(60), pytest.raises(DataError) as err:
        _test_indices(server.url)
    message = str(err.value)
    assert "test-000000.tar" in message and f"no data for {TIMEOUT_S:g} s" in message
    assert "network" in message and "prepare" not in message and "corrupt" not in message.replace("not corrupt", "")
    assert server.requests.count("/test-000000.tar") == 3  # a bounded retry


def test_a_connection_cut_short_is_read_again(shards):
    with serving(shards, "cut") as server, deadline(60):
        indices = _test_indices(server.url)
    assert indices == list(range(N_TEST))  # every sample once: the retry skips what was already read
    assert server.requests.count("/test-000000.tar") == 2


def test_a_dead_server_is_a_network_error_not_a_corrupt_shard(shards):
    with serving(shards) as server:
        manifest = load_manifest(server.url, read_timeout_s=TIMEOUT_S)
    opts = DataOptions(shards=server.url, num_workers=0, read_timeout_s=TIMEOUT_S)
    with deadline(60), pytest.raises(DataError) as err:
        list(eval_loader(manifest, opts, "test", rank=0, world_size=1, per_rank_batch=5))
    message = str(err.value)
    assert "test-000000.tar" in message and "refused" in message and "network" in message
    assert "prepare" not in message and "corrupt" not in message.replace("not corrupt", "")
    dead = f"http://127.0.0.1:{free_port()}"
    with deadline(60), pytest.raises(DataError) as err:
        load_manifest(dead, read_timeout_s=TIMEOUT_S)
    assert "manifest.json" in str(err.value) and "network" in str(err.value) and "prepare" not in str(err.value)


def test_a_corrupt_shard_at_a_url_says_how_to_replace_it(shards, tmp_path):
    """Corrupt bytes from a working server are corruption: prepare locally and upload (never prepare into a URL)."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    data = bytearray((copy / "test-000001.tar").read_bytes())
    data[-1] ^= 1  # in the padding after the end marker: only the sha256 differs
    (copy / "test-000001.tar").write_bytes(bytes(data))
    with serving(copy) as server, deadline(60), pytest.raises(DataError) as err:
        _test_indices(server.url)
    message = str(err.value)
    assert "test-000001.tar does not match its sha256" in message
    assert f"prepare_data.py fashion-mnist --out DIR, then put DIR's files where {server.url} reads them" in message
