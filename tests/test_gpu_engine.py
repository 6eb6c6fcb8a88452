"""Engine speed options on a CUDA GPU: engine.fp8 (float8 tensor cores need compute capability
8.9+: compiled, close to bf16, adapter swaps requantize without recompiling) and compile_mode
reduce-overhead (CUDA graphs with in-place adapter swaps). Skipped elsewhere (`make test-gpu`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayimg.config import ModelConfig
from rayimg.models.loader import load_pipeline

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs a CUDA GPU of compute capability 8.9+")]

SDXL = "rayimg-tiny-sdxl"


def test_fp8_compiled_engine_close_to_bf16_and_swaps_without_recompiling(tmp_path):
    import torch._dynamo

    from rayimg.render.adapters import load_lora_file
    from rayimg.render.engine import Engine, GenerationRequest
    from rayimg.render.fp8 import Float8Linear
    from tests.test_render_engine import make_lora

    cfg = ModelConfig(pretrained=SDXL, device="cuda", dtype="bfloat16")
    exact = Engine(load_pipeline(cfg), fuse_qkv=True)
    pipe = load_pipeline(cfg)
    engine = Engine(pipe, compile=True, fuse_qkv=True, channels_last=True, fp8=True)
    assert any(isinstance(m, Float8Linear) for m in pipe.unet.modules())
    req = GenerationRequest(prompt="a blue star", steps=3, width=64, height=64, seed=5)
    base = engine.generate([req], output_type="latent")[0].float()
    ref = exact.generate([req], output_type="latent")[0].float()
    rel = float((base - ref).norm() / ref.norm())
    assert 0 < rel < 0.15, rel

    d = tmp_path / "lora"
    make_lora(d, "sdxl", 1, rank=4, alpha=4, unet_targets=["to_q", "to_k", "to_v", "to_out.0"])
    weights = load_lora_file(d / "pytorch_lora_weights.safetensors", name="l1", unet_config=pipe.unet.config)
    torch._dynamo.utils.counters.clear()
    engine.set_adapters([(weights, 1.0)], [("l1", "1", 1.0)])
    adapted = engine.generate([GenerationRequest(prompt="a blue star", steps=3, width=64, height=64, seed=5,
                                                 adapters=(("l1", "1", 1.0),))], output_type="latent")[0].float()
    engine.set_adapters([], [])
    back = engine.generate([req], output_type="latent")[0].float()
    assert torch._dynamo.utils.counters["stats"].get("unique_graphs", 0) == 0, dict(torch._dynamo.utils.counters["stats"])
    assert float((adapted - base).abs().mean()) > 1e-3
    np.testing.assert_array_equal(back.cpu().numpy(), base.cpu().numpy())


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_cuda_graph_engine_swaps_adapters_in_place(tmp_path, scheduler):
    """compile_mode reduce-overhead (CUDA graphs): the replayed graphs read the weights in place, so a
    fused adapter shows and restoring gives the base image back; multistep schedulers keep no
    graph-owned outputs across steps."""
    from rayimg.render.adapters import load_lora_file
    from rayimg.render.engine import Engine, GenerationRequest
    from tests.test_render_engine import make_lora

    cfg = ModelConfig(pretrained=SDXL, device="cuda", dtype="bfloat16")
    eager = Engine(load_pipeline(cfg))
    pipe = load_pipeline(cfg)
    engine = Engine(pipe, compile=True, compile_mode="reduce-overhead")
    req = GenerationRequest(prompt="a blue star", steps=4, width=64, height=64, seed=5, scheduler=scheduler)
    base = engine.generate([req], output_type="latent")[0].float()
    again = engine.generate([req], output_type="latent")[0].float()
    ref = eager.generate([req], output_type="latent")[0].float()
    assert torch.equal(base, again)
    assert float((base - ref).norm() / ref.norm()) < 0.05
    d = tmp_path / "lora"
    make_lora(d, "sdxl", 1, rank=4, alpha=4, unet_targets=["to_q", "to_k", "to_v", "to_out.0"])
    weights = load_lora_file(d / "pytorch_lora_weights.safetensors", name="l1", unet_config=pipe.unet.config)
    engine.set_adapters([(weights, 1.0)], [("l1", "1", 1.0)])
    adapted = engine.generate([GenerationRequest(prompt="a blue star", steps=4, width=64, height=64, seed=5, scheduler=scheduler,
                                                 adapters=(("l1", "1", 1.0),))], output_type="latent")[0].float()
    engine.set_adapters([], [])
    assert float((adapted - base).abs().mean()) > 1e-3
    assert torch.equal(engine.generate([req], output_type="latent")[0].float(), base)
