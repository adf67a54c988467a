"""infra/rayjob-kuberay.yaml: its entrypoint is one the job's own argument parser accepts, its node shapes get a pool
plan that places every actor (none on the head), and S3 credentials come from a Secret, never the file."""
from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.pools import NodeShape, plan_pools

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = REPO_ROOT / "infra" / "rayjob-kuberay.yaml"


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def job_argument_parser():
    """jobs/segment_bucket.py's parse_args, loaded from the file (jobs/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("segment_bucket_job", REPO_ROOT / "jobs" / "segment_bucket.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def cpu_quantity(value) -> float:
    """A Kubernetes CPU quantity ("8", 8, "500m") in CPUs."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def node_shape(name: str, group: dict, *, is_head: bool) -> NodeShape:
    """What `ray start` sees in a pod of this group: rayStartParams win, else KubeRay takes the container limits."""
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus = cpu_quantity(params.get("num-cpus", limits["cpu"]))
    gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return NodeShape(name, cpus, gpus, is_head=is_head)


def cluster_nodes(rayjob: dict) -> list[NodeShape]:
    spec = rayjob["spec"]["rayClusterSpec"]
    nodes = [node_shape("head", spec["headGroupSpec"], is_head=True)]
    for group in spec["workerGroupSpecs"]:
        nodes += [node_shape(f"{group['groupName']}-{i}", group, is_head=False) for i in range(group["replicas"])]
    return nodes


def test_entrypoint_flags_are_accepted_by_the_jobs_own_argument_parser(rayjob):
    entrypoint = shlex.split(rayjob["spec"]["entrypoint"])
    assert entrypoint[:2] == ["python", "jobs/segment_bucket.py"]
    options = job_argument_parser()(entrypoint[2:])  # argparse exits on any flag it does not know
    assert options.input.startswith("s3://") and options.output.startswith("s3://")
    assert options.resume, "a retried submission (backoffLimit) must continue, not refuse the output"
    assert rayjob["spec"]["backoffLimit"] >= 1


def test_runtime_env_ships_the_repository_baked_into_the_image(rayjob):
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**{**runtime_env, "working_dir": str(REPO_ROOT)})  # in the image, working_dir holds this checkout
    dockerfile = (REPO_ROOT / "infra" / "Dockerfile").read_text()
    assert f"pip install --no-cache-dir -e {runtime_env['working_dir']}" in dockerfile
    pinned_ray = next(d for d in (REPO_ROOT / "pyproject.toml").read_text().splitlines() if '"ray[' in d)
    ray_version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert f"=={ray_version}" in pinned_ray and f"rayproject/ray:{ray_version}-" in dockerfile
    images = {c["image"] for group in [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"],
                                       *rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1 and ray_version in images.pop()


def test_head_runs_no_workload_and_the_gpu_workers_fit_the_pool_plan(rayjob):
    nodes = cluster_nodes(rayjob)
    head = nodes[0]
    assert head.cpus == 0 and head.gpus == 0
    gpus = sum(n.gpus for n in nodes)
    assert gpus >= 1, "no GPU worker group"
    plan = plan_pools(nodes)
    assert plan.model_actors == gpus and plan.model_gpus == 1
    assert "head" not in plan.placement
    shapes = {n.node_id: n for n in nodes}
    for node_id, counts in plan.placement.items():
        used = (counts["model"] * plan.model_cpus + counts["preprocess"] * plan.preprocess_cpus
                + counts["postprocess"] * plan.postprocess_cpus)
        assert used < shapes[node_id].cpus and counts["model"] <= shapes[node_id].gpus


def test_s3_credentials_come_from_a_secret_in_every_pod_and_never_from_the_file(rayjob):
    spec = rayjob["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            secrets = [source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source]
            assert secrets == ["m2f-s3-credentials"], container["name"]
            literal = [v["name"] for v in container.get("env", []) if v["name"].startswith("AWS_") and "value" in v]
            assert not literal, f"{container['name']} sets {literal} in the manifest"
    assert "AWS_" not in (yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]).get("env_vars") or {}).__repr__()
