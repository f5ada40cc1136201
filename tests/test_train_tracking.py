"""The Tracker's end of a run on every rank, not only on rank 0 which writes the metrics."""

from types import SimpleNamespace

import pytest

from capsdist.train.tracking import Tracker


@pytest.mark.parametrize("main", [True, False])
def test_finish_ends_the_accelerate_run_on_every_rank(tmp_path, main):
    """Every rank must destroy its process group before interpreter exit: a gloo group left to exit aborts the
    process ("terminate called without an active exception") and the launcher reports the run failed."""
    ended = []
    accelerator = SimpleNamespace(is_main_process=main, end_training=lambda: ended.append(True))
    tracker = Tracker(accelerator, tmp_path, wandb_enabled=False)
    tracker.finish()
    assert ended == [True]
    assert (tmp_path / "metrics.jsonl").is_file() == main
    tracker.finish()  # a second finish (an error path after the first) does nothing more
    assert ended == [True]
