"""Which samples each rank and loader worker reads: validation/viewpoint selection and epoch plans.

Everything here is a pure function of the manifest, the options and (seed, epoch, rank,
world_size, num_workers): no shard is opened, so every rank derives the same counts.

Selection (`select`) gives sorted sample indices of a split for a role: train, val or test.
Epoch plans give each worker of a rank a `WorkerPlan`: the runs of (shard, indices) to read in
order and how many batches to make of them. A rank's batch b comes from worker b % W (torch's
DataLoader takes batches from its workers in turn), as that worker's batch b // W.

Training (`train_plan`): the shard list is shuffled with (seed, epoch), the selected samples
are laid out in that shard order, rotated by a random offset, and the first
steps * world_size * batch of them are cut into equal contiguous parts per rank, then per
worker. So the shard split changes every epoch, every rank gets exactly `steps` batches, no
sample is used twice, and the fewer than world_size * batch left out change every epoch.

Evaluation (`eval_plan`): the selected samples in index order are cut into world_size parts of
ceil(M / world_size); every rank makes ceil(that / batch) batches and pads the rest with
index -1, so each sample appears exactly once across ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from capsdist.data.manifest import Manifest
from capsdist.core.errors import ConfigError, DataError

TRAIN_AZIMUTHS = frozenset({30, 32, 34, 0, 2, 4})  # azimuth index * 10 = 300..340, 0..40 degrees (paper)
TRAIN_ELEVATIONS = frozenset({0, 1, 2})  # the 3 lowest elevations (30, 35, 40 degrees)
LOIO_INSTANCE = 4  # smallNORB training instance left out by the loio validation strategy
_TAG_VAL, _TAG_EPOCH = 0x7641, 0x45504F  # keep the random streams of different purposes apart


@dataclass(frozen=True)
class WorkerPlan:
    reads: tuple[tuple[int, np.ndarray], ...]  # (shard position in the split, sample indices to keep), in order
    num_batches: int
    num_samples: int  # real samples to read (num_batches * batch for training; fewer when eval pads)


def select(
    manifest: Manifest, role: str, *, val_strategy: str, val_fraction: float, viewpoint: str, seed: int
) -> tuple[str, np.ndarray]:
    """(split name, sorted int64 sample indices) used for `role` in {"train", "val", "test", "test_familiar"}.

    With a viewpoint split, "test" is the test images at the novel viewpoints and "test_familiar" those at the
    training viewpoints (the paper compares models on both); "test_familiar" needs a viewpoint split.
    """
    if role == "test" or (role == "val" and val_strategy == "test"):
        return "test", np.flatnonzero(_viewpoint_mask(manifest, "test", viewpoint, train=False))
    if role == "test_familiar":
        if viewpoint == "none":
            raise ConfigError(
                "test_familiar (test images at the training viewpoints) needs a viewpoint split: "
                "set data.viewpoint to azimuth or elevation"
            )
        return "test", np.flatnonzero(_viewpoint_mask(manifest, "test", viewpoint, train=True))
    if val_strategy not in ("random", "loio", "test"):
        raise ConfigError(f"val_strategy {val_strategy!r}: expected random, loio or test")
    candidates = np.flatnonzero(_viewpoint_mask(manifest, "train", viewpoint, train=True))
    if val_strategy == "test":
        return "train", candidates
    if val_strategy == "loio":
        instance = _column(manifest, "train", "instance", "val_strategy loio")
        held_out = instance[candidates] == LOIO_INSTANCE
        return "train", candidates[held_out if role == "val" else ~held_out]
    n_val = round(val_fraction * len(candidates))
    if not 0 < n_val < len(candidates):
        raise ConfigError(
            f"val_fraction {val_fraction} of {len(candidates)} training samples leaves an "
            "empty training or validation set"
        )
    val = np.random.default_rng([seed, _TAG_VAL]).choice(candidates, size=n_val, replace=False)
    chosen = np.isin(candidates, val)
    return "train", candidates[chosen if role == "val" else ~chosen]


def _column(manifest: Manifest, split: str, name: str, why: str) -> np.ndarray:
    if name not in manifest.splits[split].columns:
        raise ConfigError(f"{why} needs the {name!r} metadata, which {manifest.dataset} does not have")
    return manifest.splits[split].columns[name]


def _viewpoint_mask(manifest: Manifest, split: str, viewpoint: str, *, train: bool) -> np.ndarray:
    """bool (N,): samples of `split` at the paper's training viewpoints (train) or at the others (all for "none")."""
    if viewpoint == "none":
        return np.ones(manifest.splits[split].num_samples, dtype=bool)
    if viewpoint == "azimuth":
        seen = np.isin(_column(manifest, split, "azimuth", "viewpoint azimuth"), list(TRAIN_AZIMUTHS))
    elif viewpoint == "elevation":
        seen = np.isin(_column(manifest, split, "elevation", "viewpoint elevation"), list(TRAIN_ELEVATIONS))
    else:
        raise ConfigError(f"viewpoint {viewpoint!r}: expected none, azimuth or elevation")
    return seen if train else ~seen


