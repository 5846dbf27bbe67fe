"""trtcal.orchestrator: running a calibration job, in this process or on a Ray cluster.

Modules:
    job.py        calibrate_dataset(model, data_url, config=JobConfig, progress) -> DatasetResult:
                  `trtcal calibrate MODEL --data URL` as named steps (open, lookup, obtain the batch,
                  run the actor, publish, copy out), each testable without Ray
    actor.py      the calibration actor (module level): typed ActorRequest -> ActorResult; runs the
                  runner's two passes and every scale search where the batch lives
    keys.py       the cache key and the batch key of a job (what makes two runs the same)
    calibrate.py  trtcal.calibrate(model, batch, ...) -> CalibrationResult: the same computation
                  in-process on a batch that already exists; artifacts published atomically
    jobs.py       Ray Jobs: submit_job / job_status / job_logs / stop_job / list_jobs behind
                  `trtcal submit` and `trtcal jobs` (credentials never travel in the entrypoint)

Configuration lives in trtcal/config.py; the batch is built by trtcal.workers; statistics come from
trtcal.runners; artifacts are encoded by trtcal.export.artifacts and stored by trtcal.storage.
See docs/architecture.md (data flow) and docs/cluster.md (Ray, stores, deployment).
"""
