"""The local stack itself: loopback-only listeners, S3 round trips, `ray job submit` reaching the venv
and S3 from workers, and the CLI's up/down stopping its own stack without touching another."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infra.local_stack import LOOPBACK, free_ports, is_running, listening_ports

pytestmark = pytest.mark.slow

LOOPBACK_ADDRESSES = {LOOPBACK, "::ffff:127.0.0.1"}
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_ray_head_and_s3_endpoint_listen_on_loopback_only(ray_head, s3_endpoint):
    listeners = listening_ports(ray_head.process_ids() | {s3_endpoint.pid})
    ports = {port for _, port, _ in listeners}
    assert ray_head.ports["gcs"] in ports and ray_head.ports["dashboard"] in ports
    assert int(s3_endpoint.endpoint_url.rsplit(":", 1)[1]) in ports
    outside = [listener for listener in listeners if listener[0] not in LOOPBACK_ADDRESSES]
    assert outside == [], f"listening beyond 127.0.0.1: {outside}"


def test_s3_endpoint_round_trips_objects_and_parquet_through_s3fs(s3_filesystem, s3_bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    s3_filesystem.pipe(f"{s3_bucket}/raw/a.bin", b"\x00\x01payload")
    assert s3_filesystem.cat(f"{s3_bucket}/raw/a.bin") == b"\x00\x01payload"
    table = pa.table({"image_uri": ["s3://x/1.jpg", "s3://x/2.jpg"], "score": [0.5, 0.25]})
    pq.write_table(table, f"{s3_bucket}/tables/t.parquet", filesystem=s3_filesystem)
    assert sorted(s3_filesystem.ls(f"{s3_bucket}/tables")) == [f"{s3_bucket}/tables/t.parquet"]
    assert pq.read_table(f"{s3_bucket}/tables/t.parquet", filesystem=s3_filesystem).equals(table)


def test_job_submit_runs_venv_python_and_workers_read_s3_with_runtime_env_credentials(
        submit_ray_job, s3_endpoint, s3_filesystem, s3_bucket, tmp_path):
    s3_filesystem.pipe(f"{s3_bucket}/probe.txt", b"from-moto")
    (tmp_path / "probe_job.py").write_text(textwrap.dedent(f"""
        import json, sys
        import ray
        import s3fs

        @ray.remote
        def read_probe():
            return s3fs.S3FileSystem().cat("{s3_bucket}/probe.txt").decode()

        ray.init()
        print("RESULT " + json.dumps({{"python": sys.executable, "read": ray.get(read_probe.remote())}}))
    """))

    job = submit_ray_job(["python", "probe_job.py"], working_dir=tmp_path,
                         env_vars=s3_endpoint.client_env(), timeout_s=120)

    assert job.returncode == 0, job.output[-4000:]
    result = json.loads(job.output.split("RESULT ", 1)[1].splitlines()[0])
    assert result["read"] == "from-moto"
    assert ".venv/bin/python" in result["python"]


def test_local_stack_cli_up_serves_on_loopback_and_down_stops_only_its_own_stack(ray_head, tmp_path):
    state_dir = tmp_path / "stack"
    command = [sys.executable, str(REPO_ROOT / "infra" / "local_stack.py"), "--state-dir", str(state_dir)]
    up = subprocess.run([*command[:2], "up", *command[2:]], capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                       if line.startswith("export "))
        assert exports["RAY_API_SERVER_ADDRESS"].startswith(f"http://{LOOPBACK}:")
        assert exports["AWS_ENDPOINT_URL"].startswith(f"http://{LOOPBACK}:")
        assert exports["RAY_AUTH_MODE"] == "token"
        status = subprocess.run([*command[:2], "status", *command[2:]], capture_output=True, text=True, timeout=60)
        listening = [line.split()[2] for line in status.stdout.splitlines() if line.startswith("# listening")]
        assert listening and all(address.rsplit(":", 1)[0] in LOOPBACK_ADDRESSES
                                 for address in listening), listening
    finally:
        down = subprocess.run([*command[:2], "down", *command[2:]], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr[-3000:]
    assert not (state_dir / "stack.json").exists()
    ports = [address.rsplit(":", 1)[1] for address in listening]
    still = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    assert not [port for port in ports if f":{port} " in still], "ports still listening after down"
    assert is_running(ray_head.pid) and ray_head.job_api_answers(), "down stopped another cluster too"


def test_ports_picked_together_are_distinct_and_avoid_the_given_ones():
    # Ray's head gets a dozen ports at once; picked one by one they could repeat, and Ray refuses to start.
    taken = tuple(free_ports(2))
    ports = free_ports(40, besides=taken)
    assert len(set(ports)) == 40 and not set(ports) & set(taken)
