"""The labeling job on a real multi-node Ray cluster on loopback (Ray's own `ray.cluster_utils.Cluster`, every
node on 127.0.0.1): a head with 1 CPU and two 2-CPU workers, as small as the nodes that used to defeat the pool
plan. Submitted with `ray job submit` and default flags, the job completes; run while each worker node in turn
dies without warning mid-run and a fresh node of the same size joins (spot instances), it still completes with
every input exactly once and every segment exactly once.

The cluster is Ray's test utility rather than `ray start` processes: a `ray start --address=127.0.0.1:...`
worker cannot join a loopback-only head (with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray refuses multi-node; without
it Ray rewrites 127.0.0.1 into the machine's outside address, where the head does not listen).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from infra.local_stack import free_port
from pipeline.segment_job import REPO_ROOT, SegmentationOptions, run_segmentation
from tiny_checkpoints import save_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

HEAD_CPUS = 1
WORKER_CPUS = 2
LOOPBACK = "127.0.0.1"
NODE_OBJECT_STORE_BYTES = 200 * 1024 * 1024


def write_images(folder: Path, count: int) -> list[str]:
    """`count` small PNGs with a few flat rectangles (something for masks to follow); their URIs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for index in range(count):
        rng = np.random.default_rng(index)
        height, width = 40 + index % 7, 48 + index % 5
        pixels = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
        for _ in range(3):
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            pixels[top:top + height // 3, left:left + width // 3] = rng.integers(0, 256, size=3)
        path = folder / f"img_{index:03d}.png"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
        uris.append(str(path))
    return uris


@pytest.fixture(scope="module")
def loopback_cluster(tmp_path_factory):
    """Head (1 CPU, job API) + two workers (2 CPUs), all on 127.0.0.1, with this process as a driver on the head."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's embedded Ray: one driver connection per process
        ray.shutdown()
    # A private temp root: Cluster records its address in <temp root>/ray/ray_current_cluster, which a bare
    # ray.init() elsewhere on the machine would otherwise join. Short, for Ray's Unix socket paths.
    temp_root = Path(f"/tmp/m2f-mn-{os.getpid()}")
    temp_root.mkdir(exist_ok=True)
    environment = {
        "RAY_TMPDIR": str(temp_root),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every node's ports on loopback
        "RAY_AUTH_MODE": "disabled",  # the CLI below talks to the job API without a token
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # a job's `python`
        "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO_ROOT)) if p),
        # Fixed defaults (44217, 44227) that another cluster on the machine would collide with.
        "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port()),
    }
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    ray_constants.ENABLE_RAY_CLUSTER = False
    dashboard_port = free_port()
    cluster = Cluster(shutdown_at_exit=True)
    try:
        cluster.add_node(num_cpus=HEAD_CPUS, node_ip_address=LOOPBACK, include_dashboard=True, dashboard_host=LOOPBACK,
                         dashboard_port=dashboard_port, dashboard_agent_listen_port=free_port(),
                         object_store_memory=NODE_OBJECT_STORE_BYTES)
        cluster.job_api_url = f"http://{LOOPBACK}:{dashboard_port}"
        for _ in range(2):
            add_worker(cluster)
        ray.init(address=cluster.address, _node_ip_address=LOOPBACK)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        import shutil

        shutil.rmtree(temp_root, ignore_errors=True)


def add_worker(cluster):
    return cluster.add_node(num_cpus=WORKER_CPUS, node_ip_address=LOOPBACK,
                            object_store_memory=NODE_OBJECT_STORE_BYTES)


@pytest.fixture(scope="module")
def slow_tiny_model(tmp_path_factory) -> Path:
    """The tiny random model at 256 x 256: slow enough (~0.1 s per image on a core) for a run to outlast a kill."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-256") / "model", seed=1, image_size=256)


def committed_images(output: Path) -> int:
    """Images rows committed so far (files the job renamed into place; hidden temporaries excluded)."""
    directory = output / "images"
    if not directory.exists():
        return 0
    rows = 0
    for path in directory.iterdir():
        if path.suffix == ".parquet" and not path.name.startswith((".", "_")):
            try:
                rows += pq.read_metadata(path).num_rows
            except OSError:  # compaction replaced it between the listing and the read
                pass
    return rows


