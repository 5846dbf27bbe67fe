"""trtcal.export: what is made from calibration statistics, and how good it is.

Modules:
    artifacts.py    statistics -> file bytes in memory: calibration.<method>.cache, ranges.json,
                    histograms, manifest (written to a directory by trtcal._io.publish_dir)
    qdq.py          build_qdq(model, scales, QdqConfig) -> QdqExport (model + QdqReport);
                    qdq_from_cache(model, cache_bytes); read_ranges / amax_for_method:
                    the Q/DQ ONNX model for TensorRT explicit quantization (`trtcal export qdq`)
    evaluate.py     evaluate(model, {name: qdq_model}, inputs, EvalConfig) -> EvaluationResult:
                    INT8-vs-FP32 top-1/top-5/SQNR, simulated exactly (`trtcal eval`)
    sensitivity.py  rank_sensitivity / fallback_auto: per-layer sensitivity and automatic float
                    fallback to a target agreement (`trtcal eval --sensitivity/--fallback`)
    report.py       load_report_data(result_dir) / render_report / write_report: one self-contained
                    HTML page of a calibration (`trtcal report`)

Never imports ray. The Q/DQ rules: docs/qdq.md and docs/algorithms.md ("Q/DQ for TensorRT"); why
simulation and not ONNX Runtime's int8 kernels: docs/platform.md.
"""
