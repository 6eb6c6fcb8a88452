"""`rayimg.run.cluster.connect` starting a local cluster: with Ray's dashboard where it can start,
and without it where this Ray has no dashboard frontend (as in a pip wheel built without it, or
the GPU image's Ray): the job's cluster must still come up and run work."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import ray
    from rayimg.config.common import ClusterConfig
    from rayimg.run.cluster import connect

    print("mode", connect(ClusterConfig(num_cpus=1)), flush=True)
    print("task", ray.get(ray.remote(lambda: 41 + 1).remote()), flush=True)
    ray.shutdown()
""")

# Ray's dashboard process looks for its frontend at ray/dashboard/client/build; this hides it
# from every Python process that inherits the PYTHONPATH (the driver and the dashboard alike).
HIDE_FRONTEND = textwrap.dedent("""
    import os.path
    _isdir = os.path.isdir
    os.path.isdir = lambda p: False if str(p).rstrip("/").endswith(os.path.join("dashboard", "client", "build")) else _isdir(p)
""")


def run_connect(tmp_path, *, hide_frontend: bool):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    if hide_frontend:
        (tmp_path / "sitecustomize.py").write_text(HIDE_FRONTEND)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=180)


def test_local_cluster_with_its_dashboard(tmp_path):
    proc = run_connect(tmp_path, hide_frontend=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "mode local" in proc.stdout and "task 42" in proc.stdout
    assert "[ray] local cluster, dashboard http://127.0.0.1:" in proc.stdout


def test_local_cluster_without_a_dashboard_frontend_still_runs(tmp_path):
    proc = run_connect(tmp_path, hide_frontend=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "mode local" in proc.stdout and "task 42" in proc.stdout
    assert "its dashboard did not start" in proc.stdout


def test_dashboard_port_is_free_and_outside_the_ephemeral_range():
    """The local cluster's dashboard port is picked below the kernel's ephemeral range, where none
    of Ray's processes, binding port 0 as they start, can take it first."""
    import socket

    from rayimg.run.cluster import _free_port

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    ports = {_free_port() for _ in range(20)}
    assert all(p < low for p in ports), ports
    assert len(ports) > 1  # random, so two jobs starting at once do not pick the same one
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free
