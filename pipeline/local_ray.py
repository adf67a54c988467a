"""Ray start-up for every job (labeling, fine-tuning) and the tests: join the cluster that is named, or start an
embedded single-node Ray whose every process listens on 127.0.0.1 only; and a job's stderr without Ray's known
false alarms.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from pathlib import Path

import ray
from ray._private import ray_constants

__all__ = ["REPO_ROOT", "start_local_ray", "connect_ray", "drop_ray_false_alarms_from_stderr",
           "RAY_FALSE_ALARMS"]

REPO_ROOT = Path(__file__).resolve().parents[1]

# Ray Data 2.60 hands every actor pool's constructor its map transformer and DataContext as ray.put() references
# (ActorPoolMapOperator._start_actor) and asks for max_restarts=-1, so Ray core logs at error level, on every run,
# that such an actor "will fail" to restart if those objects are lost (ray-project/ray#57733, open). The operator
# holds the references for the whole run, so restarts work (tests/e2e kill a model actor mid-run and it comes
# back); turning restarts off would silence it at the cost of fault tolerance. The line comes from C++ straight to
# file descriptor 2, past Python's logging, hence a filter on that descriptor for exactly these lines.
RAY_FALSE_ALARMS: tuple[bytes, ...] = (
    b"has constructor arguments in the object store and max_restarts > 0",
)
_stderr_filter_lock = threading.Lock()
_stderr_filter_installed = False


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


def drop_ray_false_alarms_from_stderr() -> None:
    """From now on, lines of this process's stderr (fd 2, C++ included) that hold a RAY_FALSE_ALARMS message are
    dropped; everything else passes through unchanged, partial lines (progress bars) at once. Installed once per
    process; for a job's main(), before Ray starts."""
    global _stderr_filter_installed
    with _stderr_filter_lock:
        if _stderr_filter_installed:
            return
        _stderr_filter_installed = True
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def write(data: bytes) -> None:
        try:
            while data:
                data = data[os.write(terminal, data):]
        except OSError:
            pass  # a closed reader (`| head`): keep draining the pipe so writers never block

    def copy_filtered() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not any(alarm in line for alarm in RAY_FALSE_ALARMS))
            if pending and not pending.startswith(b"["):  # Ray's C++ lines start with '['; others go out now
                kept, pending = kept + pending, b""
            if kept:
                write(kept)
        if pending:
            write(pending)

    copier = threading.Thread(target=copy_filtered, name="m2f-stderr-filter", daemon=True)
    copier.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # the pipe's last writer here is gone: the copier drains it and ends
        copier.join(timeout=2.0)

    atexit.register(restore)
