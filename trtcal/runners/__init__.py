"""trtcal.runners: FP32 statistics of every calibrated tensor over a calibration batch.

A runner runs the model; the collection loop is shared: pass 1 reduces exact per-tensor statistics
(max |x|, signed min/max, non-finite counts), pass 2 fills |x| histograms on [0, max |x|]. Both are
integer or exact reductions, so slices, workers and micro-batches merge bit for bit.

Modules:
    base.py           the Runner protocol, the collection loop written once (collect_stats,
                      collect_counts, collect_sliced), the one runner factory
    onnxruntime.py    OnnxRuntimeRunner: ONNX Runtime with every requested tensor as an output (CPU/CUDA)
    torch_graph.py    the ONNX-on-PyTorch interpreter (ONNX graph -> torch ops, FP32, no TF32)
    torch_runner.py   TorchRunner / OrtDeviceRunner: activations produced and reduced on the GPU
    gpu_histogram.py  device kernels for pass 1 and pass 2 (torch or CuPy), bit-equal to trtcal.core
    data_parallel.py  DataParallelStatistics: k worker processes, one contiguous slice of rows each
    tensorrt/         TensorRT 10: live IInt8 calibrators fed from the batch, cache replay with a
                      retargeted header, build_engine (`trtcal engine build`); imports TensorRT lazily

Never imports ray; only tensorrt/ imports TensorRT. See docs/algorithms.md (collection) and
docs/tensorrt.md.
"""