def assert_every_input_and_segment_exactly_once(output: Path, inputs: list[str]) -> None:
    images = pq.read_table(output / "images")
    segments = pq.read_table(output / "segments")
    uris = images["image_uri"].to_pylist()
    assert sorted(uris) == sorted(inputs), "each input exactly once, nothing else"
    assert set(images["status"].to_pylist()) == {"ok"}, images.filter(
        images["status"] != "ok").select(["image_uri", "error_stage", "error_message"]).to_pylist()[:3]
    keys = list(zip(segments["image_uri"].to_pylist(), segments["task"].to_pylist(),
                    segments["segment_id"].to_pylist()))
    assert len(keys) == len(set(keys)), "a segment written twice"
    assert len(set(segments["run_id"].to_pylist()) | set(images["run_id"].to_pylist())) == 1
    for row in images.to_pylist():
        for task in ("panoptic", "instance", "semantic"):
            written = sum(1 for uri, t, _ in keys if uri == row["image_uri"] and t == task)
            assert row[f"{task}_segments"] == written, (row["image_uri"], task)
    assert sum(row["semantic_segments"] for row in images.to_pylist()) > 0, "nothing was segmented"


def actors_by_kind() -> tuple[list[str], list[tuple[str, int]]]:
    """(Ray Data actors restarted after dying with their node, (node id, restarts) of every progress tracker), from
    the state API via the head. Ray Data ends every actor when the job finishes, so a lost actor shows as
    restarted, not as dead."""
    from ray.util.state import list_actors

    actors = list_actors(detail=True, limit=10_000, raise_on_missing_output=False)
    restarted = [f"{a.class_name} restarts={a.num_restarts}" for a in actors
                 if a.class_name.startswith("MapWorker") and int(a.num_restarts or 0) > 0]
    trackers = [(a.node_id, int(a.num_restarts or 0)) for a in actors if a.class_name == "ProgressTracker"]
    return restarted, trackers


def job_options(folder: Path, output: Path, model: Path, **overrides) -> SegmentationOptions:
    return SegmentationOptions(input=str(folder), output=str(output), model=str(model), show_progress=False,
                               stall_timeout=180, **overrides)


def test_job_submitted_with_default_flags_completes_on_small_nodes(loopback_cluster, slow_tiny_model, tmp_path):
    inputs = write_images(tmp_path / "in", 12)
    output = tmp_path / "out"
    runtime_env = {"excludes": [".git", ".venv", "**/__pycache__", "models/", "out/", "runs/"]}
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", loopback_cluster.job_api_url,
               "--working-dir", str(REPO_ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "jobs/segment_bucket.py", "--input", str(tmp_path / "in"), "--output", str(output),
               "--model", str(slow_tiny_model), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    report = json.loads((output / "report.json").read_text())
    pools = report["pools"]
    assert pools["nodes"] == f"head {HEAD_CPUS} CPU; 2 x worker {WORKER_CPUS} CPU"
    assert pools["model_actors"] == 2 and pools["model_cpus"] <= WORKER_CPUS
    assert report["ok"] == len(inputs) and report["errors"] == 0
    assert_every_input_and_segment_exactly_once(output, inputs)


def test_each_worker_node_dies_mid_run_and_a_fresh_one_joins_yet_every_input_is_written_once(
        loopback_cluster, slow_tiny_model, tmp_path):
    cluster = loopback_cluster
    inputs = write_images(tmp_path / "in", 96)
    output = tmp_path / "out"
    kills: list[tuple[int, bool]] = []  # (images committed when the node died, job still running)
    outcome: dict = {}

    def run_job() -> None:
        try:
            outcome["report"] = run_segmentation(job_options(tmp_path / "in", output, slow_tiny_model, batch_size=2,
                                                             images_per_file=4))
        except BaseException as error:  # noqa: BLE001 - re-raised by the test below
            outcome["error"] = error

    # Nodes are started and stopped from the main thread (Ray's node start-up installs signal handlers).
    job = threading.Thread(target=run_job, daemon=True)
    job.start()
    for victim in list(cluster.worker_nodes):
        # The first node dies once a batch is committed (the pools are up and working), the second as soon as the
        # first one's replacement has joined.
        while not kills and committed_images(output) == 0 and job.is_alive():
            time.sleep(0.2)
        kills.append((committed_images(output), job.is_alive()))
        cluster.remove_node(victim, allow_graceful=False)
        add_worker(cluster)
    job.join(timeout=300)
    assert not job.is_alive(), f"the job did not finish; node deaths at (committed, running): {kills}"
    if "error" in outcome:
        raise outcome["error"]
    report = outcome["report"]
    assert len(kills) == 2 and all(running and 0 < committed < len(inputs) for committed, running in kills), \
        f"a node death was not mid-run: {kills}"
    lost, trackers = actors_by_kind()
    print(f"node deaths at (committed, running): {kills}; pipeline {report['pipeline_wall_time_s']} s; "
          f"lost actors: {lost}")
    assert lost, "no pipeline actor lived on the killed nodes: the kills tested nothing"
    assert trackers and all(node == cluster.head_node.node_id and restarts == 0 for node, restarts in trackers), \
        f"progress trackers off the driver's node or restarted: {trackers}"
    assert report["ok"] == len(inputs)
    assert_every_input_and_segment_exactly_once(output, inputs)
