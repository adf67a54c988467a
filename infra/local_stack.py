"""The local stack the end-to-end tests and a laptop user run against: a Ray head and an S3 endpoint,
both listening on 127.0.0.1 only.

    python infra/local_stack.py up      # starts both, prints addresses and the variables to export
    python infra/local_stack.py status
    python infra/local_stack.py down    # stops exactly the processes `up` started

Why the odd-looking details (measured on our 2-core machines, Ray 2.60, moto 5):
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ... --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1`
  is what makes every Ray port bind to loopback instead of the machine's outside address.
- The head runs `ray start --block` in its own session with a private `--temp-dir`: `ray start`
  writes the cluster address into `<temp-dir>/ray_current_cluster`, and a bare `ray.init()` elsewhere
  on the machine joins whatever that file in the default temp dir names. A private temp dir keeps
  other people's embedded `ray.init()` from landing on this cluster. For the same reason it is
  never stopped with `ray stop` (that kills every Ray process on the machine): stopping signals the
  `ray start --block` process and then its own process tree only.
- Every port is chosen free at runtime (the Ray client server and dashboard agent have fixed
  defaults that would collide with a second cluster on the machine).
- The venv's bin goes first on the head's PATH: a submitted job's `python` is the first one there.
- Token authentication: with auth="token" a fresh token is written to `<temp-dir>/auth_token` and
  both the head and every client get `RAY_AUTH_MODE=token` + `RAY_AUTH_TOKEN_PATH`; without those a
  `ray job submit` fails with "Missing authentication token". auth="disabled" turns it off.
- moto is given no region: a region makes s3fs send a LocationConstraint on bucket creation, which
  moto (like AWS for us-east-1) rejects with InvalidLocationConstraint.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python infra/local_stack.py up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infra.processes import is_running, process_tree, processes_mentioning  # noqa: E402

__all__ = [
    "RayHead",
    "S3Endpoint",
    "free_port",
    "free_ports",
    "start_ray_head",
    "stop_ray_head",
    "start_s3_endpoint",
    "stop_s3_endpoint",
    "listening_ports",
    "is_running",
    "main",
]

LOOPBACK = "127.0.0.1"
S3_TEST_ACCESS_KEY = "m2f-local-key"
S3_TEST_SECRET_KEY = "m2f-local-secret"
DEFAULT_STATE_DIR = Path(os.environ.get("M2F_LOCAL_STACK_DIR", "/tmp/m2f-local-stack"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int, *, besides: tuple[int, ...] = ()) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now, none of them in `besides`.

    The probes stay bound until all are picked: ports picked one after another can repeat (Ray then refuses to
    start, two of its components given one port)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.bind((LOOPBACK, 0))
            if probe.getsockname()[1] not in besides:
                ports.append(probe.getsockname()[1])
        return ports


def _venv_bin() -> Path:
    # Not resolved: the venv's python is a symlink, and its folder is the one that holds `ray`.
    return Path(sys.executable).parent


# ----------------------------------------------------------------------------------------------
# Ray head


@dataclass
class RayHead:
    """A running `ray start --head --block` on loopback, and what a client needs to reach it."""

    gcs_address: str  # host:port, for ray.init(address=...)
    dashboard_url: str  # http://host:port, for `ray job submit` and ray.util.state
    temp_dir: str
    pid: int  # of the `ray start --block` process
    log_path: str
    auth: str  # "token" | "disabled"
    token_path: str | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def client_env(self) -> dict[str, str]:
        """Variables that point the Ray CLI, the job SDK and ray.init() at this head."""
        env = {
            "RAY_ADDRESS": self.gcs_address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": self.auth,
        }
        if self.token_path:
            env["RAY_AUTH_TOKEN_PATH"] = self.token_path
        return env

    def auth_headers(self) -> dict[str, str]:
        if not self.token_path:
            return {}
        return {"Authorization": "Bearer " + Path(self.token_path).read_text().strip()}

    def job_api_answers(self) -> bool:
        """True when the dashboard's job API answers (what `ray job submit` talks to)."""
        request = urllib.request.Request(self.dashboard_url + "/api/jobs/", headers=self.auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def process_ids(self) -> set[int]:
        """This head's processes: the `ray start --block` tree, and any daemon naming its temp dir."""
        return process_tree(self.pid) | processes_mentioning(self.temp_dir)


def start_ray_head(
    port: int | None = None,
    dashboard_port: int | None = None,
    *,
    num_cpus: int = 2,
    auth: str = "token",
    temp_dir: str | Path | None = None,
    extra_env: dict[str, str] | None = None,
    timeout_s: float = 90.0,
) -> RayHead:
    """Starts a Ray head bound to 127.0.0.1 and waits until its job API answers.

    `port`/`dashboard_port` default to free ports picked now. `extra_env` reaches the head's
    processes and, through them, every worker and submitted job (e.g. AWS_* for a test S3).
    """
    if auth not in ("token", "disabled"):
        raise ValueError(f"auth={auth!r}: use 'token' or 'disabled'")
    components = ("ray_client_server", "dashboard_agent_listen", "dashboard_agent_grpc", "runtime_env_agent",
                  "metrics_export", "node_manager", "object_manager", "autoscaler_metrics", "dashboard_metrics")
    picked = free_ports(2 + len(components), besides=tuple(p for p in (port, dashboard_port) if p))
    port, dashboard_port = port or picked[0], dashboard_port or picked[1]
    ports = {"gcs": port, "dashboard": dashboard_port, **dict(zip(components, picked[2:]))}
    # Short path: Ray puts Unix sockets under it, and those are limited to ~107 characters.
    temp_dir = Path(temp_dir or f"/tmp/m2f-ray-{port}")
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_path = temp_dir / "ray-start.log"

    env = dict(os.environ)
    for inherited in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(inherited, None)
    env.update(extra_env or {})
    env["PATH"] = f"{_venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_AUTH_MODE"] = auth
    # Fixed defaults (44217, 44227) that a second cluster on the machine would collide with.
    env["AUTOSCALER_METRIC_PORT"] = str(ports["autoscaler_metrics"])
    env["DASHBOARD_METRIC_PORT"] = str(ports["dashboard_metrics"])
    token_path = None
    if auth == "token":
        token_path = temp_dir / "auth_token"
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)

    command = [
        str(_venv_bin() / "ray"), "start", "--head", "--block",
        f"--node-ip-address={LOOPBACK}",
        f"--port={port}",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        f"--num-cpus={num_cpus}",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={ports['ray_client_server']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        f"--metrics-export-port={ports['metrics_export']}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    head = RayHead(
        gcs_address=f"{LOOPBACK}:{port}",
        dashboard_url=f"http://{LOOPBACK}:{dashboard_port}",
        temp_dir=str(temp_dir),
        pid=process.pid,
        log_path=str(log_path),
        auth=auth,
        token_path=str(token_path) if token_path else None,
        ports=ports,
    )
    try:
        _wait_until(head.job_api_answers, process, timeout_s,
                    f"Ray head on {head.gcs_address} (log: {log_path})")
    except BaseException:
        stop_ray_head(head)
        raise
    return head


def stop_ray_head(head: RayHead, *, grace_s: float = 10.0) -> None:
    """Stops this head and every process it started; leaves other Ray clusters alone.

    Every process of the head gets SIGTERM at once (Ray's own processes exit on it within a second;
    `ray start --block` alone takes ~5 s to pass it on), then SIGKILL for whatever is left after grace_s.
    """
    owned = head.process_ids()
    _signal_all(owned, signal.SIGTERM)
    _wait_for_exit(owned, grace_s)
    owned |= head.process_ids()  # workers that forked while the rest was stopping
    _signal_all(owned, signal.SIGKILL)
    _wait_for_exit(owned, 5.0)
    _reap(head.pid)


# ----------------------------------------------------------------------------------------------
# S3 endpoint (moto's server)


@dataclass
class S3Endpoint:
    """moto's S3 server on loopback, and the credentials it accepts (any, by design)."""

    endpoint_url: str
    pid: int
    log_path: str
    access_key: str = S3_TEST_ACCESS_KEY
    secret_key: str = S3_TEST_SECRET_KEY

    def client_env(self) -> dict[str, str]:
        """AWS variables boto3, s3fs and pyarrow read; no region on purpose (see module doc)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def storage_options(self) -> dict:
        """fsspec/s3fs keyword arguments for this endpoint (the job's --storage-options JSON)."""
        return {"key": self.access_key, "secret": self.secret_key,
                "client_kwargs": {"endpoint_url": self.endpoint_url}}


def start_s3_endpoint(port: int | None = None, *, log_dir: str | Path | None = None,
                      timeout_s: float = 30.0) -> S3Endpoint:
    """Starts `moto_server` on 127.0.0.1 and waits until it answers S3 requests."""
    port = port or free_port()
    log_dir = Path(log_dir or f"/tmp/m2f-s3-{port}")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "moto-server.log"
    moto_server = _venv_bin() / "moto_server"
    if not moto_server.exists():
        raise FileNotFoundError(f"{moto_server} is missing: install the dev extra "
                                "(pip install -e '.[dev]', which brings moto[server])")
    with open(log_path, "ab") as log:
        process = subprocess.Popen([str(moto_server), "-H", LOOPBACK, "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    endpoint = S3Endpoint(endpoint_url=f"http://{LOOPBACK}:{port}", pid=process.pid,
                          log_path=str(log_path))
    try:
        _wait_until(lambda: _s3_answers(endpoint), process, timeout_s,
                    f"S3 endpoint {endpoint.endpoint_url} (log: {log_path})")
    except BaseException:
        stop_s3_endpoint(endpoint)
        raise
    return endpoint


def _s3_answers(endpoint: S3Endpoint) -> bool:
    try:
        with urllib.request.urlopen(endpoint.endpoint_url + "/", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def stop_s3_endpoint(endpoint: S3Endpoint, *, grace_s: float = 5.0) -> None:
    owned = process_tree(endpoint.pid)
    _signal_all(owned, signal.SIGTERM)
    _wait_for_exit(owned, grace_s)
    _signal_all(owned, signal.SIGKILL)
    _wait_for_exit(owned, 2.0)
    _reap(endpoint.pid)


# ----------------------------------------------------------------------------------------------
# Processes, by id only


def _wait_until(ready, process: subprocess.Popen | None, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before it was ready")
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def _signal_all(pids: set[int], signum: int) -> None:
    for pid in pids:
        if is_running(pid):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _wait_for_exit(pids: set[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(is_running(pid) for pid in pids):
        time.sleep(0.2)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def listening_ports(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP listener owned by `pids`, read from `ss -ltnp`."""
    output = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    listeners = []
    for line in output.splitlines():
        columns = line.split()
        if len(columns) < 6:
            continue
        address, _, port = columns[3].rpartition(":")
        for owner in columns[5].split("pid=")[1:]:
            pid = int(owner.split(",")[0])
            if pid in pids:
                listeners.append((address.strip("[]"), int(port), pid))
    return listeners


# ----------------------------------------------------------------------------------------------
# CLI


def _state_file(state_dir: Path) -> Path:
    return state_dir / "stack.json"


def _print_exports(head: RayHead | None, s3: S3Endpoint | None) -> None:
    if head:
        print(f"# Ray head: {head.gcs_address}  dashboard/job API: {head.dashboard_url}  logs: {head.temp_dir}")
    if s3:
        print(f"# S3 endpoint (moto): {s3.endpoint_url}")
    env = {**(head.client_env() if head else {}), **(s3.client_env() if s3 else {})}
    for name, value in env.items():
        print(f"export {name}={value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="where `up` records what it started, for `down` (default %(default)s)")
    parser.add_argument("--ray-port", type=int, default=None)
    parser.add_argument("--dashboard-port", type=int, default=None)
    parser.add_argument("--s3-port", type=int, default=None)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--auth", choices=["token", "disabled"], default="token")
    args = parser.parse_args(argv)
    state_file = _state_file(args.state_dir)

    if args.action == "up":
        if state_file.exists():
            print(f"A stack is already recorded in {state_file}: run `down` first.", file=sys.stderr)
            return 1
        s3 = start_s3_endpoint(args.s3_port, log_dir=args.state_dir / "s3")
        try:
            head = start_ray_head(args.ray_port, args.dashboard_port, num_cpus=args.num_cpus,
                                  auth=args.auth, extra_env=s3.client_env())
        except BaseException:
            stop_s3_endpoint(s3)
            raise
        args.state_dir.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"ray_head": asdict(head), "s3": asdict(s3)}, indent=2))
        outside = [(a, p, pid) for a, p, pid in listening_ports(head.process_ids() | {s3.pid})
                   if a not in (LOOPBACK, "::ffff:127.0.0.1")]
        _print_exports(head, s3)
        if outside:
            print(f"WARNING: listening beyond loopback: {outside}", file=sys.stderr)
            return 2
        return 0

    if not state_file.exists():
        print(f"No stack recorded in {state_file}.", file=sys.stderr)
        return 1 if args.action == "status" else 0
    state = json.loads(state_file.read_text())
    head, s3 = RayHead(**state["ray_head"]), S3Endpoint(**state["s3"])
    if args.action == "status":
        _print_exports(head, s3)
        for address, port, pid in sorted(listening_ports(head.process_ids() | {s3.pid})):
            print(f"# listening {address}:{port} pid {pid}")
        return 0
    stop_ray_head(head)
    stop_s3_endpoint(s3)
    state_file.unlink()
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    print("# stopped; unset RAY_ADDRESS RAY_API_SERVER_ADDRESS RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH "
          "AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3")
    return 0


if __name__ == "__main__":
    sys.exit(main())
