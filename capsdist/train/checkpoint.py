"""Checkpoints: atomic, checksummed save through Accelerate; verified load; retention; rollback.

A checkpoint is a directory run_dir/checkpoints/step-0000500/:

    model.safetensors       weights (Accelerate, safetensors)
    optimizer.bin           optimizer state (Accelerate; tensors and numbers, loaded with weights_only=True)
    scaler.pt               fp16 gradient scaler (Accelerate; weights_only=True), only with fp16
    random_states_<r>.pkl   RNG states of rank r (Accelerate; weights_only=True)
    trainer_state.json      capsdist's own state, JSON: TrainState (step, epoch, data position, best metric, ...)
                            and the data it was trained on (capsdist.data.data_identity)
    checkpoint.json         written last: format, world size, and the size and sha256 of every file above

This module is the only one that knows these names: the rest of capsdist saves and loads through `save`,
`load`, `read_state`, `read_data` and `read_checkpoint`. The learning rate is a function of the step
(train/optim.py), so no scheduler state is saved. Format 2 also held a LambdaLR's state dict: such checkpoints
still load (the
learning rate follows from their step), format 3 drops it.

Files are data: nothing in a checkpoint is unpickled into arbitrary objects (a crafted file is refused,
CheckpointError), and every file is checked against checkpoint.json before anything is loaded.
All ranks write into `.tmp-step-0000500`, meet at a barrier, then rank 0 hashes and fsyncs every file,
writes checkpoint.json atomically, renames the directory into place and fsyncs the parent, so a
directory named `step-*` is complete. `--resume auto` takes the newest checkpoint that verifies and
names, in a warning, what was wrong with any newer one; rank 0 makes that choice for all ranks, and every
rank checks that it can read the chosen one before anything is moved or pruned (`agree`). Resuming from an
older checkpoint moves the newer ones (and a newer `best`) to `checkpoints/abandoned-<time>/`: the run
continues from the past, and retention never deletes the new checkpoints in favour of the abandoned ones.
`best/` is a copy of the step checkpoint with the best selection metric. Deletions and replacements go through a rename
first (`.trash-*`, `.old-*`), so a kill at any moment leaves no half-deleted `step-*` and always a `best`
once one was written. The run directory must be on a filesystem every rank sees (multi-node: a shared one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from accelerate.utils import load as safe_load
from safetensors.torch import load as safetensors_load

from capsdist.core.errors import CapsdistError, CheckpointError, TrainingError
from capsdist.core.files import copy_durable, fsync_dir, sha256_file, storage_error, write_atomic

log = logging.getLogger(__name__)

STATE_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: trainer_state.json also held the LambdaLR's state, now ignored
META = "checkpoint.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.json"
REQUIRED_FILES = (WEIGHTS_FILE, "optimizer.bin", STATE_FILE)  # plus random_states_<r>.pkl per rank
_STEP_DIR = re.compile(r"^step-(\d{7,})$")
_LEFTOVER = re.compile(r"^\.(trash|old|tmp)-")  # renamed aside, or cut short by a kill


@dataclass
class TrainState:
    """Counters the trainer owns (accelerator.step is only the grad-accumulation counter); JSON in every checkpoint."""

    step: int = 0  # global optimizer steps done (non-finite, skipped steps included)
    epoch: int = 0  # epoch in progress
    batch_in_epoch: int = 0  # batches of `epoch` already consumed: the data position
    samples_seen: int = 0  # global training samples consumed (step * batch_size)
    batch_size: int = 0  # global batch size the counters were made with
    world_size: int = 1  # processes of the run that wrote the checkpoint
    nonfinite_total: int = 0  # non-finite losses skipped so far
    skipped_total: int = 0  # corrupt training samples skipped (data.skip_corrupt) so far
    epoch_skipped: int = 0  # of those, in `epoch`
    best_metric: float = -math.inf  # best selection metric (checkpoint.best_metric) so far
    best_step: int = -1  # step of `best`

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **dataclasses.asdict(self)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") not in READABLE_VERSIONS:
            raise CheckpointError(
                f"checkpoint state version {state.get('version')} is not one of {READABLE_VERSIONS}; "
                "this checkpoint was written by another capsdist version: start a new run directory"
            )
        for f in dataclasses.fields(self):
            value = state.get(f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise CheckpointError(f"checkpoint state {f.name}: {value!r} is not a number")
            setattr(self, f.name, value)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """Step checkpoints of the run that have their checkpoint.json, oldest first (not yet verified)."""
    return [path for _, path in step_dirs(run_dir) if (path / META).is_file()]


def step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-*` directory, complete or not, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := _STEP_DIR.match(path.name))]
    return sorted(found)


def verify(path: Path) -> str | None:
    """None when `path` is a complete checkpoint whose files match checkpoint.json; else what is wrong."""
    if not path.is_dir():
        return "not a directory"
    if not (path / META).is_file():
        legacy = (
            " (it holds pickled state from an older capsdist, which is never loaded)"
            if (path / "custom_checkpoint_0.pkl").exists()
            else ""
        )
        return f"no {META}{legacy}"
    try:
        meta = json.loads((path / META).read_text())
        files, world = meta["files"], meta["world_size"]
        if meta.get("format") not in READABLE_VERSIONS or not isinstance(files, dict) or not isinstance(world, int):
            return f"{META} is of format {meta.get('format')!r}, not one of {READABLE_VERSIONS}"
        required = [*REQUIRED_FILES, *(f"random_states_{r}.pkl" for r in range(world))]
        for name in required:
            if name not in files:
                return f"{name} is not listed in {META}"
        for name, entry in files.items():
            file = path / name
            if "/" in name or not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != entry["bytes"]:
                return f"{name} has {file.stat().st_size} bytes, {META} says {entry['bytes']} (truncated?)"
            if sha256_file(file) != entry["sha256"]:
                return f"{name} does not match its sha256 in {META} (corrupt)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{META} is unreadable ({err!r})"
    return None


def latest(run_dir: str | Path) -> Path | None:
    """The newest step checkpoint that verifies; a warning names each newer one that does not."""
    for _, path in reversed(step_dirs(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is unusable (%s); trying an older one", path, problem)
    return None


def resolve(run_dir: str | Path, which: str) -> Path:
    """Verified checkpoint for `which`: "latest", "best" or a path; CheckpointError if none or unusable."""
    if which == "latest":
        found = latest(run_dir)
        if found is None:
            raise CheckpointError(f"{checkpoint_dir(run_dir)}: no usable checkpoint; train first")
        return found
    if which == "best":
        path = checkpoint_dir(run_dir) / "best"
        _recover(path)
    else:
        path = Path(which)
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(
            f"{path}: not a usable checkpoint: {problem}; choose another checkpoint "
            "(--resume auto takes the newest one that verifies)"
        )
    return path


def agree(accelerator: Accelerator, choose: Callable[[], Path | None]) -> Path | None:
    """The checkpoint to resume on every rank: rank 0's `choose()` (None: none), broadcast, then read by every rank.

    Each rank verifies the chosen checkpoint in its own view of the run directory (a stale NFS cache can show a
    rank an older listing, or no such directory) and all compare the checkpoint.json they read. A CapsdistError of
    rank 0's choice, or a rank that cannot use the choice, is raised on every rank before anything is changed."""
    decision: list = [None, None]  # (path, error)
    if accelerator.is_main_process:
        try:
            decision[0] = choose()
        except CapsdistError as err:
            decision[1] = err
    path, error = broadcast_object_list(decision)
    if error is not None:
        raise error
    if path is None:
        return None
    problem = verify(path)
    views = gather_object([(problem, None if problem else sha256_file(path / META))])
    for rank, (problem, _) in enumerate(views):
        if problem is not None:
            raise CheckpointError(
                f"{path}: rank 0 chose it to resume from, but rank {rank} cannot use it ({problem}); every process "
                "must see the same run directory (a shared filesystem: after a requeue NFS can show a stale listing "
                "for its attribute cache time, actimeo); nothing was changed: resume again with --resume auto"
            )
    if len({digest for _, digest in views}) > 1:
        raise CheckpointError(
            f"{path}: the processes read different versions of its {META}; every process must see the same run "
            "directory (a shared filesystem); nothing was changed: resume again with --resume auto"
        )
    return path


