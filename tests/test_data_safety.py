"""Shards and manifests are data: names never reach a shell or leave the dataset directory, a malformed
manifest or member is a message, and changed bytes or labels are caught."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from capsdist.config import load_config
from capsdist.data.shards import png
from capsdist.data import DataOptions, eval_loader, load_manifest
from capsdist.core.errors import DataError
from capsdist.train.build import data_options, load_data
from fixtures import prepare_idx_shards

N_TRAIN, N_TEST = 40, 20


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tiny Fashion-MNIST-format dataset, 10 samples per shard (do not modify: copy it)."""
    return prepare_idx_shards(tmp_path_factory.mktemp("fm"), N_TRAIN, N_TEST, shard_size=10)


@pytest.fixture
def dataset(prepared, tmp_path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(prepared, copy)
    return copy


def _edit_manifest(dataset: Path, edit) -> None:
    raw = json.loads((dataset / "manifest.json").read_text())
    edit(raw)
    (dataset / "manifest.json").write_text(json.dumps(raw))


def _test_batches(location, **kw) -> list:
    manifest = load_manifest(location)
    opts = DataOptions(shards=str(location), num_workers=0, **kw)
    return list(eval_loader(manifest, opts, "test", rank=0, world_size=1, per_rank_batch=5))


@pytest.mark.parametrize(
    "name", ["x;touch {marker};.tar", "$(touch {marker}).tar", "../outside/test-000000.tar", "/etc/passwd"]
)
def test_shard_names_never_reach_a_shell_or_leave_the_directory(dataset, tmp_path, name):
    marker = tmp_path / "pwned"
    bad = name.format(marker=marker)
    _edit_manifest(dataset, lambda raw: raw["splits"]["test"]["shards"][0].update(name=bad))
    for location in (str(dataset), f"pipe:cat {dataset}/{{}}"):
        with pytest.raises(DataError, match=r"malformed manifest \(shard name .* is not of the form"):
            _test_batches(location)
    assert not marker.exists()


def test_a_symlinked_shard_is_refused(dataset, tmp_path):
    outside = tmp_path / "elsewhere.tar"
    shard = dataset / "test-000000.tar"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(DataError, match="test-000000.tar is a symbolic link"):
        _test_batches(dataset)


def test_a_pipe_location_is_never_a_directory(tmp_path, monkeypatch):
    """`pipe:cat /x/{}` has no `://`: it must still be read as a command, never prepared into as a folder."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "quickstart.yaml",
        [f"data.shards=pipe:cat {tmp_path}/absent/{{}}", "data.prepare=auto"],
    )
    rank0 = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    with pytest.raises(DataError, match="cannot read pipe:cat"):
        load_data(cfg, rank0, data_options(cfg))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda raw: raw.pop("classes"), "missing key 'classes'"),
        (lambda raw: raw["splits"]["test"].update(num_samples="many"), "test.num_samples is str, expected int"),
        (lambda raw: raw["splits"]["test"]["shards"][0].pop("sha256"), "missing key 'sha256'"),
        (lambda raw: raw["splits"]["test"]["columns"]["label"].pop(), "test.columns.label has 19 values for 20"),
        (lambda raw: raw.update(splits=[]), "splits is list, expected dict"),
        (lambda raw: raw["splits"]["test"]["shards"][0].update(first_index=None), "first_index is NoneType"),
    ],
)
def test_a_malformed_manifest_is_a_message(dataset, edit, words):
    _edit_manifest(dataset, edit)
    with pytest.raises(DataError, match=r"manifest.json: malformed manifest \(.*\); prepare the dataset again: "):
        load_manifest(dataset)
    with pytest.raises(DataError) as err:
        load_manifest(dataset)
    assert words in str(err.value)


def _rewrite(shard: Path, edit) -> None:
    """Rewrite a tar shard with `edit(name, data) -> data | None` (None drops the member)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            data = edit(m, data)
            if isinstance(data, tarfile.TarInfo):
                tar.addfile(data)
            else:
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))


def _rehash(dataset: Path, shard: str) -> None:
    digest = hashlib.sha256((dataset / shard).read_bytes()).hexdigest()

    def edit(raw):
        for info in raw["splits"]["test"]["shards"]:
            if info["name"] == shard:
                info["sha256"] = digest

    _edit_manifest(dataset, edit)


def test_changed_shard_bytes_are_caught(dataset):
    """A byte flipped in the padding after the tar's end marker: every member still reads, only the hash differs."""
    shard = dataset / "test-000001.tar"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="test-000001.tar does not match its sha256 in the manifest"):
        _test_batches(dataset)
    assert len(_test_batches(dataset, skip_corrupt=True)) == N_TEST // 5  # skip mode: a warning, the data is whole


def test_a_label_that_disagrees_with_the_manifest_is_caught(dataset):
    _rewrite(
        dataset / "test-000000.tar",
        lambda m, data: str((int(data) + 1) % 10).encode() if m.name == "00000003.cls" else data,
    )
    _rehash(dataset, "test-000000.tar")
    with pytest.raises(DataError, match=r"corrupt sample 00000003 of shard .*label \d, the manifest says \d"):
        _test_batches(dataset)


def _bomb_png() -> bytes:
    """A PNG whose header claims 40000 x 40000 pixels (PIL refuses to decode such a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)  # 8-bit grey
    idat = zlib.compress(bytes(40001))  # one row only: PIL refuses before it would read the rest
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("what", ["directory", "bomb", "wrong size"])
def test_odd_members_are_corrupt_samples(dataset, what):
    def edit(member, data):
        if member.name != "00000004.png":
            return data
        if what == "directory":
            directory = tarfile.TarInfo(member.name)
            directory.type = tarfile.DIRTYPE
            return directory
        return _bomb_png() if what == "bomb" else png(np.zeros((30, 28), dtype=np.uint8))

    _rewrite(dataset / "test-000000.tar", edit)
    _rehash(dataset, "test-000000.tar")
    with pytest.raises(DataError, match="corrupt sample 00000004 of shard"):
        _test_batches(dataset)
    batches = _test_batches(dataset, skip_corrupt=True)
    assert sum(b.skipped for b in batches) == 1
    assert sorted(i for b in batches for i in b.index.tolist() if i >= 0) == [i for i in range(N_TEST) if i != 4]
