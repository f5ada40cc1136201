"""Writing a dataset as WebDataset shards plus its manifest, atomically and verifiably.

`prepare(dataset, out, ...)` reads the raw files (capsdist.data.sources), shuffles each split
once with a fixed seed (so that shards mix classes and viewpoints; the shard order is the
sample index), and writes `out/<split>-NNNNNN.tar` (`.tar.gz` with compress=True) with
webdataset's ShardWriter. Each sample `i` is stored under the key `f"{i:08d}"`:

    00000042.left.png, 00000042.right.png   (smallNORB; MNIST-likes have one 00000042.png)
    00000042.cls                            class index as text
    00000042.json                           {"index", "source_index", "label", "class", metadata...}

Atomicity: a marker file says a preparation is under way; shards are written under temporary
names, renamed when complete, and the manifest is written last (temporary name, fsync, rename).
A killed run therefore leaves no manifest, which every reader requires; the next run clears its
leftovers. A complete output is verified (sha256 of every shard) and otherwise left alone.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm
from webdataset import ShardWriter

import capsdist
from capsdist.data.manifest import FORMAT, MANIFEST, Manifest, load_manifest, manifest_json
from capsdist.data.sources import RawSplit, fetch, load_split, locate, spec
from capsdist.core.errors import DataError
from capsdist.core.files import sha256_file, write_atomic

SHUFFLE_SEED = 20180501  # fixed: the same raw files always give the same shards
MARKER = ".prepare-incomplete"
OUR_FILES = re.compile(r"^(\.tmp-)?[a-z]+-\d{6}\.tar(\.gz)?$|^\.tmp-manifest\.json$")


def prepare(
    dataset: str,
    out: Path,
    *,
    source: Path | None = None,
    shard_size: int = 5000,
    subset: dict[str, int] | None = None,
    compress: bool = False,
    cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Prepare `dataset` into `out` (or verify an existing complete preparation) and return its manifest.

    source: folder with the raw files (gzipped or not); None downloads them into `cache`
    (default ~/.cache/capsdist/<dataset>). subset: split -> number of samples, class-balanced.
    """
    ds = spec(dataset)
    out = Path(out)
    subset = subset or None
    if subset and not set(subset) <= set(ds.files):
        raise DataError(
            f"--subset names unknown splits {sorted(set(subset) - set(ds.files))}; {dataset} has {sorted(ds.files)}"
        )
    for split, n in (subset or {}).items():
        if n < 1:
            raise DataError(f"--subset {split}={n}: sizes must be at least 1")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory; choose a directory for the shards")
    if (out / MANIFEST).exists():
        manifest = load_manifest(out)
        if manifest.dataset != dataset or manifest.subset != subset:
            raise DataError(
                f"{out} already holds {manifest.dataset} (subset {manifest.subset}), not "
                f"{dataset} (subset {subset}); choose another --out, or delete {out} first"
            )
        verify(manifest)
        (out / MARKER).unlink(missing_ok=True)
        log(f"{out}: complete {dataset} dataset, every shard verified (sha256); nothing to do")
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(out)
    (out / MARKER).write_text(f"{dataset}\n")
    if source is not None:
        files = locate(dataset, Path(source))
    else:
        files = fetch(dataset, Path(cache) if cache else Path.home() / ".cache" / "capsdist" / dataset)
    splits, sources = {}, {}
    for split in ds.files:
        raw = load_split(dataset, files, split)
        sources.update(raw.checksums)
        order = sample_order(raw.labels, len(ds.classes), subset.get(split) if subset else None, split)
        splits[split] = _write_split(out, split, raw, order, ds.classes, ds.views, shard_size, compress, log)
    raw_manifest = {
        "format": FORMAT,
        "dataset": dataset,
        "classes": list(ds.classes),
        "views": list(ds.views),
        "image_shape": [len(ds.views), *ds.image_size],
        "metadata": list(ds.metadata),
        "subset": subset,
        "shuffle_seed": SHUFFLE_SEED,
        "splits": splits,
        "sources": sources,
        "capsdist_version": capsdist.__version__,
    }
    write_atomic(out / MANIFEST, manifest_json(raw_manifest).encode())
    (out / MARKER).unlink()
    log(
        f"{out}: wrote "
        + ", ".join(f"{k} {v['num_samples']} samples in {len(v['shards'])} shards" for k, v in splits.items())
    )
    return load_manifest(out)