def read_state(path: Path) -> TrainState:
    """The TrainState of a verified checkpoint (trainer_state.json: {"train": TrainState dict, "data": ...}; format
    2 also has a "scheduler" entry, ignored)."""
    return _parse_state(_read_state_file(path), path / STATE_FILE)


def read_data(path: Path) -> dict | None:
    """The data a verified checkpoint was trained on (capsdist.data.data_identity); None if it has no record."""
    return _state_entry(_read_state_file(path), path / STATE_FILE, "data", required=False)


def _read_state_file(path: Path) -> bytes:
    try:
        return (path / STATE_FILE).read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable ({err})") from None


def _state_entry(data: bytes, source: Path, key: str, required: bool = True) -> dict | None:
    """Entry `key` of the bytes of trainer_state.json read from `source`, a dict (None when absent and not
    `required`); CheckpointError."""
    try:
        saved = json.loads(data)
        entry = saved.get(key) if isinstance(saved, dict) else None
        if not isinstance(entry, dict) and (required or entry is not None):
            raise ValueError(f"expected the key {key} to hold an object")
    except ValueError as err:
        raise CheckpointError(f"{source}: unreadable ({err})") from None
    return entry


def _parse_state(data: bytes, source: Path) -> TrainState:
    """The TrainState in the bytes of trainer_state.json read from `source`."""
    state = TrainState()
    state.load_state_dict(_state_entry(data, source, "train"))
    return state


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], TrainState]:
    """The model's state dict (safetensors: plain tensors, no code) and the TrainState of a verified checkpoint.

    checkpoint.json, the weights and the state are each read once, and what was read is checked against it, so a
    checkpoint deleted or replaced since its verification (a training run's retention, a new `best`) is a
    CheckpointError, never a raw FileNotFoundError or a mix of two checkpoints."""
    names = (WEIGHTS_FILE, STATE_FILE)
    try:
        files = json.loads((path / META).read_bytes())["files"]
        data = {name: (path / name).read_bytes() for name in names}
    except FileNotFoundError as err:
        raise CheckpointError(
            f"{path}: deleted while it was read ({Path(err.filename).name} is gone: a training run's retention, "
            "checkpoint.keep_last, or a new best); evaluate again, or copy the checkpoint elsewhere first"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / META}: unreadable ({err!r})") from None
    for name in names:
        if hashlib.sha256(data[name]).hexdigest() != files.get(name, {}).get("sha256"):
            raise CheckpointError(
                f"{path}: replaced while it was read ({name} no longer matches {META}: a training run's new best "
                "or a checkpoint written again); evaluate again"
            )
    return safetensors_load(data[WEIGHTS_FILE]), _parse_state(data[STATE_FILE], path / STATE_FILE)


