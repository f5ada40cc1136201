"""capsdist.core.cpu_share: the intra-op threads follow what other processes leave of the machine's CPUs."""

import logging
import os
import signal
import subprocess
import time

import pytest
import torch

from capsdist.core.cpu_share import CpuShare

log = logging.getLogger("test")


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class FakeProc:
    """A /proc with a machine-wide runnable count and this process's threads (pid 1; pid 2 a loader worker)."""

    def __init__(self, root):
        self.root = root

    def set(self, runnable: int, own_running: dict[int, int]):
        (self.root / "stat").write_text(f"cpu  1 2 3\nprocs_running {runnable}\nprocs_blocked 0\n")
        for pid, running in own_running.items():
            for tid in range(3):
                task = self.root / str(pid) / "task" / str(pid * 10 + tid)
                task.mkdir(parents=True, exist_ok=True)
                state = "R" if tid < running else "S"
                (task / "stat").write_text(f"{pid} (python (x)) {state} 1 1 1\n")


def share(tmp_path, planned=2, cpus=2, **kw):
    proc = FakeProc(tmp_path)
    proc.set(1, {1: 1})
    torch.set_num_threads(planned)
    return proc, CpuShare(planned, log, proc=tmp_path, machine_cpus=cpus, pids=lambda: [1, 2], **kw)


def ticks(cpu_share, start, n, interval=0.25):
    """`n` samples `interval` s apart, each followed by a step's tick."""
    for i in range(n):
        cpu_share.sample(start + i * interval)
        cpu_share.tick()
    return start + n * interval


def test_alone_keeps_the_planned_threads(tmp_path):
    proc, s = share(tmp_path)
    proc.set(3, {1: 2, 2: 1})  # everything runnable is this process and its worker
    ticks(s, 0.0, 20)
    assert s.off_reason is None and s.threads == 2 and torch.get_num_threads() == 2


def test_another_process_takes_a_core_and_gives_it_back(tmp_path):
    proc, s = share(tmp_path)
    proc.set(2, {1: 1})  # one other runnable task on 2 CPUs
    t = ticks(s, 0.0, 5)
    assert s.threads == 1 and torch.get_num_threads() == 1
    proc.set(1, {1: 1})  # it ended
    ticks(s, t, 5)
    assert s.threads == 2 and torch.get_num_threads() == 2


def test_threads_are_the_cpus_others_leave(tmp_path):
    proc, s = share(tmp_path, planned=8, cpus=8)
    proc.set(4, {1: 1})  # 3 others on 8 CPUs
    ticks(s, 0.0, 5)
    assert s.threads == 5
    proc.set(20, {1: 1})  # more than the machine: at least one thread
    ticks(s, 2.0, 5)
    assert s.threads == 1


def test_a_passing_blip_changes_nothing(tmp_path):
    proc, s = share(tmp_path)
    t = ticks(s, 0.0, 4)
    proc.set(3, {1: 1})
    t = ticks(s, t, 2)  # 2 of the last 5 samples busy: the median is still idle
    proc.set(1, {1: 1})
    ticks(s, t, 3)
    assert s.threads == 2


def test_the_sampler_thread_samples_between_steps_and_stops(tmp_path):
    proc, s = share(tmp_path, interval_s=0.01)
    proc.set(2, {1: 1})
    s.start()
    deadline = time.monotonic() + 10
    while len(s.demands) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    s.tick()  # one long step later: the samples taken meanwhile decide at once
    s.close()
    assert s.threads == 1 and not s._sampler.is_alive()


def test_loader_workers_are_not_other_processes(tmp_path):
    proc, s = share(tmp_path)
    proc.set(2, {1: 1, 2: 1})  # the second runnable task is this process's own worker
    ticks(s, 0.0, 10)
    assert s.threads == 2


@pytest.mark.parametrize(
    "planned, env, affinity_narrow, on_cpu, stat, reason",
    [
        (1, None, False, True, True, "one intra-op thread planned"),
        (2, "2", False, True, True, "OMP_NUM_THREADS is set"),
        (2, None, True, True, True, "pinned"),
        (2, None, False, False, True, "does not run on the CPU"),
        (2, None, False, True, False, "not readable"),
    ],
)
def test_off_where_the_threads_are_not_its_choice(
    tmp_path, monkeypatch, planned, env, affinity_narrow, on_cpu, stat, reason
):
    if env:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    if affinity_narrow:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range((os.cpu_count() or 1) - 1)))
    if stat:
        FakeProc(tmp_path).set(5, {1: 1})
    torch.set_num_threads(planned)
    s = CpuShare(planned, log, on_cpu=on_cpu, proc=tmp_path, machine_cpus=2, pids=lambda: [1])
    ticks(s, 0.0, 10)
    assert reason in s.off_reason and reason in s.describe()
    assert torch.get_num_threads() == planned


def orphan_busy_loops(n: int) -> list[int]:
    """Start `n` busy loops that are not this process's descendants (their shell exits); their pids."""
    script = f"for i in $(seq {n}); do (while :; do :; done) >/dev/null 2>&1 & echo $!; done"
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid in out.split()]


def tick_until(s: CpuShare, threads: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while s.threads != threads and time.monotonic() < deadline:
        s.tick()
        time.sleep(0.01)


@pytest.mark.skipif(not os.path.isfile("/proc/stat"), reason="needs Linux /proc")
def test_real_machine_busy_processes_lower_the_threads_until_they_stop():
    """On the real /proc: two busy processes leave 1 of 3 CPUs, so 1 thread; once they stop, 2 again (a third
    stray runnable task elsewhere on the machine changes neither)."""
    torch.set_num_threads(2)
    s = CpuShare(2, log, interval_s=0.05, machine_cpus=3).start()
    assert s.off_reason is None, s.off_reason
    busy = orphan_busy_loops(2)
    try:
        tick_until(s, 1)
        assert s.threads == 1 and torch.get_num_threads() == 1, list(s.demands)
    finally:
        for pid in busy:
            os.kill(pid, signal.SIGKILL)
    tick_until(s, 2)
    s.close()
    assert s.threads == 2 and torch.get_num_threads() == 2, list(s.demands)
