"""README's `ray job submit` commands, run as written against a fresh `ray start --head`.

The cluster is this test's own: started from the project's environment (.venv/bin first on the
PATH, as after `source .venv/bin/activate`) with token authentication, in a temporary dir on
free ports, and stopped by signalling its `ray start --block` process alone, never `ray stop`
(which would stop every Ray on this shared machine). The tiny train job and the tiny render job
are the README's commands with the address substituted and OUT set; both must reach SUCCEEDED
and leave the adapter and the images behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
README_ADDRESS = "http://127.0.0.1:8266"

pytestmark = pytest.mark.slow


def readme_submit_commands() -> list[str]:
    """The `ray job submit` commands of README.md's "On a cluster" section, continuation lines joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### On a cluster", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("ray job submit")]
    return commands


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def project_env(**extra: str) -> dict[str, str]:
    """This shell after `source .venv/bin/activate; export RAY_AUTH_MODE=token`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(VENV_BIN.parent),
               RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


@pytest.fixture(scope="module")
def head():
    """A `ray start --head --block` of this test's own; yields the dashboard address."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rjs-", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs, dashboard, client, agent, agent_grpc, runtime_env_agent, metrics = free_ports(7)
    # a fast stop: without work there is nothing to drain
    env = project_env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="1")
    subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=120)
    log = open(temp_dir / "head.log", "w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--temp-dir", str(temp_dir), "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--runtime-env-agent-port", str(runtime_env_agent), "--metrics-export-port", str(metrics),
         "--num-cpus", "2", "--disable-usage-stats"],
        env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (temp_dir / "head.log").read_text()[-4000:]
            ready = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True, timeout=120)
            if ready.returncode == 0:
                break
            assert time.monotonic() < deadline, ready.stderr[-2000:] + (temp_dir / "head.log").read_text()[-4000:]
            time.sleep(3)
        yield address
    finally:
        # this cluster alone: its `ray start --block` process shuts down the processes it started
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group this test created for it
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_state(job_id: str, status_output: str) -> str | None:
    """The state `ray job status` printed: a final one as a sentence, the others as 'Status for job ...'."""
    for pattern, state in ((rf"Job '{job_id}' succeeded", "SUCCEEDED"), (rf"Job '{job_id}' failed", "FAILED"),
                           (rf"Job '{job_id}' was stopped", "STOPPED")):
        if re.search(pattern, status_output):
            return state
    found = re.search(rf"Status for job '{job_id}': (\w+)", status_output)
    return found.group(1) if found else None


def submit(command: str, address: str, out: Path) -> str:
    """Run a README command with the address substituted; returns the job id after checking
    `ray job status` says SUCCEEDED."""
    assert README_ADDRESS in command, command
    command = command.replace(README_ADDRESS, address)
    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=project_env(OUT=str(out)),
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", output)
    assert job_id, output[-6000:]
    job_id = job_id.group(1)
    state, status = None, ""
    deadline = time.monotonic() + 300
    while state is None or state in ("PENDING", "RUNNING"):  # the submit waited for the job; Ray's record agrees
        assert time.monotonic() < deadline, status + output[-6000:]
        checked = subprocess.run([str(VENV_BIN / "ray"), "job", "status", "--address", address, job_id], env=project_env(),
                                 capture_output=True, text=True, timeout=120)
        status = checked.stdout + checked.stderr
        state = job_state(job_id, status)
        if state in (None, "PENDING", "RUNNING"):
            time.sleep(2)
    assert state == "SUCCEEDED", status + output[-6000:]
    assert result.returncode == 0, output[-6000:]
    return job_id


def test_readme_names_the_tiny_jobs():
    commands = readme_submit_commands()
    assert any("jobs/train.py --config jobs/configs/tiny_lora.yaml" in c for c in commands), commands
    assert any("jobs/render.py --config jobs/configs/tiny_render.yaml" in c for c in commands), commands


def test_readme_jobs_succeed_on_a_fresh_head(head, tmp_path):
    out = tmp_path / "out"
    commands = readme_submit_commands()
    train = next(c for c in commands if "tiny_lora.yaml" in c)
    render = next(c for c in commands if "tiny_render.yaml" in c)

    submit(train, head, out)
    adapter = out / "registry" / "adapters" / "tiny-cross" / "1"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file() and (adapter / "adapter.json").is_file()

    submit(render, head, out)
    images = sorted((out / "render" / "images").glob("*.png"))
    assert len(images) == 2, images
    assert (out / "render" / "manifest.parquet").is_file()
    errors = out / "render" / "errors.jsonl"
    assert not errors.exists() or errors.read_text().strip() == "", errors.read_text()  # the adapter row rendered too
