"""Ray start-up for every job (labeling, fine-tuning) and the tests: join the cluster that is named, or start an
embedded single-node Ray whose every process listens on 127.0.0.1 only.
"""
from __future__ import annotations

import os
from pathlib import Path

import ray
from ray._private import ray_constants

__all__ = ["REPO_ROOT", "start_local_ray", "connect_ray"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def start_local_ray(**init_kwargs) -> None:
    """An embedded single-node Ray bound to 127.0.0.1; `init_kwargs` go to `ray.init` (num_cpus, ...)."""
    # Ray binds to the machine's outside address unless it believes it runs a laptop-only cluster; the flag is
    # read from the environment at import (hence also the module constant) and by every process it spawns.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Workers must import `pipeline` and `m2f_model` even when the package is not installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO_ROOT)) if p)
    # address="local": start a fresh cluster even when another one on this machine is recorded as current.
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **init_kwargs)


def connect_ray(address: str | None = None) -> bool:
    """Joins the cluster at `address` (else RAY_ADDRESS, as `ray job submit` sets it), or starts an embedded one.

    Returns True when this call initialised Ray (the caller shuts it down), False when Ray was already up.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        start_local_ray()
    return True
