"""Session fixtures that start the real services end-to-end tests talk to, all on 127.0.0.1:
a Ray head (`ray start --head`, token auth, dashboard for `ray job submit`) and moto's S3 server.

One Ray head serves the whole session: starting one costs ~5 s and ~550 MiB on our 2-core machines.
The head gets no AWS variables on purpose: jobs must deliver S3 credentials themselves (runtime env
or --storage-options), as they would on a real cluster.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from infra.local_stack import (RayHead, S3Endpoint, start_ray_head, start_s3_endpoint,  # noqa: E402
                               stop_ray_head, stop_s3_endpoint)

RAY_CLI = Path(sys.executable).parent / "ray"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> S3Endpoint:
    endpoint = start_s3_endpoint(log_dir=tmp_path_factory.mktemp("moto-server"))
    yield endpoint
    stop_s3_endpoint(endpoint)


@pytest.fixture(scope="session")
def ray_head() -> RayHead:
    head = start_ray_head(num_cpus=2, auth="token")
    yield head
    stop_ray_head(head)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture
def s3_filesystem(s3_endpoint):
    """An s3fs filesystem on the test endpoint (fresh instance, no cached listings)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint.storage_options())


@pytest.fixture
def s3_bucket(s3_filesystem) -> str:
    """A new empty bucket for one test; its name."""
    name = f"m2f-e2e-{uuid.uuid4().hex[:12]}"
    s3_filesystem.mkdir(name)
    return name


@dataclass
class SubmittedJob:
    returncode: int
    output: str  # the CLI's stdout+stderr: submission lines, then the job's own log tail
    job_id: str | None


@pytest.fixture(scope="session")
def submit_ray_job(ray_head):
    """Runs `ray job submit --working-dir DIR -- ENTRYPOINT...` against the session head and waits.

    env_vars go into the job's runtime env (they reach the driver and every worker); a job still
    running at timeout_s is stopped so it does not hold the cluster for the next test.
    """

    def submit(entrypoint: list[str], *, working_dir: Path = REPO_ROOT, env_vars: dict | None = None,
               timeout_s: float = 180.0, submission_id: str | None = None) -> SubmittedJob:
        submission_id = submission_id or f"m2f-e2e-{uuid.uuid4().hex[:10]}"
        runtime_env = {"env_vars": dict(env_vars or {}), "excludes": [".git", ".venv", "**/__pycache__"]}
        command = [str(RAY_CLI), "job", "submit", "--submission-id", submission_id,
                   "--working-dir", str(working_dir), "--runtime-env-json", json.dumps(runtime_env),
                   "--", *entrypoint]
        cli_env = {**os.environ, **ray_head.client_env()}
        try:
            done = subprocess.run(command, env=cli_env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as timeout:
            subprocess.run([str(RAY_CLI), "job", "stop", submission_id], env=cli_env,
                           capture_output=True, timeout=60)
            partial = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                              for part in (timeout.stdout or "", timeout.stderr or ""))
            raise AssertionError(f"job {submission_id} still running after {timeout_s:.0f} s; "
                                 f"output so far:\n{partial[-6000:]}") from None
        return SubmittedJob(done.returncode, done.stdout + done.stderr, submission_id)

    return submit
