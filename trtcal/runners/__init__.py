"""Runners: run the FP32 model over a calibration batch and collect per-tensor statistics.

* `base`: the `Runner` protocol, the collection loop written once (`BaseRunner.collect_stats`,
  `collect_counts`), the micro-batch feeder, batch layouts; `factory`: the one runner factory `make_runner`;
* `onnxruntime`: `OnnxRuntimeRunner` (ONNX Runtime, host reductions);
* `torch_runner`: `TorchRunner` and `OrtDeviceRunner` (reductions on the device, via
  `gpu_histogram`); `torch_graph`: the ONNX interpreter on PyTorch that `TorchRunner` runs;
* `data_parallel`: row slices over several worker processes, merged exactly;
* `tensorrt`: the TensorRT adapter (calibrators that feed a batch, engine build, cache replay).

The model itself (loading, inputs, tensor selection) is `trtcal.model`; batches are `trtcal.batch`.
"""
