"""Datasets as WebDataset shards: prepare once, stream per rank and per loader worker.

formats     raw readers: NORB binary matrix (smallNORB .mat), IDX (MNIST-likes)
sources     dataset registry, official checksums, downloads, raw splits
shards      shard + manifest writing (atomic, reproducible, verified on re-run)
manifest    the manifest: load_manifest, shard locations (paths, URLs, pipe: templates)
plan        validation/viewpoint selection and per-epoch rank/worker plans (pure functions)
transforms  per-sample transforms (the paper's smallNORB preprocessing, MNIST-likes)
pipeline    the loaders: DataOptions, Batch, train_loader, eval_loader, steps_per_epoch, input_shape

See docs/data.md.
"""
