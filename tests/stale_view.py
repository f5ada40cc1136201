"""launch/train.py with rank 1 seeing an older view of the run directory, as NFS can show it after a requeue.

STALE_VIEW_HIDE names a checkpoint directory (step-0000006) that rank 1 does not list; with STALE_VIEW_GONE=1
rank 1 cannot read it either. Run it in place of launch/train.py (train_helpers.train_command(script=...)).
"""

import os
import runpy
import sys
from pathlib import Path

from capsdist.core.cli import setup_process

setup_process()  # before torch is imported, as launch/train.py does

from capsdist.train import checkpoint  # noqa: E402

if os.environ.get("RANK") == "1":
    hidden = os.environ["STALE_VIEW_HIDE"]
    listed, verify = checkpoint.step_dirs, checkpoint.verify
    checkpoint.step_dirs = lambda run_dir: [(step, path) for step, path in listed(run_dir) if path.name != hidden]
    if os.environ.get("STALE_VIEW_GONE") == "1":
        checkpoint.verify = lambda path: "not a directory" if Path(path).name == hidden else verify(path)

train = Path(__file__).resolve().parents[1] / "launch" / "train.py"
sys.argv[0] = str(train)
runpy.run_path(str(train), run_name="__main__")
