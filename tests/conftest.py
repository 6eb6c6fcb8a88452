"""Shared fixtures: one loopback S3 server and one Ray cluster per test session."""

from __future__ import annotations

import os
import uuid

import pytest

# No test may reach a model hub; the loader must say so clearly instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's worker pool, for every cluster the tests start (the session's and those of subprocess
# jobs, which inherit this environment): keep up to 8 idle workers for 10 minutes instead of
# killing those above num_cpus after 1 s. A worker that ran a Ray Data task has imported Ray Data,
# pyarrow and torch (seconds of CPU each on a 2-core machine); reused, the next stage or job skips
# that start-up instead of starting a fresh process.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")


def pytest_collection_modifyitems(config, items):
    import torch

    # Modules with background jobs (below) run last: their jobs get the whole session to finish.
    late = {item.module.__name__ for item in items if getattr(item.module, "BACKGROUND_JOBS", None)}
    items[:] = [i for i in items if i.module.__name__ not in late] + [i for i in items if i.module.__name__ in late]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Background jobs. A test module may name long, self-contained subprocesses in a module-level
# ``BACKGROUND_JOBS = {name: spec}``, where ``spec(workdir) -> (argv, env, cwd)`` (the demo: ~3
# minutes with its own Ray cluster; the bench smoke runs). Once the session's tests are collected,
# they run one after another at a low CPU priority (nice 10: about a tenth of a busy CPU) beside
# the other tests, which leave the CPUs idle much of the time (Ray and process start-ups, HTTP
# waits); their modules run last and get each result from the ``background`` fixture, which starts
# a job at once if it has not begun. Not the idle class (SCHED_IDLE): on a busy 2-core machine it
# starved a job's Ray start-up past Ray's fixed 30 s wait for its raylet.
class Background:
    """One background subprocess; ``result(timeout)`` waits for it: (returncode, stdout, stderr)."""

    def __init__(self, spec, workdir: str):
        self.spec, self.workdir, self.proc = spec, workdir, None

    def start(self, nice: bool) -> None:
        import subprocess
        import sys

        argv, env, cwd = self.spec(self.workdir)
        self.out, self.err = (open(os.path.join(self.workdir, n), "w+") for n in ("stdout", "stderr"))
        # its own process group (to stop it whole), but this session: with the kernel's autogroup
        # scheduling a new session would be a CPU group of its own, sharing the CPUs equally with
        # the tests whatever its priority
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self.out, stderr=self.err, **group)
        if nice:  # before it starts anything (Python's start-up alone takes longer); its children inherit it
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, 10)

    def result(self, timeout: float) -> tuple[int, str, str]:
        import subprocess

        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            rc = -1
        self.out.seek(0)
        self.err.seek(0)
        return rc, self.out.read(), self.err.read()

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the process group this subprocess leads
            self.proc.wait()


class BackgroundJobs:
    def __init__(self, specs: dict, root: str):
        import threading

        self.jobs = {}
        for name, spec in specs.items():
            os.makedirs(os.path.join(root, name))
            self.jobs[name] = Background(spec, os.path.join(root, name))
        self.lock = threading.Lock()
        self.stopped = False
        threading.Thread(target=self._run, daemon=True, name="background-jobs").start()

    def _run(self) -> None:
        for job in self.jobs.values():
            with self.lock:
                if self.stopped:
                    return
                if job.proc is not None:  # a test asked for it first
                    continue
                job.start(nice=True)
            job.proc.wait()

    def job(self, name: str) -> Background:
        job = self.jobs[name]
        with self.lock:
            if job.proc is None:
                job.start(nice=False)
        return job

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
        for job in self.jobs.values():
            job.stop()


def pytest_collection_finish(session):
    import shutil
    import tempfile

    if session.config.option.collectonly:
        return
    specs = {}
    for item in session.items:
        specs.update(getattr(item.module, "BACKGROUND_JOBS", None) or {})
    if specs:
        root = tempfile.mkdtemp(prefix="rayimg-test-bg-")
        jobs = BackgroundJobs(specs, root)
        session.config.stash[BACKGROUND_KEY] = jobs
        session.config.add_cleanup(lambda: (jobs.stop(), shutil.rmtree(root, ignore_errors=True)))


BACKGROUND_KEY = pytest.StashKey["BackgroundJobs"]()


@pytest.fixture(scope="session")
def background(request) -> BackgroundJobs:
    """This session's background jobs (see above); ``background.job(name).result(timeout)``."""
    return request.config.stash[BACKGROUND_KEY]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on 127.0.0.1 with a free port; boto3 reaches it over
    HTTP through AWS_ENDPOINT_URL, exactly as it would reach any S3-compatible store."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def storage(s3_server):
    from rayimg.storage import Storage

    return Storage()


@pytest.fixture
def s3_bucket(storage):
    """A fresh, empty bucket for one test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """One local Ray cluster for the whole session (ray.init is slow on 2 cores). It starts after
    the S3 server so its workers inherit the endpoint and credentials from the environment."""
    import ray

    os.environ.setdefault("RAYIMG_CACHE", str(tmp_path_factory.mktemp("rayimg-cache")))
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def publish_tiny_lora():
    """``publish(registry, name, seed, version=None, metadata=None) -> version``: publish a random rank-4 LoRA for
    the tiny SD model through the project's own trainee, export and registry (the model and
    trainee are built once per session; each adapter gets its own seeded up-weights)."""
    import tempfile

    import torch

    from rayimg.config import ModelConfig, TrainJob, from_dict
    from rayimg.models.loader import load_model
    from rayimg.storage import Storage
    from rayimg.train.export import lora_state_dicts, save_lora
    from rayimg.registry import publish_adapter
    from rayimg.train.trainee import build_trainee

    state = {}

    def publish(registry: str, name: str, seed: int, version=None, metadata: dict | None = None) -> str:
        if not state:
            loaded = load_model(ModelConfig(device="cpu"))
            tj = from_dict(TrainJob, {"cache": "unused", "train": {"mixed_precision": "no"}, "lora": {"rank": 4}})
            state.update(loaded=loaded, trainee=build_trainee(loaded, tj))
        loaded, trainee = state["loaded"], state["trainee"]
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in trainee.unet.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        with tempfile.TemporaryDirectory() as d:
            save_lora(d, "sd", lora_state_dicts(trainee)["unet"])
            _uri, version = publish_adapter(Storage(), registry, name, version, d,
                                            {"base_model": {"id": loaded.model_id, "hash": loaded.model_hash}, "method": "lora", "rank": 4,
                                             **(metadata or {})})
        return version

    return publish
