"""`rayimg train` on Ray Train with 2 CPU workers and tiny models: methods, exports, resume, and
workers the test itself kills."""

from __future__ import annotations

import json
import os
import signal
import threading

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from rayimg.config import ModelConfig, PrepareJob, TrainJob, from_dict
from rayimg.models.loader import load_pipeline
from rayimg.run.prepare import run as prepare
from rayimg.run.train import run as train, weights_sha256
from rayimg.train.export import file_sha256

from tests import datasets


@pytest.fixture(scope="module")
def cache(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-cache")
    src = datasets.imagefolder(root / "ds", 8)
    prepare(from_dict(PrepareJob, {"data": {"source": str(src)}, "cache": {"output": str(root / "cache")},
                                   "transforms": {"resolution": 64}, "model": {"device": "cpu"}}))
    return root


def job(tmp_path, **sections) -> TrainJob:
    data = {
        "model": {"device": "cpu"},
        "train": {"resolution": 64, "batch_size": 2, "max_steps": 4, "learning_rate": 1e-3, "mixed_precision": "no",
                  **sections.pop("train", {})},
        "scaling": {"num_workers": 2, **sections.pop("scaling", {})},
        "checkpoint": {"storage_path": str(tmp_path / "runs"), "every_n_steps": 2, **sections.pop("checkpoint", {})},
        "publish": {"registry": str(tmp_path / "registry"), "name": "test-adapter", **sections.pop("publish", {})},
    }
    data.update(sections)
    return from_dict(TrainJob, data)


def render(pipe, prompt="a red circle on a white background", seed=0):
    g = torch.Generator().manual_seed(seed)
    return np.asarray(pipe(prompt, num_inference_steps=2, width=64, height=64, generator=g, output_type="np").images[0])


def test_lora_from_cache_loss_falls_and_exports_load(cache, tmp_path):
    r = train(job(tmp_path, cache=str(cache / "cache"),
                  train={"max_steps": 24, "learning_rate": 5e-3, "lr_scheduler": "constant"},
                  checkpoint={"every_n_steps": 12}, lora={"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]}))
    losses = r["losses"]
    assert len(losses) == 24
    assert np.mean(losses[-8:]) < np.mean(losses[:8]), losses
    adapter = tmp_path / "registry" / "adapters" / "test-adapter" / "1"
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["weights"]["pytorch_lora_weights.safetensors"] == file_sha256(adapter / "pytorch_lora_weights.safetensors")
    assert meta["method"] == "lora" and meta["rank"] == 4 and meta["steps"] == 24
    base = load_pipeline(ModelConfig(device="cpu"))
    before = render(base)
    base.load_lora_weights(str(adapter))  # plain diffusers, unchanged
    after = render(base)
    assert np.abs(after - before).mean() > 1e-3
    kohya = load_pipeline(ModelConfig(device="cpu"))
    kohya.load_lora_weights(str(adapter), weight_name="lora_kohya.safetensors")
    np.testing.assert_allclose(render(kohya), after, atol=2e-3)


def test_textual_inversion_loads_in_plain_diffusers(cache, tmp_path):
    train(job(tmp_path, cache=str(cache / "cache"), train={"method": "textual_inversion", "learning_rate": 5e-2},
              textual_inversion={"placeholder_token": "<shape>", "initializer_token": "circle"}))
    adapter = tmp_path / "registry/adapters/test-adapter/1"
    pipe = load_pipeline(ModelConfig(device="cpu"))
    plain = render(pipe, "a <shape> on a white background")
    pipe.load_textual_inversion(str(adapter), token="<shape>")
    ids = pipe.tokenizer("<shape>", add_special_tokens=False).input_ids
    assert len(ids) == 1 and ids[0] >= len(pipe.tokenizer) - 1
    assert np.abs(render(pipe, "a <shape> on a white background") - plain).mean() > 0


def check_full_finetune_export(r, out):
    """The model a 2-worker full fine-tune published at ``out`` loads in plain diffusers with the
    base UNet's keys, holds no empty tensor (no empty ZeRO-3 partition was saved) and is trained
    (more than half its tensors differ from the base); both ranks digested the weights they would
    save (gathered under ZeRO-3): equal, and the very weights rank 0 exported."""
    pipe = load_pipeline(ModelConfig(pretrained=str(out), device="cpu"))
    base = load_pipeline(ModelConfig(device="cpu"))
    trained, orig = pipe.unet.state_dict(), base.unet.state_dict()
    assert trained.keys() == orig.keys()
    assert all(v.numel() > 0 for v in trained.values())  # no empty ZeRO-3 partitions were saved
    changed = sum(not torch.equal(trained[k], orig[k]) for k in trained)
    assert changed > len(trained) // 2
    digests = r["metrics"]["weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1], digests
    saved = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert weights_sha256({f"unet.{k}": v for k, v in saved.items()}) == digests[0]


def test_full_finetune_with_deepspeed_zero2_on_cpu(cache, tmp_path):
    """ZeRO-2; ZeRO-3's export is checked by test_deepspeed_run_resumes_from_its_checkpoint."""
    r = train(job(tmp_path, cache=str(cache / "cache"), train={"method": "full", "max_steps": 2, "learning_rate": 1e-4},
                  deepspeed={"enabled": True, "stage": 2}))
    assert len(r["losses"]) == 2
    check_full_finetune_export(r, tmp_path / "registry" / "models" / "test-adapter")


def test_deepspeed_run_resumes_from_its_checkpoint(cache, tmp_path):
    """A ZeRO-3 run continued under the same run name picks up its checkpoint (DeepSpeed's files
    loaded with weights_only=True, the loop's state from safetensors + JSON) and trains on; the
    model it publishes is a complete ZeRO-3 export (gathered, not empty partitions)."""
    common = dict(cache=str(cache / "cache"), deepspeed={"enabled": True, "stage": 3},
                  checkpoint={"run_name": "ds-resume", "every_n_steps": 2})
    first = train(job(tmp_path, train={"method": "full", "max_steps": 2, "learning_rate": 1e-4}, **common))
    ckpt = sorted(p for p in (tmp_path / "runs" / "ds-resume").glob("checkpoint_*") if p.is_dir())[-1]
    assert (ckpt / "deepspeed" / "zero").is_dir() and (ckpt / "lr_scheduler.json").exists()
    assert not list(ckpt.glob("*.pt"))  # the loop's own state is not pickled
    more = train(job(tmp_path, train={"method": "full", "max_steps": 3, "learning_rate": 1e-4},
                     publish={"name": "ds-more"}, **common))
    # the first two losses come from the checkpoint's state.json: the run resumed at step 2
    assert more["losses"][:2] == first["losses"] and len(more["losses"]) == 3
    check_full_finetune_export(more, tmp_path / "registry" / "models" / "ds-more")


class KillAWorker:
    """Test-side fault: once the run's first checkpoint is registered (Ray Train writes
    ``checkpoint_manager_snapshot.json`` into the run dir), SIGKILL one Ray Train worker — a
    process of this test session's own Ray cluster, found among this process's descendants."""

    def __init__(self, run_dir):
        self.snapshot = run_dir / "checkpoint_manager_snapshot.json"
        self.killed_pid, self.checkpointed_steps, self._stop = None, None, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        while not self._stop.wait(0.02):
            try:
                steps = [c["metrics"]["step"] for c in json.loads(self.snapshot.read_text())["checkpoint_results"]]
            except (OSError, ValueError):  # not written yet, or half-written
                continue
            for proc in psutil.Process().children(recursive=True):
                try:
                    if " ".join(proc.cmdline()).startswith("ray::RayTrainWorker"):
                        self.checkpointed_steps = steps
                        os.kill(proc.pid, signal.SIGKILL)
                        self.killed_pid = proc.pid
                        return
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue


def test_killed_worker_restarts_from_its_checkpoint_and_reproduces_the_uninterrupted_run(cache, tmp_path):
    """A worker killed after the run's first checkpoint is restarted by Ray Train (max_failures 1)
    from that checkpoint, and the run completes with the uninterrupted run's losses."""
    common = dict(cache=str(cache / "cache"), train={"max_steps": 10, "learning_rate": 5e-3})
    full = train(job(tmp_path, checkpoint={"run_name": "uninterrupted", "max_failures": 1}, **common))["losses"]
    with KillAWorker(tmp_path / "runs" / "restarted") as fault:
        r = train(job(tmp_path, checkpoint={"run_name": "restarted", "max_failures": 1}, publish={"name": "restarted"}, **common))
    assert fault.killed_pid is not None  # a worker really died mid-run
    assert fault.checkpointed_steps and max(fault.checkpointed_steps) < 10, fault.checkpointed_steps
    assert len(r["losses"]) == 10 and r["steps"] == 10
    np.testing.assert_allclose(r["losses"], full, rtol=1e-5)


def test_lora_full_bf16_with_regional_compile(cache, tmp_path):
    """train.full_bf16 (bf16 LoRA weights, no autocast) with the transformer blocks compiled: the
    loss stays finite and the exported adapter is trained (not the zero init) and loads."""
    train(job(tmp_path, cache=str(cache / "cache"), scaling={"num_workers": 1},
              train={"max_steps": 2, "mixed_precision": "bf16", "full_bf16": True, "compile": "regional"},
              lora={"rank": 4}))
    from safetensors.torch import load_file

    adapter = tmp_path / "registry" / "adapters" / "test-adapter" / "1"
    weights = load_file(str(adapter / "pytorch_lora_weights.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if ".up." in k or "lora_B" in k)
    pipe = load_pipeline(ModelConfig(device="cpu"))
    pipe.load_lora_weights(str(adapter))
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["training_config"]["train"]["full_bf16"] is True
