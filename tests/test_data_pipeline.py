"""Streaming loaders: equal batches per rank, exact eval coverage, determinism, splits, corrupt data, resume."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from capsdist.data import shards
from capsdist.data import DataOptions, eval_loader, input_shape, load_manifest, steps_per_epoch, train_loader
from capsdist.data.plan import TRAIN_AZIMUTHS, TRAIN_ELEVATIONS
from capsdist.data.transforms import normalise, standardize
from capsdist.core.errors import ConfigError, DataError
from fixtures import make_norb_source, trust

N_TRAIN, N_TEST, SHARD = 90, 45, 13  # 7 train shards (odd, last one short), 4 test shards


@pytest.fixture(scope="module")
def norb(tmp_path_factory):
    """A prepared smallNORB-format fixture: (directory, raw arrays)."""
    root = tmp_path_factory.mktemp("norb")
    raw = make_norb_source(root / "raw", N_TRAIN, N_TEST, gz=True)
    with pytest.MonkeyPatch.context() as mp:
        trust(mp, "smallnorb", root / "raw")
        shards.prepare("smallnorb", root / "shards", source=root / "raw", shard_size=SHARD, log=lambda _: None)
    return root / "shards", raw


def opts(path, **kw) -> DataOptions:
    return DataOptions(shards=str(path), **{"num_workers": 2, "shuffle_buffer": 16, **kw})


def run_train(manifest, o, epoch, world, batch, **kw):
    """Per rank: list of batches of one epoch."""
    return [
        list(train_loader(manifest, o, epoch=epoch, rank=r, world_size=world, per_rank_batch=batch, **kw))
        for r in range(world)
    ]


def indices(batches) -> list[int]:
    return [i for b in batches for i in b.index.tolist()]


@pytest.mark.parametrize("world,workers,batch", [(2, 2, 3), (4, 2, 2)])  # 7 shards: odd; fewer than 4 x 2 streams
def test_ranks_and_workers_over_odd_shards(norb, world, workers, batch):
    path, _ = norb
    manifest = load_manifest(path)
    assert len(manifest.splits["train"].shards) % 2 == 1
    o = opts(path, val_fraction=0.1, num_workers=workers)
    selected = set(eval_indices(manifest, o, "val")) ^ set(range(N_TRAIN))  # training = train split minus val
    steps = steps_per_epoch(manifest, o, world * batch)
    assert steps == len(selected) // (world * batch)
    left_out = []
    for epoch in (0, 1):
        per_rank = run_train(manifest, o, epoch, world, batch)
        assert [len(r) for r in per_rank] == [steps] * world
        assert all(b.images.shape == (batch, 2, 32, 32) and b.labels.shape == (batch,) for r in per_rank for b in r)
        seen = [i for r in per_rank for i in indices(r)]
        assert len(seen) == len(set(seen)) and set(seen) <= selected
        missing = selected - set(seen)
        assert len(missing) < world * batch
        left_out.append(missing)
        for r in per_rank:  # labels travel with their samples
            for b in r:
                assert b.labels.tolist() == manifest.splits["train"].columns["label"][b.index.numpy()].tolist()
    assert left_out[0] != left_out[1]


def eval_indices(manifest, o, split, world=1, batch=4) -> list[int]:
    return [
        i
        for r in range(world)
        for i in indices(eval_loader(manifest, o, split, rank=r, world_size=world, per_rank_batch=batch))
        if i >= 0
    ]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 2), (4, 3)])
def test_eval_covers_split_exactly_once(norb, world, workers):
    path, _ = norb
    manifest = load_manifest(path)
    o = opts(path, num_workers=workers)
    batch = 4
    loaders = [eval_loader(manifest, o, "test", rank=r, world_size=world, per_rank_batch=batch) for r in range(world)]
    per_rank = [list(loader) for loader in loaders]
    assert len({len(r) for r in per_rank}) == 1 and len(per_rank[0]) == len(loaders[0])
    seen = [i for r in per_rank for i in indices(r)]
    real = [i for i in seen if i >= 0]
    assert sorted(real) == list(range(N_TEST))
    for r in per_rank:
        for b in r:
            pad = b.index < 0
            assert (b.labels[pad] == -1).all() and (b.images[pad] == 0).all()
            assert (b.labels[~pad] >= 0).all()


def test_same_seed_and_epoch_same_stream_new_epoch_different(norb):
    path, _ = norb
    manifest = load_manifest(path)
    o = opts(path)
    a, b = (run_train(manifest, o, 3, 2, 4)[1] for _ in range(2))
    assert indices(a) == indices(b)
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))
    assert indices(run_train(manifest, o, 4, 2, 4)[1]) != indices(a)
    assert indices(run_train(manifest, dataclasses.replace(o, seed=1), 3, 2, 4)[1]) != indices(a)


def test_resume_by_skipping_batches_equals_uninterrupted_stream(norb):
    path, _ = norb
    manifest = load_manifest(path)
    o = opts(path)
    full = run_train(manifest, o, 2, 2, 3)[0]
    for start in (3, 4):
        resumed = list(train_loader(manifest, o, epoch=2, rank=0, world_size=2, per_rank_batch=3, start_batch=start))
        assert len(resumed) == len(full) - start
        for x, y in zip(full[start:], resumed):
            assert torch.equal(x.index, y.index) and torch.equal(x.labels, y.labels)
            assert torch.equal(x.images, y.images)


def test_validation_strategies_select_exactly(norb, caplog):
    path, raw = norb
    manifest = load_manifest(path)
    columns = manifest.splits["train"].columns
    val = eval_indices(manifest, opts(path, val_fraction=0.2), "val")
    assert len(val) == round(0.2 * N_TRAIN)
    val_loio = eval_indices(manifest, opts(path, val_strategy="loio"), "val")
    source = [src_of(path, manifest, "train", i) for i in val_loio]
    assert sorted(val_loio) == np.flatnonzero(columns["instance"] == 4).tolist()
    assert all(raw["train"]["info"][s, 0] == 4 for s in source)
    train_loio = {i for r in run_train(manifest, opts(path, val_strategy="loio"), 0, 1, 2) for i in indices(r)}
    assert not train_loio & set(val_loio)
    with caplog.at_level(logging.WARNING):
        val_test = eval_indices(manifest, opts(path, val_strategy="test"), "val")
    assert sorted(val_test) == list(range(N_TEST)) and "TEST split" in caplog.text


def src_of(path, manifest, split, index) -> int:
    """Source index of a sample, read from the json member (independent of the manifest columns)."""
    for shard in manifest.splits[split].shards:
        if shard.first_index <= index < shard.first_index + shard.num_samples:
            with tarfile.open(path / shard.name) as tar:
                return json.loads(tar.extractfile(f"{index:08d}.json").read())["source_index"]
    raise KeyError(index)


@pytest.mark.parametrize(
    "viewpoint,column,allowed", [("azimuth", 2, TRAIN_AZIMUTHS), ("elevation", 1, TRAIN_ELEVATIONS)]
)
def test_viewpoint_splits(norb, viewpoint, column, allowed):
    path, raw = norb
    manifest = load_manifest(path)
    o = opts(path, viewpoint=viewpoint, val_strategy="test")
    trained = {i for r in run_train(manifest, o, 0, 1, 1) for i in indices(r)}
    expected_train = {
        i for i in range(N_TRAIN) if raw["train"]["info"][src_of(path, manifest, "train", i), column] in allowed
    }
    assert trained == expected_train and 0 < len(trained) < N_TRAIN
    tested = set(eval_indices(manifest, o, "test"))
    expected_test = {
        i for i in range(N_TEST) if raw["test"]["info"][src_of(path, manifest, "test", i), column] not in allowed
    }
    assert tested == expected_test and 0 < len(tested) < N_TEST
    familiar = set(eval_indices(manifest, o, "test_familiar"))  # test images at the training viewpoints
    assert familiar == set(range(N_TEST)) - expected_test and familiar


def test_the_familiar_test_subset_needs_a_viewpoint_split(norb):
    path, _ = norb
    with pytest.raises(ConfigError, match="test_familiar .* needs a viewpoint split: set data.viewpoint"):
        eval_indices(load_manifest(path), opts(path), "test_familiar")


def test_viewpoint_constants_are_the_papers():
    assert {a * 10 for a in TRAIN_AZIMUTHS} == {300, 320, 340, 0, 20, 40}  # azimuth index * 10 degrees
    assert TRAIN_ELEVATIONS == {0, 1, 2}  # the 3 lowest of elevation indices 0..8


@pytest.mark.parametrize("channels", ["both", "left"])
def test_pixels_only_gives_pixels_that_normalise_into_the_model_input(norb, channels):
    path, raw = norb
    manifest = load_manifest(path)
    o = opts(path, channels=channels)
    images = next(iter(eval_loader(manifest, o, "test", rank=0, world_size=1, per_rank_batch=5))).images
    batch = next(iter(eval_loader(manifest, o, "test", rank=0, world_size=1, per_rank_batch=5, pixels_only=True)))
    assert batch.images.shape == (5, 2 if channels == "both" else 1, 48, 48)
    assert input_shape("smallnorb", manifest.image_shape, channels, pixels_only=True) == batch.images.shape[1:]
    src = src_of(path, manifest, "test", int(batch.index[0]))
    views = torch.from_numpy(raw["test"]["images"][src]).float() / 255
    expected = torch.nn.functional.avg_pool2d(views[None], 2)[0]  # 96 -> 48, in [0, 1]
    np.testing.assert_allclose(batch.images[0], expected[: batch.images.shape[1]], atol=1e-6)
    np.testing.assert_allclose(normalise("smallnorb", batch.images), images, atol=1e-5)  # batched


def test_an_eval_limit_keeps_the_first_samples_in_index_order(norb):
    path, _ = norb
    manifest = load_manifest(path)
    o = opts(path, viewpoint="azimuth")
    first = sorted(eval_indices(manifest, o, "test"))[:7]
    loader = eval_loader(manifest, o, "test", rank=0, world_size=1, per_rank_batch=4, limit=7)
    assert sorted(i for i in indices(loader) if i >= 0) == first  # workers interleave their batches
    with pytest.raises(DataError, match="limit 0"):
        eval_loader(manifest, o, "test", rank=0, world_size=1, per_rank_batch=4, limit=0)


def test_truncated_shard_errors_by_default_and_counts_skips(norb, tmp_path):
    path, _ = norb
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    manifest = load_manifest(broken)
    shard = manifest.splits["test"].shards[1]
    data = (broken / shard.name).read_bytes()
    (broken / shard.name).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"shard .*{shard.name}.*(truncated|lacks)"):
        list(eval_loader(manifest, opts(broken), "test", rank=0, world_size=1, per_rank_batch=4))
    loader = eval_loader(manifest, opts(broken, skip_corrupt=True), "test", rank=0, world_size=1, per_rank_batch=4)
    batches = list(loader)
    real = [i for i in indices(batches) if i >= 0]
    lost = set(range(shard.first_index, shard.first_index + shard.num_samples)) - set(real)
    assert 0 < len(lost) < shard.num_samples and len(batches) == len(loader)
    assert loader.skipped == sum(b.skipped for b in batches) == len(lost)
    train_shard = manifest.splits["train"].shards[2]
    data = (broken / train_shard.name).read_bytes()
    (broken / train_shard.name).write_bytes(data[: len(data) // 3])
    train = train_loader(
        manifest, opts(broken, skip_corrupt=True, val_strategy="test"), epoch=0, rank=0, world_size=1, per_rank_batch=5
    )
    batches = list(train)
    assert len(batches) == N_TRAIN // 5 and all(b.index.shape == (5,) for b in batches)
    distinct = set(indices(batches))
    assert 0 < train.skipped < train_shard.num_samples
    assert len(distinct) + train.skipped == N_TRAIN  # every slot of a lost sample holds a repeat of a good one


def test_corrupt_member_named_and_skipped(norb, tmp_path):
    path, _ = norb
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    manifest = load_manifest(broken)
    shard = broken / manifest.splits["test"].shards[0].name
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            data = b"not a png" if m.name == "00000002.left.png" else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(DataError, match="corrupt sample 00000002 of shard .*test-000000.tar"):
        list(eval_loader(manifest, opts(broken), "test", rank=0, world_size=1, per_rank_batch=4))
    loader = eval_loader(manifest, opts(broken, skip_corrupt=True), "test", rank=0, world_size=1, per_rank_batch=4)
    seen = [i for i in indices(loader) if i >= 0]
    assert sorted(seen) == [i for i in range(N_TEST) if i != 2] and loader.skipped == 1


def test_missing_manifest_and_shard_name_the_prepare_command(norb, tmp_path):
    with pytest.raises(DataError, match=r"run: python launch/prepare_data.py smallnorb --out .*smallnorb"):
        load_manifest(tmp_path / "smallnorb")
    path, _ = norb
    partial = tmp_path / "partial"
    shutil.copytree(path, partial)
    manifest = load_manifest(partial)
    (partial / manifest.splits["test"].shards[0].name).unlink()
    with pytest.raises(DataError, match=r"test-000000.tar not found; prepare the dataset: python launch/prepare"):
        list(eval_loader(manifest, opts(partial), "test", rank=0, world_size=1, per_rank_batch=4))


def test_pipe_and_file_url_locations(norb):
    path, _ = norb
    for location in (f"pipe:cat {path}/{{}}", f"file://{path}"):
        manifest = load_manifest(location)
        assert sorted(eval_indices(manifest, opts(location), "test")) == list(range(N_TEST))


def test_loaders_pickle_for_spawned_workers(norb):
    import pickle

    path, _ = norb
    manifest = load_manifest(path)
    loader = train_loader(manifest, opts(path, num_workers=0), epoch=1, rank=0, world_size=1, per_rank_batch=4)
    stream = pickle.loads(pickle.dumps(loader.loader.dataset))
    assert [b.index.tolist() for b in stream] == [b.index.tolist() for b in loader]


def test_transforms_match_the_paper(norb):
    path, raw = norb
    manifest = load_manifest(path)
    assert input_shape(manifest.dataset, manifest.image_shape, "both") == (2, 32, 32)
    assert input_shape(manifest.dataset, manifest.image_shape, "left") == (1, 32, 32)
    with pytest.raises(ConfigError, match="channels 'right'"):
        input_shape(manifest.dataset, manifest.image_shape, "right")
    batch = next(iter(eval_loader(manifest, opts(path), "test", rank=0, world_size=1, per_rank_batch=2)))
    src = src_of(path, manifest, "test", int(batch.index[0]))
    views = torch.from_numpy(raw["test"]["images"][src]).float() / 255
    small = torch.nn.functional.avg_pool2d(views[None], 2)[0]  # tf.image.resize bilinear, 96 -> 48
    np.testing.assert_allclose(batch.images[0], standardize(small)[:, 8:40, 8:40], atol=1e-5)
    left = next(
        iter(eval_loader(manifest, opts(path, channels="left"), "test", rank=0, world_size=1, per_rank_batch=2))
    )
    assert left.images.shape == (2, 1, 32, 32)
    train = run_train(manifest, opts(path, num_workers=0), 0, 1, 8)[0]
    stds = torch.stack([b.images.flatten(1).std(1) for b in train]).flatten()
    assert stds.min() < 0.9 and stds.max() > 1.1  # contrast factors in [0, 3] change the spread
    counts = Counter(tuple(b.images.shape) for b in train)
    assert set(counts) == {(8, 2, 32, 32)}
