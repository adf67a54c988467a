"""The cluster and job definitions under infra/ are what Ray's own tools accept."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"


def test_cluster_definition_passes_ray_launcher_validation_with_cpu_head_and_gpu_group_from_zero():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((INFRA / "cluster-aws.yaml").read_text())
    validate_config(fillout_defaults(config))  # what `ray up` runs before launching anything

    head = config["available_node_types"][config["head_node_type"]]
    gpu_groups = [name for name, node in config["available_node_types"].items()
                  if name != config["head_node_type"] and node["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "the head should be a CPU node"
    assert gpu_groups, "no GPU worker group"
    group = config["available_node_types"][gpu_groups[0]]
    assert group["min_workers"] == 0 and group["max_workers"] >= 1
    assert any("pip install" in command and "m2f" in command for command in config["setup_commands"])


def test_runtime_env_file_is_a_valid_ray_runtime_env_shipping_the_repo_without_venv():
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    RuntimeEnv(**runtime_env)
    assert runtime_env["working_dir"] == "."
    assert ".venv" in runtime_env["excludes"] and ".git" in runtime_env["excludes"]


def test_job_spec_entrypoint_uses_only_flags_the_job_accepts():
    spec = yaml.safe_load((INFRA / "job.yaml").read_text())
    entrypoint = shlex.split(spec["entrypoint"])
    assert entrypoint[:2] == ["python", "jobs/segment_bucket.py"]
    help_text = subprocess.run([sys.executable, "jobs/segment_bucket.py", "--help"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=120, check=True).stdout
    flags = [argument for argument in entrypoint[2:] if argument.startswith("--")]
    assert flags and all(flag in help_text for flag in flags), [f for f in flags if f not in help_text]
