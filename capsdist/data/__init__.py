"""Datasets as WebDataset shards: prepare once, stream per rank and per loader worker.

formats     raw readers: NORB binary matrix (smallNORB .mat), IDX (MNIST-likes)
sources     dataset registry (DATASETS), official checksums, downloads, raw splits
shards      shard + manifest writing (prepare: atomic, reproducible, verified on re-run)
manifest    the manifest: load_manifest, shard locations (paths, URLs, pipe: templates)
fetch       opening a location's files: URLs with a read timeout and a bounded retry, network errors apart
plan        validation/viewpoint selection and per-epoch rank/worker plans (pure functions)
transforms  per-sample transforms (the paper's smallNORB preprocessing, MNIST-likes) and the model's input_shape
pipeline    the loaders: DataOptions, Batch, train_loader, eval_loader, steps_per_epoch; the run's data_identity

What the rest of capsdist uses is named here; see docs/data.md.
"""

from capsdist.data.manifest import Manifest, is_remote, load_manifest, prepare_command
from capsdist.data.pipeline import (
    Batch,
    DataOptions,
    check_same_data,
    data_identity,
    eval_loader,
    steps_per_epoch,
    train_loader,
)
from capsdist.data.shards import prepare
from capsdist.data.sources import DATASETS
from capsdist.data.transforms import input_shape

__all__ = [
    "DATASETS",
    "Batch",
    "DataOptions",
    "Manifest",
    "check_same_data",
    "data_identity",
    "eval_loader",
    "input_shape",
    "is_remote",
    "load_manifest",
    "prepare",
    "prepare_command",
    "steps_per_epoch",
    "train_loader",
]
