"""trtcal.workers: Ray preprocessing, a dataset URL -> ONE calibration batch.

Modules:
    sources.py      datasets on any fsspec URL (image folders, file lists, Parquet with image bytes,
                    .npy/.npz) listed as sorted shards
    selection.py    which samples, seeded and independent of parallelism; stable sample ids
                    (numpy and the standard library only)
    preprocess.py   PreprocessSpec (frozen) and the transform: one encoded image or tensor row ->
                    the model-ready array; presets imagenet, efficientnet-lite, raw, or module:function
    build.py        build_batch: Ray tasks over the shards, rows written by sample id into one
                    batch (trtcal.batch), identical bytes whatever the number of workers
    ray_runtime.py  ray_session: connect to a cluster or start a local Ray, stop only what it started

The batch contract itself is trtcal.batch (docs/batch-format.md); the job that calls build_batch
is trtcal.orchestrator.job. See docs/architecture.md and docs/cluster.md.
"""
