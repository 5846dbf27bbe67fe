"""Issue 15 item 10: a real multi-node Ray on one host (`ray.cluster_utils.Cluster`: a head and two
worker nodes, each its own raylet process with its own resources). The head has no CPU, so the
preprocessing tasks and the calibration actor run on other nodes than the driver; the batch reaches
the actor through the object store. The result must be byte-identical to a single-node run.

Each cluster runs in a child process of its own (this session's `ray_local` stays untouched).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.tiny_cnn import tiny_cnn
from trtcal.demo.demo import write_photo_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

_CHILD = r'''
import json, logging, sys
from pathlib import Path
work, mode = Path(sys.argv[1]), sys.argv[2]
import ray
from trtcal.config import JobConfig
from trtcal.orchestrator.job import calibrate_dataset
said = []
class Keep(logging.Handler):
    def emit(self, record): said.append(record.getMessage())
logging.getLogger("trtcal.orchestrator.actor").setLevel(logging.INFO)
logging.getLogger("trtcal.orchestrator.actor").addHandler(Keep())
cluster = None
if mode == "multi":
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 150 << 20})
    for name in ("a", "b"):
        cluster.add_node(num_cpus=1, resources={"node_" + name: 1}, object_store_memory=150 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
try:
    cfg = JobConfig().with_options(store=str(work / ("store-" + mode)), output=str(work / ("out-" + mode)), num_samples=8,
                                   preprocess="imagenet", device="cpu", workers=2, export_qdq=False)
    result = calibrate_dataset(str(work / "tiny224.onnx"), str(work / "photos"), config=cfg)
    nodes = len([n for n in ray.nodes() if n["Alive"]]) if ray.is_initialized() else 1
    print(json.dumps({"key": result.key, "batch_key": result.batch_key, "nodes": nodes, "actor": said}))
finally:
    if ray.is_initialized():
        ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
'''


def _run(work: Path, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO_ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(work), mode], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_three_node_cluster_gives_the_bytes_of_one_node(tmp_path: Path) -> None:
    (tmp_path / "tiny224.onnx").write_bytes(tiny_cnn(side=224).SerializeToString())
    write_photo_dataset(tmp_path / "photos", ("astronaut", "coffee"), 4, 0)
    multi = _run(tmp_path, "multi")
    single = _run(tmp_path, "single")
    assert multi["nodes"] == 3
    # The actor is not on the driver's node (the head has no CPU): the batch went through the object store.
    assert any("sent through the object store" in line for line in multi["actor"]), multi["actor"]
    assert multi["key"] == single["key"]
    for name in ("calibration.cache", "ranges.json", "histograms.npy"):
        assert (tmp_path / "out-multi" / name).read_bytes() == (tmp_path / "out-single" / name).read_bytes(), name
