"""`accelerate launch` that stops cleanly on SIGTERM: `python -m capsdist.train.launch [accelerate launch arguments]`.

torch's elastic agent (behind `accelerate launch` and `torchrun`) turns a SIGTERM to the launcher into
a SignalException: it signals the workers, gives them 30 s, and exits 1 with a traceback even when
every worker checkpointed and exited 0. Here the agent is told to leave SIGTERM alone; this process
passes it on to the training processes, the agent sees them finish, and the exit status is theirs
(0 after the checkpoint). Every other signal and failure is handled by accelerate and torch as usual.
"""

from __future__ import annotations

import os
import signal
import sys

import psutil

# the signals torch's elastic agent turns into SignalException: torchrun's --signals-to-handle (its PET_ variable,
# in recent torch), which it copies to TORCHELASTIC_SIGNALS_TO_HANDLE (read directly by older versions)
_AGENT_SIGNALS = ("PET_SIGNALS_TO_HANDLE", "TORCHELASTIC_SIGNALS_TO_HANDLE")


def _forward(signum: int, frame) -> None:
    """Pass the signal on to every process this launcher started (loader workers ignore it)."""
    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser

    for name in _AGENT_SIGNALS:
        handled = os.environ.get(name, "SIGTERM,SIGINT,SIGHUP,SIGQUIT").split(",")
        os.environ[name] = ",".join(s for s in handled if s.strip() != "SIGTERM")
    signal.signal(signal.SIGTERM, _forward)
    launch_command(launch_command_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
