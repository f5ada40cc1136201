"""The learning-rate and margin schedules count images seen: runs at batch 16 and 64 follow the same curves."""

import pytest

from capsdist.config import load_config
from capsdist.core.errors import ConfigError
from train_helpers import TRAIN, metrics, run, train_command


@pytest.mark.e2e
def test_lr_and_margin_agree_at_batch_16_and_64_against_images_seen(tiny_config, tmp_path):
    curves = {}
    for batch in (16, 64):
        run_dir = tmp_path / f"bs{batch}"
        settings = [
            f"train.batch_size={batch}",
            "data.val_fraction=0.2",  # 256 training images: whole batches of 16 and of 64
            "logging.every_steps=1",
            "eval.every_steps=1000",
            f"loss.max_margin_images={TRAIN}",  # the margin ramps over the run
        ]
        result = run(train_command(tiny_config, "--run-dir", str(run_dir), "--resume", "none", "--set", *settings))
        assert result.returncode == 0, result.stderr[-3000:]
        # step s logs the lr and margin of the update made after (s - 1) * batch images
        curves[batch] = {(m["step"] - 1) * batch: (m["lr"], m["margin"]) for m in metrics(run_dir) if "lr" in m}
    small, large = curves[16], curves[64]
    assert max(large) == max(small) - 48 == 2 * 256 - 64  # two epochs of 256 images each
    for images, (lr, margin) in large.items():
        assert small[images] == pytest.approx((lr, margin), rel=1e-12), images
    assert large[0][1] < large[max(large)][1]  # the margin moved: the test compares a curve, not a constant
    assert large[0][0] > large[max(large)][0]


@pytest.mark.parametrize(
    "old,new", [("loss.max_margin_steps", "max_margin_images"), ("optim.lr_decay_steps", "lr_decay_images")]
)
def test_step_counted_schedule_keys_say_what_replaced_them(tiny_config, old, new):
    with pytest.raises(ConfigError, match=f"{old}: replaced by .*{new}.*train.batch_size"):
        load_config(tiny_config, [f"{old}=20000"])
