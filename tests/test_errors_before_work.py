"""Errors before work, over the real CLI in subprocesses: what can be checked without Ray (model
dir and family, a hub id while offline or unreachable, a GPU asked for on a local cluster
without CUDA, missing inputs locally and on S3, relative outputs under `ray job submit`) exits 2
with exactly one stderr line `error: <field>: <problem>`, and Ray never starts (no session dir
under the run's RAY_TMPDIR). A failure inside Ray workers (a render actor whose model asks for
CUDA on a CPU-only cluster, a train worker refusing its textual-inversion token) exits 1 with
one `error:` line naming the root cause and no driver traceback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests import datasets

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "rayimg" / "models" / "pretrained" / "rayimg-tiny-shapes"
FAST_S = 60.0  # a pre-Ray failure on this shared 2-core machine; starting Ray alone takes longer under load


def rayimg(args: list[str], ray_tmp: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m rayimg.cli ARGS` from the repo root, with Ray's temp root at ``ray_tmp``."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    return subprocess.run([sys.executable, "-m", "rayimg.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def ray_sessions(ray_tmp: Path) -> list[str]:
    """Ray's session dirs under RAY_TMPDIR (Ray's temp root is ``$RAY_TMPDIR/ray``)."""
    return sorted(p.name for p in ray_tmp.glob("ray/session_*"))


@pytest.fixture
def ray_tmp():
    # short: Ray's socket paths under it must fit in 107 characters
    path = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    catalog = root / "catalog.jsonl"
    catalog.write_text(json.dumps({"prompt": "a red circle on a white background", "seed": 1}) + "\n")
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("no model_index.json here\n")
    dataset = datasets.imagefolder(root / "ds", 2)
    return {"root": root, "catalog": catalog, "not_a_model": not_a_model, "dataset": dataset}


def render_args(files, *overrides: str) -> list[str]:
    return ["render", f"catalog.source={files['catalog']}", f"output.uri={files['root'] / 'out'}",
            f"registry={files['root'] / 'reg'}", "model.pretrained=rayimg-tiny-shapes", "model.dtype=float32",
            "model.device=cpu", "defaults.steps=2", "defaults.width=64", "defaults.height=64", *overrides]


def train_args(files, *overrides: str) -> list[str]:
    return ["train", f"data.source={files['dataset']}", "model.pretrained=rayimg-tiny-shapes", "model.device=cpu",
            "train.resolution=64", "transforms.resolution=64", "train.mixed_precision=no", "train.max_steps=2",
            f"checkpoint.storage_path={files['root'] / 'runs'}", f"publish.registry={files['root'] / 'reg'}", *overrides]


def prepare_args(files, *overrides: str) -> list[str]:
    return ["prepare", f"data.source={files['dataset']}", f"cache.output={files['root'] / 'cache'}",
            "model.pretrained=rayimg-tiny-shapes", "model.device=cpu", "transforms.resolution=64", *overrides]


def assert_one_line_before_ray(result: subprocess.CompletedProcess, seconds: float, ray_tmp: Path, field: str, expected: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-4000:])
    assert len(lines) == 1, result.stderr[-4000:]
    assert lines[0].startswith(f"error: {field}: "), lines[0]
    assert expected in lines[0], lines[0]
    assert ray_sessions(ray_tmp) == [], "Ray was started"
    assert seconds < FAST_S, f"took {seconds:.1f}s"


# --------------------------------------------------------------------------- before Ray: exit 2, one line
CASES = {
    "missing-model-dir": (lambda f: render_args(f, f"model.pretrained={f['root'] / 'no-such-model'}"), {},
                          "model.pretrained", "does not exist"),
    "not-a-diffusers-dir": (lambda f: render_args(f, f"model.pretrained={f['not_a_model']}"), {},
                            "model.pretrained", "no model_index.json"),
    "wrong-family": (lambda f: render_args(f, "model.family=sdxl"), {}, "model.family", "is an 'sd' model"),
    "hub-id-offline": (lambda f: render_args(f, "model.pretrained=rayimg-test/not-cached"),
                       {"HF_HUB_OFFLINE": "1"}, "model.pretrained", "offline"),
    "train-missing-dataset": (lambda f: train_args(f, f"data.source={f['root'] / 'no-such-ds'}"), {},
                              "data.source", "does not exist"),
    "train-missing-cache": (lambda f: train_args(f, f"cache={f['root'] / 'no-such-cache'}"), {}, "cache", "does not exist"),
    "render-missing-catalog": (lambda f: render_args(f, f"catalog.source={f['root'] / 'none.jsonl'}"), {},
                               "catalog.source", "does not exist"),
    "render-catalog-is-a-dir": (lambda f: render_args(f, f"catalog.source={f['root']}"), {}, "catalog.source", "not a file"),
    "prepare-missing-dataset": (lambda f: prepare_args(f, f"data.source={f['root'] / 'nothing'}"), {},
                                "data.source", "does not exist"),
    "relative-output-under-job-submit": (lambda f: render_args(f, "output.uri=outputs/render"),
                                         {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}})},
                                         "output.uri", "relative path"),
    "relative-registry-under-job-submit": (lambda f: train_args(f, "publish.registry=outputs/registry"),
                                           {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}})},
                                           "publish.registry", "relative path"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fails_before_ray_with_one_line(case, files, ray_tmp):
    make_args, env, field, expected = CASES[case]
    t0 = time.perf_counter()
    result = rayimg(make_args(files), ray_tmp, env)
    assert_one_line_before_ray(result, time.perf_counter() - t0, ray_tmp, field, expected)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_id_without_network(files, ray_tmp, tmp_path):
    """Online mode, but the hub cannot be reached (a closed local port stands in for no network)
    and the hub cache is empty."""
    env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
           "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    t0 = time.perf_counter()
    result = rayimg(render_args(files, "model.pretrained=rayimg-test/unreachable"), ray_tmp, env)
    assert_one_line_before_ray(result, time.perf_counter() - t0, ray_tmp, "model.pretrained", "cannot be reached")
    assert str(tmp_path / "hub") in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("job, override, field", [
    ("render", "model.device=cuda", "model.device"),
    ("render", "num_gpus_per_actor=1", "num_gpus_per_actor"),
    ("train", "scaling.use_gpu=true", "scaling.use_gpu"),
    ("prepare", "cache.num_gpus_per_actor=1", "cache.num_gpus_per_actor"),
    ("render", "model.dtype=float16", "model.dtype"),
])
def test_gpu_asked_for_on_a_local_cluster_without_cuda(job, override, field, files, ray_tmp):
    args = {"render": render_args, "train": train_args, "prepare": prepare_args}[job](files, override)
    t0 = time.perf_counter()
    result = rayimg(args, ray_tmp)
    assert_one_line_before_ray(result, time.perf_counter() - t0, ray_tmp, field, "no CUDA" if field != "model.dtype" else "float16")


def test_missing_inputs_on_s3(files, ray_tmp, storage, s3_bucket):
    """The loopback S3 server: a catalog object and a dataset prefix that are not there."""
    storage.write_text(f"s3://{s3_bucket}/present/x.txt", "x")
    for args, field in [
        (render_args(files, f"catalog.source=s3://{s3_bucket}/catalogs/none.jsonl"), "catalog.source"),
        (prepare_args(files, f"data.source=s3://{s3_bucket}/datasets/none/"), "data.source"),
    ]:
        t0 = time.perf_counter()
        result = rayimg(args, ray_tmp)
        assert_one_line_before_ray(result, time.perf_counter() - t0, ray_tmp, field, "no such object")


def test_the_checks_pass_a_good_job_and_a_hub_id_in_the_local_cache(files, tmp_path, monkeypatch):
    """The same checks, in-process: a good config passes them, and a hub id offline resolves to
    the snapshot the local hub cache holds (a cache laid out as huggingface_hub writes it)."""
    from rayimg.config import ConfigError, load_job
    from rayimg.run import preflight

    preflight.check("render", load_job("render", None, render_args(files)[1:]))
    preflight.check("train", load_job("train", None, train_args(files)[1:]))

    hub = tmp_path / "hub"
    repo = hub / "models--rayimg-test--cached"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(TINY, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    job = load_job("render", None, render_args(files, "model.pretrained=rayimg-test/cached")[1:])
    preflight.check("render", job)  # passes: the snapshot is a diffusers dir of family 'sd'
    with pytest.raises(ConfigError, match="model.family: is 'sdxl'"):
        preflight.check("render", load_job("render", None, render_args(files, "model.pretrained=rayimg-test/cached", "model.family=sdxl")[1:]))


def test_ray_sessions_detects_a_started_ray(ray_tmp):
    """The 'Ray was not started' check above can fail: a process that starts Ray leaves a
    session dir under its RAY_TMPDIR."""
    code = ("import ray; ray.init(num_cpus=1, include_dashboard=False); ray.shutdown()")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "RAY_TMPDIR": str(ray_tmp)}, check=True,
                   capture_output=True, timeout=300)
    assert ray_sessions(ray_tmp), "no session dir after ray.init"


# --------------------------------------------------------------------------- inside Ray workers: exit 1, one line
def _worker_failure_checks(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-6000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and expected in errors[0], result.stderr[-6000:]
    # the driver prints no traceback of its own (workers' lines carry their "(name pid=...)" prefix)
    assert not any(line.startswith("Traceback") for line in result.stderr.splitlines()), result.stderr[-6000:]
    assert "Full stack trace" not in result.stderr


@pytest.fixture(scope="module")
def cluster_env(ray_cluster):
    """The environment of a driver that joins the test session's Ray cluster as a remote one
    (RAY_ADDRESS), the way a job on a GPU cluster runs from a driver without a GPU."""
    address = ray_cluster.get_runtime_context().gcs_address
    return {"RAY_ADDRESS": address, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a cluster without CUDA")
def test_render_actor_failure_is_one_line(files, ray_tmp, cluster_env):
    """model.device=cuda passes the driver's checks on a cluster (its workers may have GPUs);
    the render actor fails to load the model, and Ray Data gives up on it: one line."""
    result = rayimg(render_args(files, "model.device=cuda"), ray_tmp, cluster_env, timeout=400)
    _worker_failure_checks(result, "error: model.device: is 'cuda' but CUDA is not available on this machine")


def test_train_worker_failure_is_one_line(files, ray_tmp, cluster_env):
    """A token the tokenizer already has is refused in the train worker (Ray Train's
    WorkerGroupError around the worker's ValueError): one line with the worker's message."""
    result = rayimg(train_args(files, "train.method=textual_inversion", "textual_inversion.placeholder_token=red",
                               "checkpoint.max_failures=0"), ray_tmp, cluster_env, timeout=400)
    _worker_failure_checks(result, "error: textual_inversion.placeholder_token: 'red' is already a token")
