"""Mistakes a user can make are messages that say what to do, never tracebacks; a corrupt download is replaced."""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from capsdist.config import load_config
from capsdist.data import shards, sources
from capsdist.core.errors import ConfigError
from fixtures import make_idx_source, make_norb_source, trust

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_an_out_of_range_seed_is_a_config_error(seed):
    with pytest.raises(ConfigError, match=rf"train.seed: {seed} must be"):
        load_config(QUICKSTART, [f"train.seed={seed}"])


def _prepare_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "prepare_data.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.e2e
def test_a_negative_subset_is_a_usage_error(tmp_path):
    make_idx_source(tmp_path / "idx", 20, 10, gz=False)
    result = _prepare_cli(
        "fashion-mnist", "--out", str(tmp_path / "out"), "--source", str(tmp_path / "idx"), "--subset", "train=-5"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--subset train=-5: sizes must be at least 1" in result.stderr


@pytest.mark.e2e
def test_out_pointing_at_a_file_is_a_data_error(tmp_path):
    make_idx_source(tmp_path / "idx", 20, 10, gz=False)
    (tmp_path / "out").write_text("not a folder")
    result = _prepare_cli("fashion-mnist", "--out", str(tmp_path / "out"), "--source", str(tmp_path / "idx"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'out'} is a file, not a directory" in result.stderr


@pytest.mark.parametrize("prepare", ["auto", "never"])
def test_an_unknown_dataset_names_the_known_ones(tmp_path, prepare):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["data.dataset=cifar", f"data.shards={tmp_path / 'absent'}", f"data.prepare={prepare}"])
    assert "data.dataset: unknown dataset 'cifar'; known: smallnorb, fashion-mnist, mnist" in str(err.value)
    assert "prepare_data.py cifar" not in str(err.value)
    assert not (tmp_path / "absent").exists()


def test_a_corrupt_file_in_the_download_cache_is_downloaded_again(tmp_path, monkeypatch):
    served = tmp_path / "served"
    make_norb_source(served, 6, 5, gz=True)
    trust(monkeypatch, "smallnorb", served)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(sources, "NORB_URL", f"http://127.0.0.1:{server.server_port}/")
    cache = tmp_path / "cache"
    cache.mkdir()
    name = sources.NORB_TRAIN + "cat.mat.gz"
    good = (served / name).read_bytes()
    (cache / name).write_bytes(good[: len(good) // 2])  # a download cut short, renamed by an older version
    try:
        manifest = shards.prepare("smallnorb", tmp_path / "out", cache=cache, log=lambda _: None)
    finally:
        server.shutdown()
    assert manifest.splits["train"].num_samples == 6
    assert (cache / name).read_bytes() == good
