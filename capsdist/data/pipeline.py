"""Streaming loaders over prepared shards, one rank of a world of processes at a time.

    manifest = load_manifest(opts.shards)
    for batch in train_loader(manifest, opts, epoch=e, rank=r, world_size=w, per_rank_batch=b): ...
    # Batch(images float32 (b, C, H, W), labels int64 (b,), index int64 (b,), skipped int)

Each worker of the torch DataLoader follows its `WorkerPlan` (capsdist.data.plan): it streams
its shards (local paths, http(s):// URLs or pipe: commands, opened by capsdist.data.fetch),
keeps the planned sample indices, shuffles undecoded records in a buffer seeded by
(seed, epoch, rank, worker) when training, and decodes and transforms only the batches it
yields. Loaders must never go through `accelerator.prepare` (it would re-shard or broadcast
them and lose data): every rank already gets its own, equally long, share.

Corrupt data: by default a truncated shard, an unreadable member (not a file, not an image of the
manifest's shape, a decompression bomb), a label that disagrees with the manifest or a missing
sample raises DataError naming the shard and member. With skip_corrupt, training fills the slot
with another sample of the same batch and evaluation with a padding row; `Batch.skipped` counts
them and the loader logs the epoch's total. Every shard is hashed as it streams (the whole file is
read anyway) and checked against the manifest's sha256 when it ends: a mismatch raises DataError
(a warning with skip_corrupt), so a changed shard stops the run within one shard. A shard whose read fails in the
network (a URL: refused, cut short, no data for read_timeout_s) is read again for the samples not yet yielded, a
bounded number of times, then a DataError says network, not corruption; skip_corrupt never skips it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import shlex
import signal
import tarfile
import zlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from capsdist.data import fetch
from capsdist.data import plan as plans
from capsdist.data.manifest import Manifest
from capsdist.data.transforms import SampleTransform, input_shape
from capsdist.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)
_TAG_SHUFFLE = 0x5348


@dataclass(frozen=True)
class DataOptions:
    shards: str  # directory or URL prefix that holds manifest.json ("{}" marks the file name in pipe: commands)
    val_strategy: str = "random"  # random | loio | test
    val_fraction: float = 0.1  # for random
    viewpoint: str = "none"  # none | azimuth | elevation (smallNORB novel-viewpoint split)
    channels: str = "both"  # smallNORB stereo: both | left (ignored for 1-channel sets)
    augment: bool = True  # training augmentation (smallNORB: crop+brightness+contrast; MNIST-likes: pad_crop)
    pad_crop: int = 0  # MNIST-likes: pad by N then random crop back (0 = off)
    num_workers: int = 2
    shuffle_buffer: int = 1000
    skip_corrupt: bool = False
    read_timeout_s: float = 60.0  # http(s) shards and manifest: seconds without data before a read fails
    seed: int = 0


class Batch(NamedTuple):
    images: torch.Tensor  # float32 (B, C, H, W), already transformed
    labels: torch.Tensor  # int64 (B,); -1 on padding rows
    index: torch.Tensor  # int64 (B,) stable index of the sample within its split; -1 marks padding rows (eval only)
    skipped: int  # corrupt samples skipped (skip mode) since the previous batch of the same worker


def _select(manifest: Manifest, opts: DataOptions, role: str) -> tuple[str, np.ndarray]:
    return plans.select(
        manifest,
        role,
        val_strategy=opts.val_strategy,
        val_fraction=opts.val_fraction,
        viewpoint=opts.viewpoint,
        seed=opts.seed,
    )


def data_identity(manifest: Manifest, opts: DataOptions) -> dict:
    """What a run trains and validates on, by the keys that choose it: which shards (the manifest's sha256; the
    dataset and location too) and what parts validation from training (plan.select). A checkpoint records it."""
    return {
        "data.dataset": manifest.dataset,
        "data.shards": opts.shards,
        "manifest_sha256": manifest.sha256,
        "data.val_strategy": opts.val_strategy,
        "data.val_fraction": opts.val_fraction,
        "data.viewpoint": opts.viewpoint,
        "train.seed": opts.seed,
    }


def check_same_data(recorded: dict | None, current: dict, where: str) -> None:
    """Refuse, with a ConfigError that names `where` (a checkpoint), what changed and the --set that undoes it, to
    resume on `current` data (data_identity) other than the `recorded` one: the validation split would hold trained
    samples. The same manifest at another location continues, with a warning; so does a checkpoint that recorded
    nothing (an older capsdist's)."""
    if recorded is None:
        log.warning("%s has no record of the data it was trained on (an older capsdist wrote it): not checked", where)
        return
    changed = [key for key in current if recorded.get(key) != current[key]]
    if changed == ["data.shards"]:
        log.warning(
            "%s: data.shards %s -> %s, the same manifest (sha256): continuing",
            where,
            recorded[changed[0]],
            current[changed[0]],
        )
        return
    if not changed:
        return
    keys = [key for key in changed if key != "manifest_sha256"]
    what = [f"{key} {recorded.get(key)} -> {current[key]}" for key in keys]
    if "manifest_sha256" in changed:
        what.append("the shards' manifest is another one (other shards, or prepared again)")
    undo = [f"{key}={recorded[key]}" for key in keys if key in recorded]
    fix = f"set them back ({shlex.join(['--set', *undo])})" if undo else "bring back the shards it was trained on"
    raise ConfigError(
        f"{where} was trained on other data than this config's: {'; '.join(what)}. Resuming would mix trained "
        f"samples into validation (or train on other data): {fix}, or start a new run directory (--run-dir)"
    )


def steps_per_epoch(manifest: Manifest, opts: DataOptions, global_batch: int) -> int:
    """Training batches per rank and epoch (global_batch = world_size * per_rank_batch); same on every rank."""
    return plans.train_steps(len(_select(manifest, opts, "train")[1]), 1, global_batch)


def train_loader(
    manifest: Manifest,
    opts: DataOptions,
    *,
    epoch: int,
    rank: int,
    world_size: int,
    per_rank_batch: int,
    start_batch: int = 0,
) -> EpochLoader:
    """This rank's training batches of `epoch`: exactly steps_per_epoch of them, minus the first `start_batch`.

    Order and augmentation are a pure function of (seed, epoch, rank, world_size, num_workers):
    start_batch=k yields exactly batches k.. of the full epoch, reading but not decoding the first k.
    """
    split, indices = _select(manifest, opts, "train")
    worker_plans = plans.train_plan(
        manifest,
        split,
        indices,
        seed=opts.seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        num_workers=opts.num_workers,
        per_rank_batch=per_rank_batch,
    )
    transform = SampleTransform(
        manifest.dataset,
        train=True,
        augment=opts.augment,
        channels=opts.channels,
        pad_crop=opts.pad_crop,
        seed=opts.seed,
        epoch=epoch,
    )
    stream = _Stream(
        manifest,
        split,
        worker_plans,
        transform,
        batch=per_rank_batch,
        train=True,
        shuffle=(opts.seed, epoch, rank, opts.shuffle_buffer),
        skip_corrupt=opts.skip_corrupt,
        start_batch=start_batch,
        shape=input_shape(manifest.dataset, manifest.image_shape, opts.channels),
        read_timeout_s=opts.read_timeout_s,
    )
    total = sum(p.num_batches for p in worker_plans)
    if not 0 <= start_batch <= total:
        raise DataError(f"start_batch {start_batch} outside the epoch's 0..{total} batches")
    return EpochLoader(stream, opts.num_workers, total - start_batch, f"train epoch {epoch} rank {rank}")


EVAL_SPLITS = ("val", "test", "test_familiar")


def eval_loader(
    manifest: Manifest,
    opts: DataOptions,
    split: str,
    *,
    rank: int,
    world_size: int,
    per_rank_batch: int,
    limit: int | None = None,
    pixels_only: bool = False,
) -> EpochLoader:
    """This rank's share of split "val", "test" or "test_familiar", in order; the same number of batches on every rank.

    Across ranks every selected sample appears exactly once with index >= 0; padding rows have
    index -1 and label -1. With val_strategy "test", "val" is the test split (and says so loudly).
    "test_familiar" is the test images at the training viewpoints of data.viewpoint (then "test" holds the
    novel ones). `limit` keeps the first `limit` selected samples in index order. With `pixels_only` the images
    are pixels in [0, 1] before normalisation (capsdist.data.transforms.normalise makes them model inputs).
    """
    if split not in EVAL_SPLITS:
        raise DataError(f"eval split {split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    if split == "val" and opts.val_strategy == "test":
        log.warning(
            "val_strategy=test: validation uses the TEST split, so model selection sees the test "
            "set and test accuracy is optimistic; use random or loio for an honest estimate"
        )
    source, indices = _select(manifest, opts, split)
    if limit is not None:
        if limit < 1:
            raise DataError(f"eval limit {limit}: keep at least 1 sample")
        indices = indices[:limit]
    worker_plans = plans.eval_plan(
        manifest,
        source,
        indices,
        rank=rank,
        world_size=world_size,
        num_workers=opts.num_workers,
        per_rank_batch=per_rank_batch,
    )
    transform = SampleTransform(
        manifest.dataset,
        train=False,
        augment=False,
        channels=opts.channels,
        pad_crop=0,
        seed=opts.seed,
        epoch=0,
        pixels_only=pixels_only,
    )
    stream = _Stream(
        manifest,
        source,
        worker_plans,
        transform,
        batch=per_rank_batch,
        train=False,
        shuffle=None,
        skip_corrupt=opts.skip_corrupt,
        start_batch=0,
        shape=input_shape(manifest.dataset, manifest.image_shape, opts.channels, pixels_only=pixels_only),
        read_timeout_s=opts.read_timeout_s,
    )
    total = sum(p.num_batches for p in worker_plans)
    return EpochLoader(stream, opts.num_workers, total, f"{split} rank {rank}")


def _ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGINT: a scheduler (scancel, SLURM --signal, Ctrl-C) signals the whole
    process group, and the trainer, not its workers, decides when to stop (after checkpointing)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class EpochLoader:
    """One epoch of one rank: iterate for Batches; `len()` batches; `skipped` after iterating.

    Wraps a torch DataLoader (batch_size=None: workers yield whole batches). Keep it out of
    accelerator.prepare.
    """

    def __init__(self, stream: IterableDataset, num_workers: int, num_batches: int, what: str):
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_ignore_stop_signals,
        )
        self.num_batches = num_batches
        self.what = what
        self.skipped = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        self.skipped = produced = 0
        for batch in _plain_errors(self.loader):
            self.skipped += batch.skipped
            if batch.images.numel() == 0:  # a batch before start_batch: read, not decoded
                continue
            produced += 1
            yield batch
        if produced != self.num_batches:
            raise DataError(f"{self.what}: made {produced} batches instead of {self.num_batches}")
        if self.skipped:
            log.warning("%s: skipped %d corrupt samples (skip_corrupt mode)", self.what, self.skipped)


def _plain_errors(loader: DataLoader) -> Iterator[Batch]:
    """Iterate `loader`, turning a worker's DataError (wrapped with its traceback by torch) back into its message.

    Workers are shut down as soon as iteration stops (error or early exit): an iterator left to the
    garbage collector would be inherited by the next loader's forked workers, which cannot join it.
    """
    it = iter(loader)
    try:
        yield from it
    except DataError as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        raise DataError(text.rsplit("DataError: ", 1)[-1].strip()) from None
    finally:
        if hasattr(it, "_shutdown_workers"):  # multi-process iterator (torch private, idempotent)
            it._shutdown_workers()


class _Record(NamedTuple):
    index: int
    parts: dict  # member extension ("png", "left.png", "cls", "json") -> bytes
    where: str  # "shard member" for messages


class _Corrupt(Exception):
    """A record that cannot be decoded; handled per skip_corrupt."""


class _Stream(IterableDataset):
    """The batches of one rank; each DataLoader worker makes those of its own WorkerPlan."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        worker_plans: list[plans.WorkerPlan],
        transform: SampleTransform,
        *,
        batch: int,
        train: bool,
        shuffle: tuple | None,
        skip_corrupt: bool,
        start_batch: int,
        shape: tuple[int, int, int],
        read_timeout_s: float,
    ):
        self.manifest, self.split, self.plans, self.transform = manifest, split, worker_plans, transform
        self.batch, self.train, self.shuffle, self.skip_corrupt = batch, train, shuffle, skip_corrupt
        self.start_batch, self.shape, self.read_timeout_s = start_batch, shape, read_timeout_s

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plans[worker]
        records = self._records(plan)
        if self.shuffle is not None:
            seed, epoch, rank, size = self.shuffle
            records = _shuffled(records, size, np.random.default_rng([seed, epoch, rank, worker, _TAG_SHUFFLE]))
        self.skipped, recent = 0, []
        for k in range(plan.num_batches):
            chunk = list(itertools.islice(records, self.batch))
            if k * num_workers + worker < self.start_batch:  # resuming: read past it, do not decode
                yield Batch(
                    torch.empty(0),
                    torch.empty(0, dtype=torch.long),
                    torch.empty(0, dtype=torch.long),
                    self._take_skipped(),
                )
                continue
            rows = [self._decode(r) for r in chunk] + [None] * (self.batch - len(chunk))
            recent = self._fill(rows, recent)
            yield Batch(
                torch.stack([r[0] for r in rows]),
                torch.tensor([r[1] for r in rows]),
                torch.tensor([r[2] for r in rows]),
                self._take_skipped(),
            )
        for _ in records:  # finish the last shard: its checksum is checked at its end
            pass

    def _take_skipped(self) -> int:
        n, self.skipped = self.skipped, 0
        return n

    def _fill(self, rows: list, recent: list) -> list:
        """Fill empty rows (corrupt in skip mode, or eval padding); return the good rows to fill from next.

        Training repeats good rows of this batch, or of the last batch that had some; eval pads.
        """
        good = [r for r in rows if r is not None]
        pool = good or recent
        for i, row in enumerate(rows):
            if row is not None:
                continue
            if not self.train:
                rows[i] = (torch.zeros(self.shape), -1, -1)
            elif pool:
                rows[i] = pool[i % len(pool)]
            else:
                raise DataError(
                    f"{self.split}: no readable sample to fill a training batch (skip_corrupt); "
                    f"prepare the dataset again: {self.manifest.prepare_command()}"
                )
        return pool

    def _decode(self, record: _Record):
        """(image float32 (C, H, W), label, index) of a record; None when corrupt in skip mode."""
        views = self.manifest.views
        try:
            names = ["png"] if len(views) == 1 else [f"{v}.png" for v in views]
            images = np.stack([self._image(record.parts[n]) for n in names])
            label = int(record.parts["cls"])
            expected = int(self.manifest.splits[self.split].columns["label"][record.index])
            if label != expected:
                raise _Corrupt(f"label {label}, the manifest says {expected}")
        except (KeyError, ValueError, OSError, Image.DecompressionBombError, _Corrupt) as exc:
            if not self.skip_corrupt:
                raise DataError(
                    f"corrupt sample {record.where}: {exc!r}; prepare the dataset again "
                    f"({self.manifest.prepare_command()}) or set skip_corrupt"
                ) from None
            self.skipped += 1
            return None
        return self.transform(images, record.index), label, record.index

    def _image(self, data: bytes) -> np.ndarray:
        """uint8 (H, W) of one PNG member; _Corrupt unless it has the manifest's H and W (checked before decoding)."""
        image = Image.open(io.BytesIO(data))
        if image.size[::-1] != tuple(self.manifest.image_shape[1:]):
            raise _Corrupt(
                f"image of {image.size[0]}x{image.size[1]} pixels, expected "
                f"{self.manifest.image_shape[2]}x{self.manifest.image_shape[1]}"
            )
        return np.asarray(image.convert("L"))

    def _records(self, plan: plans.WorkerPlan) -> Iterator[_Record]:
        """The planned records, shard by shard; missing ones raise or are counted as skipped."""
        info = self.manifest.splits[self.split]
        for shard_pos, wanted in plan.reads:
            shard = info.shards[shard_pos]
            url = self.manifest.url(shard)
            seen = set()
            for record in self._read_shard(url, shard.sha256, set(wanted.tolist())):
                seen.add(record.index)
                yield record
            missing = len(wanted) - len(seen)
            if missing and not self.skip_corrupt:
                raise DataError(
                    f"shard {url} lacks {missing} of its samples (truncated?); prepare the dataset "
                    f"again: {self.manifest.prepare_command()}"
                )
            self.skipped += missing

    def _read_shard(self, url: str, sha256: str, wanted: set[int]) -> Iterator[_Record]:
        """Records of `wanted` indices in shard `url` (`_read_shard_once`); a read that fails in the network starts
        again for the records not yet yielded (fetch.retried)."""
        done: set[int] = set()
        for record in fetch.retried(
            lambda: self._read_shard_once(url, sha256, wanted - done), url, self.read_timeout_s
        ):
            done.add(record.index)
            yield record

    def _read_shard_once(self, url: str, sha256: str, wanted: set[int]) -> Iterator[_Record]:
        """Records of `wanted` indices in shard `url`, grouped from consecutive tar members of one key;
        the whole shard is read and checked against `sha256` at the end; fetch.NetworkError passes through."""
        member, current = None, None
        try:
            mode = "r|gz" if url.rstrip(" -").endswith(".gz") else "r|"  # "r|*" sniffing costs ~30% more
            raw = fetch.open_url(url, self.read_timeout_s)
            with raw, tarfile.open(fileobj=(stream := _Hashed(raw)), mode=mode) as tar:
                for member_info in tar:
                    member = member_info.name
                    key, _, ext = member.partition(".")
                    if not key.isdigit() or int(key) not in wanted or not member_info.isfile():
                        continue  # a sample whose member is a directory or link lacks that member: corrupt
                    if current is not None and current.index != int(key):
                        yield current
                        current = None
                    if current is None:
                        current = _Record(int(key), {}, f"{key} of shard {url}")
                    current.parts[ext] = tar.extractfile(member_info).read()
                if current is not None:
                    yield current
                stream.drain()
            if stream.hexdigest() != sha256:
                if not self.skip_corrupt:
                    raise DataError(
                        f"shard {url} does not match its sha256 in the manifest (corrupt or changed); "
                        f"prepare the dataset again: {self.manifest.prepare_command()}"
                    )
                log.warning("shard %s does not match its sha256 in the manifest (corrupt or changed)", url)
        except FileNotFoundError:
            raise DataError(f"shard {url} not found; prepare the dataset: {self.manifest.prepare_command()}") from None
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            if not self.skip_corrupt:
                raise DataError(
                    f"shard {url} is corrupt or truncated at member {member}: {exc}; prepare the "
                    f"dataset again: {self.manifest.prepare_command()}"
                ) from None
            log.warning("shard %s: corrupt or truncated at member %s (%s); skipping the rest", url, member, exc)


class _Hashed:
    """A read-only stream that hashes (sha256) what is read through it."""

    def __init__(self, raw):
        self.raw, self.digest = raw, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Read to the end (tarfile stops at the end-of-archive marker, before the padding)."""
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Seeded shuffle buffer of `size` items (webdataset-style, but with our own generator)."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]
