"""The CLI's config contract, through real subprocesses: a bad config exits 2 naming the field
on stderr; `--dry-run` validates and prints the resolved config as YAML without starting Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from rayimg.config import JOBS, load_job, to_dict

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"


def rayimg(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m rayimg.cli ARGS` from the repo root."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "rayimg.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_help_lists_every_job():
    result = rayimg("--help")
    assert result.returncode == 0, result.stderr
    for job in ("prepare", "train", "render", "serve", "demo"):
        assert job in result.stdout


@pytest.mark.parametrize(
    "text, overrides, field, expected",
    [
        ("cache: c\nlora:\n  rank: 0\n", [], "lora.rank", ">= 1"),
        ("cache: c\ntrain:\n  learning_rat: 1.0e-4\n", [], "train.learning_rat", "learning_rate"),
        ("cache: c\n", ["train.method=lorra"], "train.method", "'textual_inversion'"),
        ("cache: c\n", ["publish.name=../x"], "publish.name", "'../x'"),
    ],
    ids=["out-of-range", "unknown-key", "literal-override", "adapter-name"],
)
def test_config_error_exits_2_naming_the_field(tmp_path, text, overrides, field, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = rayimg("train", "--config", str(config), *overrides)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"error: {field}: " in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = rayimg("train", "--config", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_dry_run_prints_the_resolved_config(tmp_path):
    result = rayimg(
        "train", "--config", "jobs/configs/sdxl_lora.yaml", "--dry-run",
        "train.learning_rate=5e-5", "lora.target_modules=[to_q,to_v]", "lora.rank=32",
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["learning_rate"] == 5e-5
    assert printed["lora"]["rank"] == 32 and printed["lora"]["target_modules"] == ["to_q", "to_v"]
    assert printed["model"]["pretrained"] == "stabilityai/stable-diffusion-xl-base-1.0"
    # Every field is printed, defaults included, and the output loads back as the same config.
    expected = load_job("train", CONFIGS / "sdxl_lora.yaml", ["train.learning_rate=5e-5", "lora.target_modules=[to_q,to_v]", "lora.rank=32"])
    assert printed == to_dict(expected)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(result.stdout)
    assert load_job("train", resolved) == expected


def test_dry_run_with_a_bad_override_still_exits_2():
    result = rayimg("render", "--config", "jobs/configs/render_catalog.yaml", "--dry-run", "defaults.scheduler=lms")
    assert result.returncode == 2
    assert "error: defaults.scheduler: " in result.stderr and "dpmpp_2m" in result.stderr
    assert result.stdout == ""


# Runs the CLI module as `python -m rayimg.cli` does, with ray.init replaced by a tripwire
# (Ray's auto-init of ray.remote, Ray Data, Train and Serve goes through ray.init too).
NO_RAY = textwrap.dedent(
    """
    import runpy, sys
    import ray

    def tripwire(*args, **kwargs):
        print("RAY-STARTED", file=sys.stderr)
        raise SystemExit(99)

    ray.init = tripwire
    sys.argv = ["rayimg", *sys.argv[1:]]
    try:
        runpy.run_module("rayimg.cli", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code
    assert not ray.is_initialized(), "RAY-STARTED"
    sys.exit(code)
    """
)


@pytest.mark.parametrize(
    "job, config",
    [
        ("prepare", "prepare_sdxl.yaml"),
        ("train", "sdxl_full_deepspeed.yaml"),
        ("render", "render_catalog.yaml"),
        ("serve", "serve.yaml"),
        ("demo", None),
    ],
)
def test_dry_run_validates_without_starting_ray(tmp_path, job, config):
    if config is None:
        (tmp_path / "demo.yaml").write_text("output_dir: outputs/demo-dry-run\n")
        path = tmp_path / "demo.yaml"
    else:
        path = CONFIGS / config
    result = subprocess.run(
        [sys.executable, "-c", NO_RAY, job, "--config", str(path), "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert "RAY-STARTED" not in result.stderr
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == to_dict(load_job(job, path))
    assert set(yaml.safe_load(result.stdout)) == {f for f in JOBS[job].__dataclass_fields__}


def test_help_config_lists_every_field():
    result = rayimg("train", "--help-config")
    assert result.returncode == 0, result.stderr
    for name in ("train.learning_rate", "lora.target_modules", "deepspeed.stage", "publish.name"):
        assert name in result.stdout
