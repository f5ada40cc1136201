"""prepare_data: exact round trip of smallNORB and IDX files into shards, atomicity, verification, errors."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import capsdist
from capsdist.data import shards, sources
from capsdist.data.manifest import load_manifest
from capsdist.core.errors import DataError
from fixtures import make_idx_source, make_norb_source, norb_bytes, trust, write

ROOT = Path(__file__).resolve().parents[1]


def read_shards(out: Path, manifest, split: str) -> dict[int, dict[str, bytes]]:
    """Every sample of a split, read with the standard library: index -> {extension: bytes}."""
    samples: dict[int, dict[str, bytes]] = {}
    for shard in manifest.splits[split].shards:
        with tarfile.open(out / shard.name) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(int(key), {})[ext] = tar.extractfile(member).read()
    return samples


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("gz", [False, True])
def test_smallnorb_round_trip(tmp_path, monkeypatch, gz):
    raw = make_norb_source(tmp_path / "raw", 23, 11, gz)
    trust(monkeypatch, "smallnorb", tmp_path / "raw")
    out = tmp_path / "out"
    manifest = shards.prepare("smallnorb", out, source=tmp_path / "raw", shard_size=5, log=lambda _: None)
    assert manifest.dataset == "smallnorb" and manifest.views == ("left", "right")
    assert manifest.classes == ("animal", "human", "airplane", "truck", "car")
    assert manifest.image_shape == (2, 96, 96) and manifest.capsdist_version == capsdist.__version__
    assert manifest.metadata == ("instance", "elevation", "azimuth", "lighting")
    for fname, sums in manifest.sources.items():
        path = next((tmp_path / "raw").glob(fname + "*"))
        assert sums["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for split, arrays in raw.items():
        info = manifest.splits[split]
        assert info.num_samples == len(arrays["cat"])
        assert [s.num_samples for s in info.shards] == [5] * (len(arrays["cat"]) // 5) + [len(arrays["cat"]) % 5]
        for shard in info.shards:
            assert hashlib.sha256((out / shard.name).read_bytes()).hexdigest() == shard.sha256
        samples = read_shards(out, manifest, split)
        assert sorted(samples) == list(range(info.num_samples))
        sources_seen = []
        for index, parts in samples.items():
            assert set(parts) == {"left.png", "right.png", "cls", "json"}
            meta = json.loads(parts["json"])
            src = meta["source_index"]
            sources_seen.append(src)
            assert meta["index"] == index
            np.testing.assert_array_equal(png_array(parts["left.png"]), arrays["images"][src, 0])
            np.testing.assert_array_equal(png_array(parts["right.png"]), arrays["images"][src, 1])
            assert int(parts["cls"]) == meta["label"] == arrays["cat"][src]
            assert manifest.classes[meta["label"]] == meta["class"]
            expected = dict(zip(manifest.metadata, arrays["info"][src].tolist()))
            assert {k: meta[k] for k in manifest.metadata} == expected
            assert info.columns["label"][index] == arrays["cat"][src]
            assert [info.columns[k][index] for k in manifest.metadata] == arrays["info"][src].tolist()
        assert sorted(sources_seen) == list(range(info.num_samples))


def test_idx_round_trip_subset_and_tar_listing(tmp_path, monkeypatch):
    raw = make_idx_source(tmp_path / "raw", 60, 30, gz=True)
    trust(monkeypatch, "fashion-mnist", tmp_path / "raw")
    out = tmp_path / "out"
    manifest = shards.prepare(
        "fashion-mnist",
        out,
        source=tmp_path / "raw",
        shard_size=7,
        subset={"train": 40, "test": 20},
        compress=True,
        log=lambda _: None,
    )
    assert manifest.image_shape == (1, 28, 28) and manifest.subset == {"train": 40, "test": 20}
    for split, n in (("train", 40), ("test", 20)):
        samples = read_shards(out, manifest, split)
        assert len(samples) == n
        labels = [int(p["cls"]) for p in samples.values()]
        assert np.bincount(labels).tolist() == [n // 10] * 10  # class-balanced
        for parts in samples.values():
            src = json.loads(parts["json"])["source_index"]
            np.testing.assert_array_equal(png_array(parts["png"]), raw[split]["images"][src])
            assert int(parts["cls"]) == raw[split]["labels"][src]
    if shutil.which("tar"):
        listing = subprocess.run(
            ["tar", "tf", out / manifest.splits["test"].shards[0].name], capture_output=True, text=True, check=True
        ).stdout.split()
        assert listing[:3] == ["00000000.cls", "00000000.json", "00000000.png"]


def test_checksum_mismatch_shape_and_missing_files(tmp_path, monkeypatch):
    make_norb_source(tmp_path / "raw", 10, 10, gz=False)
    with pytest.raises(DataError, match="checksum mismatch.*official"):  # fixture files are not the official ones
        shards.prepare("smallnorb", tmp_path / "out", source=tmp_path / "raw", log=lambda _: None)
    assert not (tmp_path / "out" / "manifest.json").exists()
    info = tmp_path / "raw" / (sources.NORB_TRAIN + "info.mat")
    write(info, norb_bytes(np.zeros((10, 3), dtype=np.int32)), gz=False)
    trust(monkeypatch, "smallnorb", tmp_path / "raw")
    with pytest.raises(DataError, match=r"info\.mat: shape \(10, 3\).*expected \(10, 4\)"):
        shards.prepare("smallnorb", tmp_path / "out", source=tmp_path / "raw", log=lambda _: None)
    info.unlink()
    with pytest.raises(DataError, match="training-info.mat.*not found"):
        shards.prepare("smallnorb", tmp_path / "out", source=tmp_path / "raw", log=lambda _: None)


def test_killed_prepare_leaves_no_usable_output_and_rerun_completes(tmp_path, monkeypatch):
    make_idx_source(tmp_path / "raw", 50, 20, gz=False)
    trust(monkeypatch, "mnist", tmp_path / "raw")
    calls = {"n": 0}
    real_png = shards.png

    def dying_png(image):
        calls["n"] += 1
        if calls["n"] == 23:
            raise KeyboardInterrupt  # as if killed in the middle of the third train shard
        return real_png(image)

    monkeypatch.setattr(shards, "png", dying_png)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        shards.prepare("mnist", out, source=tmp_path / "raw", shard_size=10, log=lambda _: None)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="launch/prepare_data.py"):
        load_manifest(out)
    monkeypatch.setattr(shards, "png", real_png)
    manifest = shards.prepare("mnist", out, source=tmp_path / "raw", shard_size=10, log=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [s.name for split in manifest.splits.values() for s in split.shards]
    )
    assert sum(len(read_shards(out, manifest, s)) for s in ("train", "test")) == 70


def test_second_prepare_verifies_and_does_nothing(tmp_path, monkeypatch):
    make_idx_source(tmp_path / "raw", 20, 10, gz=False)
    trust(monkeypatch, "mnist", tmp_path / "raw")
    out = tmp_path / "out"
    shards.prepare("mnist", out, source=tmp_path / "raw", shard_size=8, log=lambda _: None)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    messages = []
    shards.prepare("mnist", out, source=tmp_path / "raw", shard_size=8, log=messages.append)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert "nothing to do" in messages[0]
    with pytest.raises(DataError, match="already holds mnist"):
        shards.prepare("fashion-mnist", out, source=tmp_path / "raw", log=lambda _: None)
    with open(out / "train-000001.tar", "r+b") as f:
        f.seek(600)
        f.write(b"X")
    with pytest.raises(DataError, match="train-000001.tar does not match its sha256"):
        shards.prepare("mnist", out, source=tmp_path / "raw", log=lambda _: None)


def test_same_sources_give_identical_shards(tmp_path, monkeypatch):
    make_idx_source(tmp_path / "raw", 20, 10, gz=True)
    trust(monkeypatch, "mnist", tmp_path / "raw")
    a = shards.prepare("mnist", tmp_path / "a", source=tmp_path / "raw", compress=True, log=lambda _: None)
    b = shards.prepare("mnist", tmp_path / "b", source=tmp_path / "raw", compress=True, log=lambda _: None)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert a.splits["train"].shards[0].sha256 == b.splits["train"].shards[0].sha256


@pytest.mark.e2e
def test_cli_prints_error_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "prepare_data.py"),
            "mnist",
            "--source",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("capsdist: error: mnist: train-images-idx3-ubyte[.gz] not found")
    assert "Traceback" not in result.stderr


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = bytes(range(256)) * 400

    def do_GET(self):  # noqa: N802 (http.server's naming)
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if "Range" in self.headers else 0
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_resumes_a_partial_file(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = tmp_path / "file.gz"
        (tmp_path / "file.gz.part").write_bytes(_RangeHandler.payload[:30000])
        sources.download(f"http://127.0.0.1:{server.server_port}/file.gz", target)
        assert target.read_bytes() == _RangeHandler.payload
        assert not (tmp_path / "file.gz.part").exists()
    finally:
        server.shutdown()
    assert os.path.getsize(target) == len(_RangeHandler.payload)