def assert_finite(model: torch.nn.Module) -> None:
    """Raise TrainingError if any parameter is NaN or infinite: such weights are never saved."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise TrainingError(
                f"parameter {name} is not finite; not checkpointing. Lower optim.lr, set optim.grad_clip "
                "or use train.mixed_precision=no, then resume from the last checkpoint"
            )


def save(accelerator: Accelerator, run_dir: str | Path, state: TrainState, keep_last: int, data: dict) -> Path:
    """Write step-<state.step>, with the `data` it was trained on (read_data), atomically on all ranks; rank 0
    prunes to the newest `keep_last`."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(root)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"train": state.state_dict(), "data": data}))
    except (OSError, RuntimeError) as err:  # RuntimeError: torch.save's C++ writer, on a full disk too
        error = storage_error(root, err)  # before the partial checkpoint, which filled the disk, is removed
        shutil.rmtree(tmp, ignore_errors=True)  # the older checkpoints are untouched
        if error is None:
            raise
        raise error from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p, fsync=True)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        write_atomic(
            tmp / META,
            json.dumps(
                {"format": STATE_VERSION, "world_size": accelerator.num_processes, "files": files}, indent=1
            ).encode(),
        )
        _replace(tmp, final)
        keep = set(step_checkpoints(run_dir)[-keep_last:])
        for _, old in step_dirs(run_dir):
            if old not in keep:
                _discard(old)
    accelerator.wait_for_everyone()
    return final


