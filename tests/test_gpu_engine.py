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


@pytest.mark.parametrize("targets", ["norm_fed", "norm_fed+ff", "norm_fed+ff128"])
def test_fp8_compiled_engine_close_to_bf16_and_swaps_without_recompiling(tmp_path, targets):
    import torch._dynamo

    from rayimg.render.adapters import load_lora_file
    from rayimg.render.engine import Engine, GenerationRequest
    from rayimg.render.fp8 import Float8Linear
    from tests.test_render_engine import make_lora

    cfg = ModelConfig(pretrained=SDXL, device="cuda", dtype="bfloat16")
    exact = Engine(load_pipeline(cfg), fuse_qkv=True)
    pipe = load_pipeline(cfg)
    engine = Engine(pipe, compile=True, fuse_qkv=True, channels_last=True, fp8=True, fp8_targets=targets)
    assert any(isinstance(m, Float8Linear) for m in pipe.unet.modules())
    req = GenerationRequest(prompt="a blue star", steps=3, width=64, height=64, seed=5)
    base = engine.generate([req], output_type="latent")[0].float()
    ref = exact.generate([req], output_type="latent")[0].float()
    rel = float((base - ref).norm() / ref.norm())
    assert 0 < rel < 0.15, rel

    d = tmp_path / "lora"
    make_lora(d, "sdxl", 1, rank=4, alpha=4, unet_targets=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"])
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
    make_lora(d, "sdxl", 1, rank=4, alpha=4, unet_targets=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"])
    weights = load_lora_file(d / "pytorch_lora_weights.safetensors", name="l1", unet_config=pipe.unet.config)
    engine.set_adapters([(weights, 1.0)], [("l1", "1", 1.0)])
    adapted = engine.generate([GenerationRequest(prompt="a blue star", steps=4, width=64, height=64, seed=5, scheduler=scheduler,
                                                 adapters=(("l1", "1", 1.0),))], output_type="latent")[0].float()
    engine.set_adapters([], [])
    assert float((adapted - base).abs().mean()) > 1e-3
    assert torch.equal(engine.generate([req], output_type="latent")[0].float(), base)


@pytest.mark.parametrize("mode", ["thread", "steps"])
def test_background_prompt_encoding_equals_encoding_in_place(tmp_path, mode):
    """On CUDA the next batch's prompts are encoded on a side stream (from a worker thread, or from
    this thread one text per step callback) while the CUDA-graph UNet denoises the current batch:
    the streamed PNGs equal render()'s bit for bit, and a text-encoder LoRA fused while a background
    encoding is in flight is honoured."""
    from rayimg.config import EngineConfig
    from rayimg.render.adapters import load_lora_file
    from rayimg.render.engine import GenerationRequest
    from rayimg.render.renderer import Renderer
    from tests.test_render_engine import in_place_latents, make_lora

    cfg = ModelConfig(pretrained=SDXL, device="cuda", dtype="bfloat16")
    pipe = load_pipeline(cfg)
    renderer = Renderer.from_pipeline(pipe, SDXL, "0" * 64, "sdxl",
                                      EngineConfig(compile=True, compile_mode="reduce-overhead", batch_invariant=False))
    engine = renderer.engine
    assert engine.prefetch_text
    engine.prefetch_mode = mode

    def req(seed, **kw):
        return GenerationRequest(prompt=f"a blue star {seed}", negative_prompt="blurry", steps=4, width=64, height=64, seed=seed, **kw)

    batches = [[req(2 * b), req(2 * b + 1)] for b in range(4)]
    streamed = [image.png for batch in renderer.render_stream(batches) for image, _ in batch]
    assert engine.text_stats["prefetched"] >= 4, engine.text_stats
    assert streamed == [image.png for batch in batches for image in renderer.render(batch)]

    d = tmp_path / "lora"
    make_lora(d, "sdxl", 2, rank=4, alpha=4, unet_targets=["to_q"], text_targets=["q_proj", "k_proj", "v_proj", "out_proj"])
    weights = load_lora_file(d / "pytorch_lora_weights.safetensors", name="t1", unet_config=pipe.unet.config)
    assert engine.prefetch([req(20)])
    engine.generate([req(1)], output_type="latent")  # "a blue star 20" encoded with the base encoders, in the background
    engine.set_adapters([(weights, 1.0)], [("t1", "1", 1.0)])
    adapted = req(20, adapters=(("t1", "1", 1.0),))
    ours = torch.stack(engine.generate([adapted], output_type="latent"))
    assert torch.equal(ours, in_place_latents(pipe, adapted))


def test_blockwise_mm_on_cuda_matches_the_dequantized_product():
    """cuBLAS's 1x128 block-scaled float8 GEMM reads the scales as quantize_blocks lays them out:
    the CUDA product equals the CPU path (dequantized operands, float32) up to rounding, for
    SDXL's two feed-forward widths, compiled with the quantization as the engine runs it."""
    from rayimg.render.fp8 import blockwise_mm, quantize_blocks

    g = torch.Generator(device="cuda").manual_seed(0)
    for m, k, n in [(256, 2560, 640), (128, 5120, 1280)]:
        x = (torch.randn(m, k, device="cuda", generator=g) * torch.rand(1, k, device="cuda", generator=g) * 4).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(torch.bfloat16)
        x[3, :128] = 0  # an all-zero block
        w8, ws = quantize_blocks(w)
        ws = ws.t().contiguous()
        x8, xs = torch.compile(quantize_blocks, dynamic=False)(x)
        assert xs.stride() == (1, m)
        ours = blockwise_mm(x8, xs, w8, ws, torch.bfloat16).float()
        cpu = blockwise_mm(x8.cpu(), xs.cpu(), w8.cpu(), ws.cpu(), torch.float32)
        assert float((ours.cpu() - cpu).norm() / cpu.norm()) < 5e-3
        exact = x.float() @ w.float().t()
        assert float((ours - exact).norm() / exact.norm()) < 0.05


def test_geglu_rows_fp8_kernel_matches_the_torch_path():
    """The Triton GEGLU-to-float8 kernel against quantize_rows(geglu_reference(h)): same scales
    (up to a last-bit difference of the GELU), the same float8 codes almost everywhere, odd widths
    and a row of zeros included."""
    from rayimg.render.fp8 import _geglu_rows_reference, geglu_reference, geglu_rows_fp8

    g = torch.Generator(device="cuda").manual_seed(0)
    for m, n in [(37, 2560), (5, 40), (3, 5120)]:
        h = (torch.randn(m, 2 * n, device="cuda", generator=g) * 3).to(torch.bfloat16)
        h[1] = 0
        x8, scale = geglu_rows_fp8(h)
        r8, rscale = _geglu_rows_reference(h)
        assert x8.shape == (m, n) and scale.shape == (m, 1) and x8.dtype == r8.dtype
        assert float(((scale - rscale).abs() / rscale).max()) < 1e-2
        assert float((x8.float() != r8.float()).float().mean()) < 0.02
        y = geglu_reference(h).float()
        err = float((x8.float() * scale - y).norm() / y.norm())
        assert err < 0.05, err
        assert torch.all(x8[1].float() == 0)


def _fp8_convs_unavailable() -> str | None:
    from rayimg.render.fp8_conv import fp8_conv_unavailable

    return fp8_conv_unavailable(torch.device("cuda"))


def test_fp8_conv_op_on_cuda_matches_the_float32_product():
    """cuDNN's float8 convolution (the op engine.fp8_convs runs) against the same float8 operands
    multiplied in float32: equal up to the bf16 rounding of the output, for a 3x3 and a strided
    convolution, with the plan table's plan and with every plan cuDNN offers."""
    why = _fp8_convs_unavailable()
    if why:
        pytest.skip(why)
    from rayimg.render.fp8_conv import fp8_conv2d, plan_timings

    g = torch.Generator(device="cuda").manual_seed(0)
    for n, c, h, k, stride in [(2, 64, 24, 32, 1), (3, 32, 16, 64, 2)]:
        x8 = (torch.randn(n, c, h, h, device="cuda", generator=g) * 2).to(memory_format=torch.channels_last).to(torch.float8_e4m3fn)
        w8 = (torch.randn(k, c, 3, 3, device="cuda", generator=g) * 8).to(memory_format=torch.channels_last).to(torch.float8_e4m3fn)
        ref = fp8_conv2d(x8.cpu(), w8.cpu(), stride, 1, torch.float32)
        ours = fp8_conv2d(x8, w8, stride, 1, torch.bfloat16)
        assert ours.shape == ref.shape and ours.is_contiguous(memory_format=torch.channels_last)
        # the bf16 output's rounding (half an ulp: 2^-8 of the value), plus float8 tensor cores'
        # accumulation with fewer bits than float32 between promotions (relative to the size of
        # the sums, not to each output)
        diff = (ours.float().cpu() - ref).abs()
        bound = ref.abs() * 2 ** -8 + 1e-3 * ref.abs().max()
        assert bool((diff <= bound).all()), float((diff - bound).max())
        assert float(diff.norm() / ref.norm()) < 5e-3
        heuristic, timings = plan_timings(x8, w8, stride, 1, iters=2)
        assert timings and heuristic in dict(timings)


def test_fp8_convs_compiled_engine_close_to_bf16_and_swaps_without_recompiling(tmp_path, monkeypatch):
    """engine.fp8_convs with fp8 linears, compiled with CUDA graphs as the bench runs it: close to
    the bf16 engine; a conv adapter swap requantizes in place (no recompile), and the restore gives
    the same bits."""
    why = _fp8_convs_unavailable()
    if why:
        pytest.skip(why)
    import torch._dynamo

    from rayimg.render.adapters import load_lora_file
    from rayimg.render.engine import Engine, GenerationRequest
    from rayimg.render.fp8_conv import Float8Conv2d
    from tests.test_render_engine import make_lora

    from rayimg.render import fp8_conv

    monkeypatch.setattr(fp8_conv, "UNTUNED", "heuristic")  # the tiny model's shapes are in no plan table
    cfg = ModelConfig(pretrained=SDXL, device="cuda", dtype="bfloat16")
    exact = Engine(load_pipeline(cfg), fuse_qkv=True)
    pipe = load_pipeline(cfg)
    engine = Engine(pipe, compile=True, compile_mode="reduce-overhead", fuse_qkv=True, channels_last=True, fp8=True, fp8_convs=True)
    assert {m.fp8_role for m in pipe.unet.modules() if isinstance(m, Float8Conv2d)} >= {"normed", "sample"}
    req = GenerationRequest(prompt="a blue star", steps=3, width=64, height=64, seed=5)
    base = engine.generate([req], output_type="latent")[0].float()
    ref = exact.generate([req], output_type="latent")[0].float()
    rel = float((base - ref).norm() / ref.norm())
    assert 0 < rel < 0.15, rel

    d = tmp_path / "lora"
    make_lora(d, "sdxl", 1, rank=4, alpha=4, unet_targets=["to_q", "conv1", "conv2"])
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


def test_vae_decoder_speedups_on_cuda_match_diffusers():
    """rayimg.render.vae_decode on CUDA (bf16): the GroupNorm statistics from cuBLAS products and the
    float32-score attention give diffusers' GroupNorm / SDPA up to bf16 rounding, in both layouts."""
    from rayimg.render.vae_decode import ChannelStatsGroupNorm, attention_scores

    g = torch.Generator(device="cuda").manual_seed(0)
    for shape, groups in [((2, 128, 64, 64), 32), ((3, 64, 40), 32)]:
        norm = torch.nn.GroupNorm(groups, shape[1]).cuda().to(torch.bfloat16)
        with torch.no_grad():
            norm.weight.normal_(generator=g)
            norm.bias.normal_(generator=g)
        x = (torch.randn(*shape, device="cuda", generator=g) * 2 + 0.5).to(torch.bfloat16)
        ref = norm(x).float()
        norm.__class__ = ChannelStatsGroupNorm
        layouts = [x] + ([x.to(memory_format=torch.channels_last)] if x.ndim == 4 else [])
        for xl in layouts:
            torch.testing.assert_close(norm(xl).float(), ref, rtol=2e-2, atol=2e-2)
    q, k, v = (torch.randn(2, 1, 1024, 512, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
    torch.testing.assert_close(attention_scores(q, k, v).float(), ref, rtol=2e-2, atol=2e-2)


def test_pending_calls_decode_on_their_own_stream_with_the_same_pixels():
    """A "pending" call decodes on the engine's decode stream, so the next call is set up and queued
    while it decodes (the main stream never waits for it): back-to-back pending calls give the
    pixels of "pil" calls, in a compiled engine with CUDA graphs and a chunked VAE decode too."""
    from rayimg.render.engine import Engine, GenerationRequest

    cfg = ModelConfig(pretrained=SDXL, device="cuda", dtype="bfloat16")
    for options in ({}, {"compile": True, "compile_mode": "reduce-overhead", "compile_vae": True, "vae_batch": 2}):
        engine = Engine(load_pipeline(cfg), batch_invariant=False, **options)
        batches = [[GenerationRequest(prompt=f"a blue star {b}-{i}", steps=3, width=64, height=64, seed=10 * b + i) for i in range(3)]
                   for b in range(3)]
        expected = [[np.asarray(im) for im in engine.generate(batch)] for batch in batches]
        main = torch.cuda.current_stream()
        pending = [engine.generate(batch, output_type="pending") for batch in batches]  # queued back to back
        assert engine._decode_stream is not None and torch.cuda.current_stream() == main
        for want, got in zip(expected, pending):
            for w, p in zip(want, got):
                np.testing.assert_array_equal(np.asarray(p.result()), w)
        engine.overlap_decode = False
        again = engine.generate(batches[0], output_type="pending")
        for w, p in zip(expected[0], again):
            np.testing.assert_array_equal(np.asarray(p.result()), w)
