"""Quiet, useful logs, over the real CLI in subprocesses: a tiny train job (2 CPU workers, 6 steps)
and a tiny prepare job print one progress line per interval, each once, no progress bars or
library chatter from inside workers, and their summary line; the whole output stays short. The
prepare job runs under umask 002, which its own Ray cluster's workers inherit: its cache files
are group-writable."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from tests import datasets

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WORKER_PREFIX = re.compile(r"^\((\w+) pid=\d+(?:, ip=[\d.]+)?\)\s?")
# Progress bars and per-dataset notices of Ray Data, tqdm bars, Ray Train's INFO chatter and
# deprecation warnings: none says anything a user of the job acts on.
CHATTER = [re.compile(p) for p in (
    r"\d+%\|", r"it/s\]", r"row/s", r"Running Dataset", r"Dataset .* row", r"Dataset \S+ execution (finished|started)",
    r"Progress bars disabled", r"Reporting training result", r"Checkpoint successfully created", r"Moving model to device",
    r"Wrapping provided model", r"DeprecationWarning", r"is deprecated",
)]


@pytest.fixture
def ray_tmp():
    # short: Ray's socket paths under it must fit in 107 characters
    path = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def rayimg(args: list[str], ray_tmp: Path, timeout: float = 600, umask: int | None = None) -> list[str]:
    """Run ``python -m rayimg.cli ARGS`` on a local Ray cluster of its own (under ``umask`` if
    given); its stdout and stderr together, as lines without colour codes. Fails on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "rayimg.cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout,
                            preexec_fn=None if umask is None else (lambda: os.umask(umask)))
    lines = [ANSI.sub("", line) for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == 0, "\n".join(lines[-40:])
    return lines


def check_quiet(lines: list[str], max_lines: int) -> list[str]:
    """Common checks: at most ``max_lines`` lines, no chatter, no line twice. Returns the lines
    without their Ray worker prefix."""
    text = "\n".join(lines)
    assert len(lines) <= max_lines, f"{len(lines)} lines (at most {max_lines}):\n{text}"
    for pattern in CHATTER:
        assert not [line for line in lines if pattern.search(line)], f"a line matches {pattern.pattern!r}:\n{text}"
    bare = [WORKER_PREFIX.sub("", line) for line in lines]
    repeated = {line: n for line, n in Counter(bare).items() if n > 1}
    assert not repeated, f"repeated lines {repeated}:\n{text}"
    assert not [line for line in lines if "[repeated" in line], f"Ray deduplicated repeated lines:\n{text}"
    return bare


def test_tiny_train_job_prints_each_progress_line_once(tmp_path, ray_tmp):
    steps = 6
    lines = rayimg(["train", "--config", "jobs/configs/tiny_lora.yaml", f"train.max_steps={steps}", "scaling.num_workers=2",
                    "checkpoint.every_n_steps=3", f"checkpoint.storage_path={tmp_path / 'runs'}",
                    f"publish.registry={tmp_path / 'registry'}"], ray_tmp)
    # Our own lines: the job, a progress line at steps 3 and 6 (the checkpoints), the pictures and
    # the summary (5). Ray's start-up notice (token auth) and its one error-level line per process
    # about actor restarts (the Train controller's preemption watcher) are the rest today; 16
    # leaves room for a Ray warning worth reading, while one repeated or per-step line per worker
    # (12+) or any Ray Data progress output (dozens) goes over.
    bare = check_quiet(lines, max_lines=16)
    progress = [line for line in bare if line.startswith("[train] step ")]
    assert [int(re.match(r"\[train\] step (\d+)", line).group(1)) for line in progress] == [3, 6], "\n".join(lines)
    for line in progress:
        assert re.fullmatch(rf"\[train\] step (\d+): loss \d+\.\d+, lr \S+, [\d.]+ images/s; \1/{steps} steps \(\d+%\), ETA \d+s", line), line
    assert any(line.startswith("[train] done in ") for line in bare), "\n".join(lines)


def test_tiny_prepare_job_prints_each_progress_line_once(tmp_path, ray_tmp):
    (tmp_path / "prepare.yaml").write_text(
        "model: {pretrained: rayimg-tiny-shapes, family: sd, dtype: float32, device: cpu}\n"
        "data: {source: jobs/data/crosses, format: imagefolder}\n"
        "transforms: {resolution: 64}\n"
        f"cache: {{output: {tmp_path / 'cache'}, shard_size: 4, batch_size: 4}}\n")
    lines = rayimg(["prepare", "--config", str(tmp_path / "prepare.yaml")], ray_tmp, umask=0o002)
    # Our own lines: the job, a progress line per 5 s (one or two on 8 rows) and the summary (4);
    # Ray's token-auth notice and its one error-level line about the encoder actor's restarts;
    # 10 leaves room for a Ray warning worth reading.
    bare = check_quiet(lines, max_lines=10)
    progress = [line for line in bare if re.match(r"\[prepare\] \d+/\d+ rows", line)]
    assert progress and progress[-1].startswith("[prepare] 8/8 rows (100%)"), "\n".join(lines)
    for line in progress:
        assert re.search(r"[\d.]+ rows/s", line) and ("ETA" in line or line.startswith("[prepare] 8/8")), line
    assert any(line.startswith("[prepare] done: 8 row(s) read, 8 kept") for line in bare), "\n".join(lines)
    # umask 002: files 0664 and directories 0775, the shards written by the job's workers included
    cache = tmp_path / "cache"
    files, dirs = datasets.file_modes(cache)
    assert any(k.endswith(".safetensors") for k in files) and "manifest.jsonl" in files, files
    assert set(files.values()) == {"0o664"}, files
    assert set(dirs.values()) == {"0o775"}, dirs
