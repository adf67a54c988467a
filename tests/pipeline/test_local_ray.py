"""Ray start-up and the stderr filter that drops Ray's known false alarms (and nothing else)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from pipeline.local_ray import REPO_ROOT


def test_stderr_filter_drops_exactly_the_known_ray_false_alarm_and_passes_everything_else():
    script = textwrap.dedent("""
        import os, sys
        from pipeline.local_ray import drop_ray_false_alarms_from_stderr
        drop_ray_false_alarms_from_stderr()
        drop_ray_false_alarms_from_stderr()  # a second call installs nothing more
        os.write(2, b"[2026-12-01 00:34:46,789 E 6080 6485] core_worker.cc:2465: Actor with class name: 'X' "
                    b"has constructor arguments in the object store and max_restarts > 0. If the ...\\n")
        os.write(2, b"[2026-12-01 00:34:47,000 E 6080 6485] core_worker.cc:1: a real error\\n")
        os.write(2, b"progress 1/2\\r")
        print("python stderr line", file=sys.stderr)
        os.write(2, b"no newline at the end")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (b"[2026-12-01 00:34:47,000 E 6080 6485] core_worker.cc:1: a real error\n"
                             b"progress 1/2\rpython stderr line\nno newline at the end")


def test_an_initialised_ray_is_joined_not_restarted(ray_session):
    from pipeline.local_ray import connect_ray

    assert connect_ray() is False
    assert {node["NodeManagerAddress"] for node in ray_session.nodes()} == {"127.0.0.1"}
