"""Speed on a shared CPU: bench alone, two benches side by side, a bench beside a training run with loader workers,
and the trainer's images/s with 0, 1, 2 and auto loader workers; one JSON. Every run is a subprocess of this script:
launch/bench.py and launch/train.py of this checkout.

    python launch/measure_cpu.py --out cpu-speed.json                    # every figure (~15 min, 2 cores)
    python launch/measure_cpu.py --out cpu.json --policies default --workers 0 auto   # a subset
    python launch/measure_cpu.py --out tiny.json --tiny                  # tiny models, seconds per run (tests)

Defaults: the full preset at batch 8 on the reference shape (1x32x32, 5 classes, 3 iterations) for the bench
figures; configs/fashion-mnist.yaml (shards/fashion-mnist, prepared on first use) for the training runs, and
launch/bench.py on its model, shape and batch for comparison. Run it on an otherwise quiet machine.

Each bench figure is measured under each OpenMP wait policy asked for (`default`: OMP_WAIT_POLICY unset, what the
training scripts run with: a spin of capsdist's GOMP_SPINCOUNT, then sleep, and capsdist's CPU share; PASSIVE
sleeps at once, ACTIVE always spins), so the effect of the thread settings can be read off one JSON:
    {"settings": ..., "bench": {policy: {"alone": r, "side_by_side": [r, r], "beside_training": r,
                                         "side_by_side_slowdown": x, "beside_training_slowdown": x}},
     "trainer": {workers: {"images_per_s": median over log windows after the first, "windows": [...]}},
     "bench_same_shape": r}
where r is launch/bench.py's JSON line and a slowdown is alone / busy train images/s.
"""

from __future__ import annotations

import argparse
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

from capsdist.core.errors import run_cli

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Plan:
    bench: list[str]  # launch/bench.py arguments of the bench figures
    bench_same_shape: list[str]  # launch/bench.py arguments matching the training run's model, shape and batch
    train_config: str  # the training runs' config
    train_overrides: list[str]  # and its overrides (key=value)
    train_steps: int  # steps of each trainer speed run (logging.every_steps sets the windows)
    workers: list[str] = field(default_factory=lambda: ["0", "1", "2", "auto"])
    policies: list[str] = field(default_factory=lambda: list(POLICIES))


POLICIES = ("default", "PASSIVE", "ACTIVE")  # default: OMP_WAIT_POLICY unset


def _env(policy: str) -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return dict(
        env, PYTHONPATH=path, WANDB_MODE="disabled", **({} if policy == "default" else {"OMP_WAIT_POLICY": policy})
    )


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


TINY_MODEL = ["model.A=8", "model.B=2", "model.C=2", "model.D=2", "model.iterations=1"]


def plan_for(tiny: bool) -> Plan:
    if tiny:
        return Plan(
            bench=[
                "--config",
                "configs/small.yaml",
                "--batch-size",
                "2",
                "--steps",
                "1",
                "--warmup",
                "0",
                *[a for kv in TINY_MODEL for a in ("--set", kv)],
            ],
            bench_same_shape=[
                "--config",
                "configs/quickstart.yaml",
                "--batch-size",
                "16",
                "--steps",
                "1",
                "--warmup",
                "0",
                *[a for kv in TINY_MODEL for a in ("--set", kv)],
            ],
            train_config="configs/quickstart.yaml",
            train_overrides=[
                *TINY_MODEL,
                f"data.shards={REPO / 'shards' / 'fashion-mnist-mini'}",
                "train.batch_size=16",
                "logging.every_steps=1",
                "checkpoint.every_steps=0",
            ],
            train_steps=3,
        )
    return Plan(
        bench=[
            "--config",
            "configs/full.yaml",
            "--in-channels",
            "1",
            "--input-size",
            "32",
            "--classes",
            "5",
            "--batch-size",
            "8",
            "--steps",
            "8",
            "--warmup",
            "2",
        ],
        bench_same_shape=[
            "--config",
            "configs/fashion-mnist.yaml",  # at its train.batch_size, as the training runs
            "--steps",
            "10",
            "--warmup",
            "1",
        ],
        train_config="configs/fashion-mnist.yaml",
        train_overrides=[],
        train_steps=100,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="tiny models and runs (for tests)")
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        choices=POLICIES,
        help="OMP_WAIT_POLICY values to measure the bench figures under (default: unset, the training scripts')",
    )
    parser.add_argument("--workers", nargs="+", default=["0", "1", "2", "auto"], help="data.num_workers values")
    args = parser.parse_args(argv)

    def body():
        plan = plan_for(args.tiny)
        plan.policies, plan.workers = args.policies, args.workers
        result = measure(plan)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
