"""Build what a run needs from its Config, for training, evaluation and the benchmarks: the Accelerator, the data
options and manifest (prepared on first use), and the model for that data."""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from capsdist.core import threads
from capsdist.config import Config
from capsdist.data import DataOptions, input_shape, is_remote, load_manifest, prepare, prepare_command
from capsdist.core.errors import DataError
from capsdist.model import build_model


def make_accelerator(cfg: Config, log_with: str | None = None, cpu: bool | None = None) -> Accelerator:
    """The run's Accelerator, on the CPU when `cpu` (default: when there is no CUDA). Without CUDA it must be
    created with cpu=True: a multi-process launch on CPU (accelerate launch --multi_gpu / use_cpu config,
    torchrun) otherwise gives N separate 1-process runs. Every collective (all-reduce, barrier, gather) gives up
    after train.collective_timeout_s."""
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    _restarted_process_group(timeout.timeout)
    return Accelerator(
        cpu=not torch.cuda.is_available() if cpu is None else cpu,
        mixed_precision=cfg.train.mixed_precision,
        log_with=log_with,
        dynamo_backend="inductor" if cfg.train.compile else "no",
        kwargs_handlers=[timeout],
    )


def _restarted_process_group(timeout: timedelta) -> None:
    """After an elastic restart (torchrun --max-restarts, TORCHELASTIC_RESTART_COUNT > 0), start the process group on
    keys of its own: Accelerate then takes it as it is.

    The agent keeps one store for every attempt of the group and torch's env:// rendezvous puts no attempt in the
    keys, so a restarted group reads what the dead one wrote there (gloo connects to a dead rank's address:
    "Connection refused"). A store prefixed with the attempt gives each attempt fresh keys; the first attempt
    starts as Accelerate starts it."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        store=dist.PrefixStore(f"capsdist/attempt-{attempt}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )


def data_options(cfg: Config) -> DataOptions:
    """The loaders' options: every DataOptions field from the `data` section, the shards' location resolved
    (Config.shards), data.num_workers: auto resolved from this process's cores (capsdist.core.threads) and
    train.seed, which seeds the data order."""
    fields = {f.name: getattr(cfg.data, f.name) for f in dataclasses.fields(DataOptions) if hasattr(cfg.data, f.name)}
    workers = threads.budget(cfg.data.num_workers).workers
    return DataOptions(**{**fields, "num_workers": workers, "shards": cfg.shards, "seed": cfg.train.seed})


def load_data(cfg: Config, accelerator: Accelerator, opts: DataOptions):
    """The shards' manifest; when missing and data.prepare is auto, rank 0 prepares them first.

    Preparation needs the raw files or the network (smallNORB and Fashion-MNIST download);
    when it fails (offline), the DataError gives the exact prepare command to run by hand.
    The other ranks wait at a barrier and then read the same manifest.
    """
    if is_remote(cfg.shards) or (Path(cfg.shards) / "manifest.json").is_file():  # a URL or pipe: is never prepared
        return load_manifest(opts.shards, opts.read_timeout_s)
    command = prepare_command(cfg.data.dataset, cfg.shards)
    if cfg.data.prepare == "never":
        raise DataError(
            f"{cfg.shards}: no prepared {cfg.data.dataset} shards (no manifest.json); run `{command}` "
            "(or set data.prepare: auto to prepare them at the start of the run)"
        )
    error = None
    if accelerator.is_main_process:
        print(f"capsdist: no shards at {cfg.shards}: preparing {cfg.data.dataset} there (rank 0)")
        try:
            prepare(cfg.data.dataset, Path(cfg.shards))
        except DataError as err:
            error = DataError(
                f"{err}\ncould not prepare {cfg.data.dataset} automatically; run `{command}` "
                "(add --source DIR with the raw files when offline), then start the run again"
            )
    accelerator.wait_for_everyone()
    if error is not None:
        raise error
    if not (Path(cfg.shards) / "manifest.json").is_file():
        raise DataError(f"{cfg.shards}: rank 0 could not prepare {cfg.data.dataset}; see its error")
    return load_manifest(opts.shards, opts.read_timeout_s)


def model_for_data(cfg: Config, manifest, opts: DataOptions) -> torch.nn.Module:
    """The configured model (a CapsNet or a CNN baseline) for the manifest's input shape and classes."""
    channels, height, width = input_shape(manifest.dataset, manifest.image_shape, opts.channels)
    if height != width:
        raise DataError(f"{opts.shards}: the models need square inputs, the data gives {height}x{width}")
    return build_model(cfg.model, in_channels=channels, input_size=height, num_classes=len(manifest.classes))
