"""deploy/: every manifest parses and holds what trtcal and the cluster rely on.

No Kubernetes, AWS or Docker engine here: the KubeRay manifests are checked field by field, the
cluster-launcher YAML against the schema Ray ships (ray/autoscaler/ray-schema.json), the RayJob
entrypoint against trtcal's real CLI parser, and the Dockerfiles by their instructions. Versions must
agree everywhere: one Ray version (the one installed here), one Python across the images, one trtcal
version (trtcal.__version__) in every image tag and pip pin.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from trtcal._version import __version__

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RAYJOB = DEPLOY / "kuberay" / "rayjob-calibrate.yaml"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
LAUNCHER = DEPLOY / "aws" / "cluster.yaml"
RUNTIME_ENV = DEPLOY / "runtime-env.example.yaml"
IMAGE_REPO = "registry.example.com/trtcal"
CPU_IMAGE = f"{IMAGE_REPO}:{__version__}-cpu"
GPU_IMAGE = f"{IMAGE_REPO}:{__version__}-gpu"
S3_SECRET = "trtcal-s3"
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")


def _load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one document, got {len(docs)}"
    assert isinstance(docs[0], dict)
    return docs[0]


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _groups(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


def _containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    containers = group["template"]["spec"]["containers"]
    assert isinstance(containers, list) and containers
    return containers


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _ray_version() -> str:
    import ray

    return str(ray.__version__)


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def _args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            found[name] = default
    return found


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


# --------------------------------------------------------------------------- every file


def test_every_yaml_under_deploy_parses_and_is_named_in_the_readme() -> None:
    readme = (DEPLOY / "README.md").read_text()
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md")
    assert {p.name for p in files} >= {
        "Dockerfile.cpu",
        "Dockerfile.gpu",
        "rayjob-calibrate.yaml",
        "raycluster.yaml",
        "cluster.yaml",
    }
    for path in files:
        if path.suffix in (".yaml", ".yml"):
            assert list(yaml.safe_load_all(path.read_text())), path
        assert str(path.relative_to(DEPLOY)) in readme, (
            f"deploy/README.md does not explain {path.relative_to(DEPLOY)}"
        )


# --------------------------------------------------------------------------- KubeRay


def test_rayjob_runs_trtcal_calibrate_against_an_s3_store() -> None:
    job = _load(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("trtcal calibrate ")
    words = shlex.split(entrypoint)
    assert words[words.index("--store") + 1].startswith("s3://")
    assert words[words.index("--data") + 1].startswith("s3://")
    # Joins the cluster the RayJob created instead of starting an embedded Ray inside the head pod.
    assert words[words.index("--address") + 1] == "auto"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env
    assert not any(
        k.startswith("AWS_") and k != "AWS_DEFAULT_REGION" for k in runtime_env.get("env_vars", {})
    )


def test_rayjob_entrypoint_is_a_valid_trtcal_command_line() -> None:
    from trtcal.cli import build_parser

    words = shlex.split(_load(RAYJOB)["spec"]["entrypoint"])
    try:
        args = build_parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(
            f"{RAYJOB.relative_to(DEPLOY.parent)}: its entrypoint is not a valid `trtcal calibrate` command "
            "line (argparse's message is above); update the manifest or the CLI so they agree"
        )
    assert args.func.__module__ == "trtcal.cli.cmd_calibrate"


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=["rayjob", "raycluster"])
def test_ray_cluster_spec(path: Path) -> None:
    manifest = _load(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] in ("RayJob", "RayCluster")
    spec = _cluster_spec(manifest)
    assert spec["rayVersion"] == _ray_version()
    assert spec["authOptions"]["mode"] == "token"
    if manifest["kind"] == "RayCluster":
        # Clients read the token from a Secret they know the name of.
        assert spec["authOptions"]["secretName"] == "trtcal-ray-token"

    gpu_groups = []
    for name, group in _groups(spec):
        for container in _containers(group):
            gpus = _gpus(container)
            assert container["image"] == (GPU_IMAGE if gpus else CPU_IMAGE), (path.name, name)
            requests = container.get("resources", {}).get("requests", {})
            assert int(requests.get("nvidia.com/gpu", gpus)) == gpus, (path.name, name)
            if gpus:
                gpu_groups.append(name)
        if name == "head":
            ports = {p["containerPort"] for p in _containers(group)[0]["ports"]}
            assert {6379, 8265} <= ports
    assert len(gpu_groups) == 1, f"{path.name}: want exactly one GPU worker group, got {gpu_groups}"
    gpu_group = next(g for n, g in _groups(spec) if n == gpu_groups[0])
    assert all(_gpus(c) == 1 for c in _containers(gpu_group))


@pytest.mark.parametrize("path", [RAYJOB, RAYCLUSTER], ids=["rayjob", "raycluster"])
def test_s3_credentials_come_from_the_secret_only(path: Path) -> None:
    spec = _cluster_spec(_load(path))
    for name, group in _groups(spec):
        for container in _containers(group):
            env = {e["name"]: e for e in container.get("env", [])}
            for var in S3_ENV:
                assert var in env, (path.name, name, var)
                assert "value" not in env[var], f"{path.name}: {var} must not be written in the manifest"
                ref = env[var]["valueFrom"]["secretKeyRef"]
                assert (ref["name"], ref["key"]) == (S3_SECRET, var), (path.name, name)
            # The endpoint is only for S3-compatible stores; AWS S3 itself has none.
            assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"].get("optional") is True
            assert not env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"].get("optional", False)
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)


# --------------------------------------------------------------------------- Ray cluster launcher


def test_cluster_launcher_config_matches_rays_schema() -> None:
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _load(LAUNCHER)
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"

    ray_version = _ray_version()
    images = {config["docker"]["image"]}
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"]), "the head needs no GPU"
    gpu_types = [n for n, t in node_types.items() if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])]
    assert len(gpu_types) == 1
    gpu = node_types[gpu_types[0]]
    assert gpu["min_workers"] >= 1
    images.add(gpu["docker"]["worker_image"])
    assert images == {f"rayproject/ray:{ray_version}-py311-cpu", f"rayproject/ray:{ray_version}-py311-gpu"}
    assert f'pip install "trtcal[s3]=={__version__}"' in config["setup_commands"]
    assert any(f'"trtcal[s3,tensorrt,gpu]=={__version__}"' in c for c in gpu["worker_setup_commands"])
    # Token auth on every node, and the dashboard only on the head's loopback (reached through SSH).
    for command in (*config["head_start_ray_commands"], *config["worker_start_ray_commands"]):
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]


# --------------------------------------------------------------------------- runtime env example


def test_runtime_env_example_installs_this_trtcal_and_holds_no_secrets() -> None:
    from trtcal.orchestrator.jobs import load_runtime_env

    env = load_runtime_env(RUNTIME_ENV)
    assert f"trtcal[s3]=={__version__}" in env["pip"]
    assert not any(re.search(r"KEY|SECRET|TOKEN|PASSWORD", k) for k in env.get("env_vars", {}))


# --------------------------------------------------------------------------- Dockerfiles


def test_dockerfiles_build_on_the_right_bases_and_install_trtcal() -> None:
    cpu = _dockerfile(DEPLOY / "Dockerfile.cpu")
    gpu = _dockerfile(DEPLOY / "Dockerfile.gpu")
    cpu_args, gpu_args = _args(cpu), _args(gpu)

    cpu_from = [_expand(rest, cpu_args) for kw, rest in cpu if kw == "FROM"]
    gpu_from = [_expand(rest, gpu_args) for kw, rest in gpu if kw == "FROM"]
    assert cpu_from == [f"python:{cpu_args['PYTHON_VERSION']}-slim"]
    assert len(gpu_from) == 1 and re.fullmatch(r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3", gpu_from[0]), (
        gpu_from
    )

    # One Ray and one Python across the cluster: the images agree with each other and the manifests.
    assert cpu_args["RAY_VERSION"] == gpu_args["RAY_VERSION"] == _ray_version()
    assert cpu_args["PYTHON_VERSION"] == gpu_args["PYTHON_VERSION"]
    assert _cluster_spec(_load(RAYJOB))["rayVersion"] == cpu_args["RAY_VERSION"]

    for name, instructions, extras in (("cpu", cpu, "[s3]"), ("gpu", gpu, "[s3,tensorrt,gpu]")):
        copies = " ".join(rest for kw, rest in instructions if kw == "COPY")
        assert "pyproject.toml" in copies and "trtcal" in copies, name
        runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
        assert f'".{extras}"' in runs, f"Dockerfile.{name} must pip install the package with {extras}"
        assert '"ray[default]==${RAY_VERSION}"' in runs, name
        assert "trtcal --version" in runs, name
        # KubeRay's probes exec `bash -c 'wget … | grep success'`.
        assert "bash" in runs and "wget" in runs, name
        assert any(kw == "USER" for kw, _ in instructions), f"Dockerfile.{name} should not run as root"
    # The GPU image checks that TensorRT is the 10.x line (11 removed the calibrator API).
    assert "tensorrt.__version__.startswith('10.')" in " ".join(rest for kw, rest in gpu if kw == "RUN")


def test_docker_extras_exist_in_pyproject() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    assert {"s3", "tensorrt", "gpu"} <= set(project["optional-dependencies"])
    assert project["version"] == __version__


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_docker_build_context_keeps_what_the_image_copies(name: str) -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!trtcal/"} <= set(lines)