def worker_batches(num_batches: int, num_workers: int) -> list[int]:
    """Batches made by each worker when a rank's batch b comes from worker b % num_workers."""
    return [len(range(w, num_batches, num_workers)) for w in range(num_workers)]


def train_steps(num_selected: int, world_size: int, per_rank_batch: int) -> int:
    """Batches per rank and epoch: every rank the same, dropping fewer than world_size * per_rank_batch."""
    steps = num_selected // (world_size * per_rank_batch)
    if steps == 0:
        raise DataError(
            f"{num_selected} training samples are fewer than one global batch of "
            f"{world_size} x {per_rank_batch}; lower the batch size"
        )
    return steps


def train_plan(
    manifest: Manifest,
    split: str,
    indices: np.ndarray,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    num_workers: int,
    per_rank_batch: int,
) -> list[WorkerPlan]:
    """One WorkerPlan per worker (at least one) of `rank` for training epoch `epoch`."""
    steps = train_steps(len(indices), world_size, per_rank_batch)
    info = manifest.splits[split]
    shard_of = _shard_of(info, indices)
    rng = np.random.default_rng([seed, epoch, _TAG_EPOCH])
    position = np.argsort(rng.permutation(len(info.shards)))  # position of each shard in this epoch's order
    sequence = indices[np.lexsort((indices, position[shard_of]))]
    sequence = np.roll(sequence, -int(rng.integers(len(sequence))))
    per_rank = steps * per_rank_batch
    mine = sequence[rank * per_rank : (rank + 1) * per_rank]
    return _split_workers(info, mine, steps, num_workers, per_rank_batch)


def eval_steps(num_selected: int, world_size: int, per_rank_batch: int) -> int:
    """Batches per rank for evaluation: enough for ceil(num_selected / world_size) samples."""
    return math.ceil(math.ceil(num_selected / world_size) / per_rank_batch)


def eval_plan(
    manifest: Manifest,
    split: str,
    indices: np.ndarray,
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    per_rank_batch: int,
) -> list[WorkerPlan]:
    """One WorkerPlan per worker of `rank` covering its share of `indices` in order."""
    share = math.ceil(len(indices) / world_size)
    mine = indices[rank * share : (rank + 1) * share]
    steps = eval_steps(len(indices), world_size, per_rank_batch)
    return _split_workers(manifest.splits[split], mine, steps, num_workers, per_rank_batch)


def _shard_of(info, indices: np.ndarray) -> np.ndarray:
    """Position of the shard holding each sample index."""
    firsts = np.array([s.first_index for s in info.shards])
    return np.searchsorted(firsts, indices, side="right") - 1


def _split_workers(info, mine: np.ndarray, steps: int, num_workers: int, batch: int) -> list[WorkerPlan]:
    """Cut a rank's samples into contiguous worker parts of (that worker's batches) * batch samples."""
    plans, start = [], 0
    for count in worker_batches(steps, max(1, num_workers)):
        part = mine[start : start + count * batch]
        start += count * batch
        shard_of = _shard_of(info, part)
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        reads = tuple(
            (int(run_shards[0]), run)
            for run_shards, run in zip(np.split(shard_of, cuts), np.split(part, cuts))
            if len(run)
        )
        plans.append(WorkerPlan(reads=reads, num_batches=count, num_samples=len(part)))
    return plans