def copy_to_best(accelerator: Accelerator, source: Path) -> None:
    """Make `best/` a copy of the complete checkpoint `source` (rank 0, atomically)."""
    if accelerator.is_main_process:
        tmp = source.parent / ".tmp-best"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, copy_function=copy_durable)
        fsync_dir(tmp)
        _replace(tmp, source.parent / "best")
    accelerator.wait_for_everyone()


def abandon_newer(accelerator: Accelerator, run_dir: str | Path, state: TrainState) -> Path | None:
    """Move step checkpoints newer than `state.step` (and a newer or unusable `best`) to
    checkpoints/abandoned-<time>/ (rank 0; all ranks wait). The run now continues from the older
    checkpoint (or from scratch, when none was usable); `best` is chosen again from here. Nothing is
    deleted. Returns the folder, or None when nothing was newer."""
    accelerator.wait_for_everyone()  # every rank has chosen and loaded its checkpoint
    decision = [None, False]  # (folder, whether `best` went with it), decided by rank 0 for all
    if accelerator.is_main_process:
        root = checkpoint_dir(run_dir)
        newer = [path for step, path in step_dirs(run_dir) if step > state.step]
        best = root / "best"
        _recover(best)
        if best.is_dir() and (verify(best) is not None or read_state(best).step > state.step):
            newer.append(best)
        if newer:
            target = root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
            target.mkdir()
            for path in newer:
                path.rename(target / path.name)
            fsync_dir(root)
            log.warning(
                "resuming at step %d: moved the newer checkpoints %s to %s",
                state.step,
                ", ".join(p.name for p in newer),
                target,
            )
            decision = [str(target), best in newer]
    folder, best_moved = broadcast_object_list(decision)
    if best_moved:  # every rank must agree on when `best` improves (copy_to_best waits for all)
        state.best_metric, state.best_step = -math.inf, -1
    return Path(folder) if folder else None


def _replace(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is renamed to `.old-<name>` first and deleted after.

    A kill between the two renames leaves no `final`; `_recover` restores it from `tmp` or `.old-`."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _recover(final: Path) -> None:
    """Put back `final` when a kill inside `_replace` left only `.tmp-<name>` (complete) or `.old-<name>`."""
    for aside in (final.with_name(f".tmp-{final.name}"), final.with_name(f".old-{final.name}")):
        if final.exists():
            return
        if aside.is_dir() and verify(aside) is None:
            try:
                aside.rename(final)
            except OSError:  # another process (evaluate or resume on several ranks) restored it first
                continue
            log.warning("restored %s from %s (a previous run was killed while replacing it)", final, aside.name)
            return


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: renamed to `.trash-<name>` first, so a kill never leaves half of it."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash)


def _clear_leftovers(root: Path) -> None:
    """Remove what killed saves and deletions left (after putting back a `best` a kill took away)."""
    _recover(root / "best")
    for path in root.iterdir():
        if _LEFTOVER.match(path.name):
            shutil.rmtree(path, ignore_errors=True)


def load(accelerator: Accelerator, path: Path) -> TrainState:
    """Restore the model, optimizer, scaler and this rank's RNG from the verified checkpoint `path`, and return
    its counters. Pickled objects are refused: Accelerate loads with weights_only=True.

    Accelerate only logs at INFO when RNG states fail to load, so this checks them itself: with the
    same world size a missing or unrestored RNG state is an error; with another world size the
    data position still resumes at the same global sample count and RNG streams start afresh.
    """
    state = read_state(path)
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: a file holds pickled objects, not plain tensors and "
            f"numbers, so loading it could run code ({str(err).splitlines()[0]}); "
            "use a checkpoint written by capsdist"
        ) from None
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot load checkpoint ({err}); does it match this config?") from err
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    same_world = state.world_size == accelerator.num_processes
    if not rng_file.is_file():
        if same_world:
            raise CheckpointError(f"{rng_file}: RNG state of rank {accelerator.process_index} is missing")
        log.warning("%s: no RNG state for this rank (world size changed); RNG starts afresh", path)
        return state
    try:
        restored = torch.equal(safe_load(rng_file)["torch_manual_seed"], torch.get_rng_state())
    except (pickle.UnpicklingError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{rng_file}: not a plain RNG state ({str(err).splitlines()[0]})") from None
    if not restored:
        raise CheckpointError(f"{rng_file}: RNG state was not restored")
    return state
