"""Checkpoints: atomic save through Accelerate, retention, exact resume.

A checkpoint is a directory run_dir/checkpoints/step-0000500/ written by `accelerator.save_state`:
rank 0 writes the model (model.safetensors), optimizer, scaler and every registered object
(`TrainState` first: step, epoch, data position, best metric; then the learning-rate
scheduler); every rank writes its own RNG state (random_states_<rank>.pkl). All ranks write into a temporary
directory `.tmp-step-0000500`, meet at a barrier, then rank 0 renames it into place, so a
directory named `step-*` is always complete and `--resume auto` can never pick a half-written
one. `best/` is a copy of the step checkpoint with the best selection metric.
The run directory must be on a filesystem every rank sees (multi-node: a shared one).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from capsdist.errors import CheckpointError, TrainingError

log = logging.getLogger(__name__)

STATE_VERSION = 1
REQUIRED_FILES = ("model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl")
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


@dataclass
class TrainState:
    """Counters the trainer owns (accelerator.step is only the grad-accumulation counter).

    Registered with `accelerator.register_for_checkpointing`, so it travels in every checkpoint.
    """

    step: int = 0  # global optimizer steps done (non-finite, skipped steps included)
    epoch: int = 0  # epoch in progress
    batch_in_epoch: int = 0  # batches of `epoch` already consumed: the data position
    samples_seen: int = 0  # global training samples consumed (step * batch_size)
    batch_size: int = 0  # global batch size the counters were made with
    world_size: int = 1  # processes of the run that wrote the checkpoint
    nonfinite_total: int = 0  # non-finite losses skipped so far
    best_metric: float = -math.inf  # best selection metric (checkpoint.best_metric) so far
    best_step: int = -1  # step of `best`

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **dataclasses.asdict(self)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"checkpoint state version {state.get('version')} is not {STATE_VERSION}; "
                "this checkpoint was written by another capsdist version: start a new run directory"
            )
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of the run, oldest first (temporary and incomplete ones skipped)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if not match:
            continue
        if not is_complete(path):
            log.warning("ignoring incomplete checkpoint %s", path)
            continue
        found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in REQUIRED_FILES)


def resolve(run_dir: str | Path, which: str) -> Path:
    """Checkpoint directory for `which`: "latest", "best" or a path; CheckpointError if absent."""
    if which == "latest":
        found = step_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"{checkpoint_dir(run_dir)}: no complete checkpoint; train first")
        return found[-1]
    path = checkpoint_dir(run_dir) / "best" if which == "best" else Path(which)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (expected {', '.join(REQUIRED_FILES)})")
    return path


def assert_finite(model: torch.nn.Module) -> None:
    """Raise TrainingError if any parameter is NaN or infinite: such weights are never saved."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise TrainingError(
                f"parameter {name} is not finite; not checkpointing. Lower optim.lr, set optim.grad_clip "
                "or use train.mixed_precision=no, then resume from the last checkpoint"
            )


def save(accelerator: Accelerator, run_dir: str | Path, state: TrainState, keep_last: int) -> Path:
    """Write step-<state.step> atomically on all ranks; rank 0 prunes to the newest `keep_last`."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace(tmp, final)
        for old in step_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def copy_to_best(accelerator: Accelerator, source: Path) -> None:
    """Make `best/` a copy of the complete checkpoint `source` (rank 0, atomically)."""
    if accelerator.is_main_process:
        tmp = source.parent / ".tmp-best"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        _replace(tmp, source.parent / "best")
    accelerator.wait_for_everyone()


def _replace(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and deleted after."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load(accelerator: Accelerator, path: Path, state: TrainState) -> None:
    """Restore everything from `path` (model, optimizer, scheduler, scaler, counters, this rank's RNG).

    Accelerate only logs at INFO when RNG states fail to load, so this checks them itself: with the
    same world size a missing or unrestored RNG state is an error; with another world size the
    data position still resumes at the same global sample count and RNG streams start afresh.
    """
    rng_file = path / f"random_states_{accelerator.process_index}.pkl"
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: cannot load checkpoint ({err}); does it match this config?") from err
    same_world = state.world_size == accelerator.num_processes
    if not rng_file.is_file():
        if same_world:
            raise CheckpointError(f"{rng_file}: RNG state of rank {accelerator.process_index} is missing")
        log.warning("%s: no RNG state for this rank (world size changed); RNG starts afresh", path)
        return
    saved = torch.load(rng_file, weights_only=False)
    if not torch.equal(saved["torch_manual_seed"], torch.get_rng_state()):
        raise CheckpointError(f"{rng_file}: RNG state was not restored")
