"""Speed on a shared CPU: launch/bench.py alone, two side by side, and beside a training run with loader
workers; and the trainer's own images/s for several loader worker counts. Every run is a subprocess.

Each figure is measured under each OpenMP wait policy asked for (PASSIVE is capsdist's default, ACTIVE the
OpenMP default that spins), so the effect of the thread settings can be read off one JSON:
    {"settings": ..., "bench": {policy: {"alone": r, "side_by_side": [r, r], "beside_training": r,
                                         "side_by_side_slowdown": x, "beside_training_slowdown": x}},
     "trainer": {workers: {"images_per_s": median over log windows after the first, "windows": [...]}},
     "bench_same_shape": r}
where r is launch/bench.py's JSON line and a slowdown is alone / busy train images/s.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Plan:
    bench: list[str]  # launch/bench.py arguments of the bench figures
    bench_same_shape: list[str]  # launch/bench.py arguments matching the training run's model, shape and batch
    train_config: str  # the training runs' config
    train_overrides: list[str]  # and its overrides (key=value)
    train_steps: int  # steps of each trainer speed run (logging.every_steps sets the windows)
    workers: list[str] = field(default_factory=lambda: ["0", "1", "2", "auto"])
    policies: list[str] = field(default_factory=lambda: ["PASSIVE", "ACTIVE"])


def _env(policy: str) -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_WAIT_POLICY=policy, WANDB_MODE="disabled")


def _start_bench(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "bench.py"), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"launch/bench.py exited {proc.returncode}: {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def benches(args: list[str], env: dict, count: int) -> list[dict]:
    """`count` launch/bench.py runs started together; their JSON results."""
    procs = [_start_bench(args, env) for _ in range(count)]
    return [_result(p) for p in procs]


def _start_training(plan: Plan, run_dir: Path, env: dict, extra: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "--config",
        plan.train_config,
        "--run-dir",
        str(run_dir),
        "--resume",
        "none",
        "--set",
        *plan.train_overrides,
        "logging.wandb.mode=disabled",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )  # its own process group: the loader workers stop with it


def _windows(run_dir: Path) -> list[float]:
    """perf/images_per_s of each log window so far (metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["perf/images_per_s"] for r in rows if "perf/images_per_s" in r]


def beside_training(plan: Plan, env: dict, work: Path) -> dict:
    """launch/bench.py while a training run (with its loader workers) trains: started once the run logged a
    first window, the run stopped by SIGTERM after the bench."""
    proc = _start_training(plan, work / "beside", env, ["train.max_steps=1000000"])
    try:
        while not _windows(work / "beside"):
            if proc.poll() is not None:
                raise RuntimeError(f"the training run exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
        return benches(plan.bench, env, 1)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def trainer_speed(plan: Plan, workers: str, env: dict, work: Path) -> dict:
    """The trainer's images/s (data loading included) with data.num_workers=`workers`: the median over the log
    windows after the first (start-up)."""
    run_dir = work / f"workers-{workers}"
    proc = _start_training(
        plan, run_dir, env, [f"train.max_steps={plan.train_steps}", f"data.num_workers={workers}", "eval.test=false"]
    )
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"launch/train.py exited {proc.returncode}: {err[-2000:]}")
    windows = _windows(run_dir)
    timed = windows[1:] or windows
    return {"images_per_s": round(statistics.median(timed), 2), "windows": [round(w, 2) for w in windows]}


def measure(plan: Plan) -> dict:
    """Every figure of the plan (see the module docstring)."""
    out: dict = {"settings": asdict(plan), "cores": len(os.sched_getaffinity(0)), "bench": {}, "trainer": {}}
    with tempfile.TemporaryDirectory(prefix="capsdist-busy-") as tmp:
        work = Path(tmp)
        for policy in plan.policies:
            env = _env(policy)
            alone = benches(plan.bench, env, 1)[0]
            pair = benches(plan.bench, env, 2)
            beside = beside_training(plan, env, work / policy)
            speed = alone["train_images_per_s"]
            out["bench"][policy] = {
                "alone": alone,
                "side_by_side": pair,
                "beside_training": beside,
                "side_by_side_slowdown": round(speed / min(r["train_images_per_s"] for r in pair), 2),
                "beside_training_slowdown": round(speed / beside["train_images_per_s"], 2),
            }
        env = _env(plan.policies[0])
        for workers in plan.workers:
            out["trainer"][workers] = trainer_speed(plan, workers, env, work)
        out["bench_same_shape"] = benches(plan.bench_same_shape, env, 1)[0]
    return out
