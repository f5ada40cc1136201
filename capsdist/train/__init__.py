"""Training: what a run builds from its config, the trainer and its parts, the benchmark of its step, the launcher.

build        the run's Accelerator, data options and manifest (prepared on first use), and the model for its data
trainer      the training loop (Trainer(cfg).fit()); step, update, optim: one global step
metrics, evaluator, checkpointer   what the trainer does at its steps (with tracking, health, evaluation,
             checkpoint, lock)
benchmark    speed and memory of the trainer's step on synthetic input (launch/bench.py)
launch       `python -m capsdist.train.launch`: `accelerate launch` that stops cleanly on SIGTERM
"""