def sample_order(labels: np.ndarray, num_classes: int, subset: int | None, split: str) -> np.ndarray:
    """Source indices in shard order: all samples, or a class-balanced `subset`, shuffled with a fixed seed.

    labels int64 (N,) -> int64 (M,), M = N or subset (classes get subset // K, the first subset % K one more).
    """
    rng = np.random.default_rng([SHUFFLE_SEED, int.from_bytes(split.encode(), "little")])
    if subset is None:
        return rng.permutation(len(labels))
    chosen = []
    for c in range(num_classes):
        want = subset // num_classes + (c < subset % num_classes)
        pool = np.flatnonzero(labels == c)
        if len(pool) < want:
            raise DataError(f"--subset {split}={subset}: class {c} has only {len(pool)} samples, {want} needed")
        chosen.append(rng.choice(pool, size=want, replace=False))
    return rng.permutation(np.concatenate(chosen))


def png(image: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 (H, W) grey image."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write_split(
    out: Path,
    split: str,
    raw: RawSplit,
    order: np.ndarray,
    classes: tuple[str, ...],
    views: tuple[str, ...],
    shard_size: int,
    compress: bool,
    log: Callable[[str], None],
) -> dict:
    """Write one split's shards (temporary names renamed when each is complete); its manifest entry."""
    suffix = ".tar.gz" if compress else ".tar"
    shards: list[dict] = []
    written = 0

    streams = {}

    def open_shard(tmp_name: str):  # gzip with mtime 0, so the same sources give byte-identical shards
        streams[tmp_name] = gzip.GzipFile(tmp_name, "wb", mtime=0) if compress else open(tmp_name, "wb")
        return streams[tmp_name]

    def finish(tmp_name: str) -> None:  # called by ShardWriter after the tar stream of a shard ends
        streams.pop(tmp_name).close()
        tmp = Path(tmp_name)
        final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
        data = tmp.read_bytes()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        first = shards[-1]["first_index"] + shards[-1]["num_samples"] if shards else 0
        shards.append(
            {
                "name": final.name,
                "num_samples": written - first,
                "first_index": first,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )

    pattern = str(out / f".tmp-{split}-%06d{suffix}")
    with ShardWriter(
        pattern,
        maxcount=shard_size,
        maxsize=float("inf"),
        post=finish,
        opener=open_shard,
        verbose=0,
        encoder=False,
        mtime=0,
    ) as writer:
        for index, src in enumerate(tqdm(order, desc=f"{split} shards", unit="sample", mininterval=2)):
            label = int(raw.labels[src])
            meta = {"index": index, "source_index": int(src), "label": label, "class": classes[label]}
            meta.update({k: int(v[src]) for k, v in raw.metadata.items()})
            sample = {"__key__": f"{index:08d}", "cls": str(label).encode(), "json": json.dumps(meta).encode()}
            for v, view in enumerate(views):
                sample["png" if len(views) == 1 else f"{view}.png"] = png(raw.images[src, v])
            writer.write(sample)
            written += 1
    columns = {"label": raw.labels[order].tolist()}
    columns.update({k: v[order].tolist() for k, v in raw.metadata.items()})
    return {"num_samples": len(order), "shards": shards, "columns": columns}


def verify(manifest: Manifest) -> None:
    """Check every shard of a local manifest against its recorded sha256; DataError naming the first bad one."""
    for split in manifest.splits.values():
        for shard in split.shards:
            path = Path(manifest.url(shard))
            if not path.is_file():
                raise DataError(
                    f"shard {path} is missing; delete {manifest.location} and run: {manifest.prepare_command()}"
                )
            if sha256_file(path) != shard.sha256:
                raise DataError(
                    f"shard {path} does not match its sha256 in the manifest (corrupt or "
                    f"changed); delete {manifest.location} and run: {manifest.prepare_command()}"
                )


def _clear_leftovers(out: Path) -> None:
    """Remove what a killed preparation left in `out`; refuse to touch shards of unknown origin."""
    ours = [p for p in out.iterdir() if OUR_FILES.match(p.name)]
    if not (out / MARKER).exists():
        if ours:
            raise DataError(
                f"{out} holds shard files ({ours[0].name}, ...) but no {MANIFEST} and no sign "
                "of an unfinished capsdist preparation; delete them or choose another --out"
            )
        return
    for path in ours:
        path.unlink()
