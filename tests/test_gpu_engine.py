"""Engine speed options on a CUDA GPU: engine.fp8 (float8 tensor cores need compute capability
8.9+: compiled, close to bf16, adapter swaps requantize without recompiling) and compile_mode
reduce-overhead (CUDA graphs with in-place adapter swaps). Skipped elsewhere (`make test-gpu`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayimg.config import EngineConfig, ModelConfig
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
    exact = Engine(load_pipeline(cfg), EngineConfig(fuse_qkv=True))
    pipe = load_pipeline(cfg)
    engine = Engine(pipe, EngineConfig(compile=True, fuse_qkv=True, channels_last=True, fp8=True))
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
    engine = Engine(pipe, EngineConfig(compile=True, compile_mode="reduce-overhead"))
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


def test_background_prompt_encoding_equals_encoding_in_place(tmp_path):
    """On CUDA the next batch's prompts are encoded on a side stream (one text per step callback)
    while the CUDA-graph UNet denoises the current batch:
    the streamed PNGs equal render()'s bit for bit, and a text-encoder LoRA fused while a background
    encoding is in flight is honoured."""
    from rayimg.render.adapters import load_lora_file
    from rayimg.render.engine import GenerationRequest
    from rayimg.render.renderer import Renderer
    from tests.test_render_engine import in_place_latents, make_lora

    cfg = ModelConfig(pretrained=SDXL, device="cuda", dtype="bfloat16")
    pipe = load_pipeline(cfg)
    renderer = Renderer.from_pipeline(pipe, SDXL, "0" * 64, "sdxl",
                                      EngineConfig(compile=True, compile_mode="reduce-overhead", batch_invariant=False))
    engine = renderer.engine
    assert engine.prompts.prefetch

    def req(seed, **kw):
        return GenerationRequest(prompt=f"a blue star {seed}", negative_prompt="blurry", steps=4, width=64, height=64, seed=seed, **kw)

    batches = [[req(2 * b), req(2 * b + 1)] for b in range(4)]
    streamed = [image.png for batch in renderer.render_stream(batches) for image, _ in batch]
    assert engine.prompts.stats["prefetched"] >= 4, engine.prompts.stats
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


def test_text_encoder_graphs_replay_the_eager_encode_bit_for_bit(tmp_path):
    """rayimg.render.text_graphs (on with compile_mode reduce-overhead): a prompt's encode replays
    CUDA graphs of both text encoders and gives the eager encode bit for bit: for other prompts,
    on a side stream, with a text-encoder adapter fused in place (no new capture), with adapter
    slots (passed through or not) and after the embedding table grows. Outputs are copies."""
    from rayimg.render import text_graphs
    from rayimg.render.adapters import FusedAdapters, load_lora_file
    from rayimg.render.multi_lora import AdapterSlots, SlotConfig
    from tests.test_render_engine import TEXT, make_lora

    pipe = load_pipeline(ModelConfig(pretrained=SDXL, device="cuda", dtype="bfloat16"))
    forwards = text_graphs.install(pipe)
    assert len(forwards) == 2 and text_graphs.install(pipe) == []

    @torch.no_grad()
    def encode(text):
        out = pipe.encode_prompt(prompt=[text], device=torch.device("cuda"), num_images_per_prompt=1, do_classifier_free_guidance=False)
        return out[0], out[2]

    def eager(text):
        saved = [pipe.text_encoder.__dict__.pop("forward"), pipe.text_encoder_2.__dict__.pop("forward")]
        try:
            return encode(text)
        finally:
            pipe.text_encoder.forward, pipe.text_encoder_2.forward = saved

    def same(text):
        got, want = encode(text), eager(text)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), text
        return got

    def captures():
        return [f.stats["captures"] for f in forwards]

    first = same("a blue star")
    kept = first[0].clone()
    other = same("a red circle")
    assert not torch.equal(other[0], first[0]) and torch.equal(first[0], kept)  # a later replay leaves earlier outputs alone
    assert captures() == [1, 1] and all(f.stats["replays"] == 2 for f in forwards)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = encode("a blue star")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side[0], first[0]) and torch.equal(encode("a red circle")[0], other[0])

    lora = load_lora_file(make_lora(tmp_path / "t", "sdxl", 2, rank=4, alpha=4, unet_targets=["to_q"], text_targets=TEXT)
                          / "pytorch_lora_weights.safetensors", name="t", unet_config=pipe.unet.config)
    fused = FusedAdapters(pipe)
    fused.apply([(lora, 1.0)])
    adapted = same("a blue star")
    assert not torch.equal(adapted[0], first[0]) and captures() == [1, 1]
    fused.apply([])
    assert torch.equal(encode("a blue star")[0], first[0])

    slots = AdapterSlots(pipe, SlotConfig(num_slots=2, max_rank=4, max_batch=2))
    pinned = slots.acquire([(lora, 1.0)])
    slots.set_batch([pinned], guidance=False)
    slotted = same("a blue star")
    assert float((slotted[0].float() - adapted[0].float()).norm() / adapted[0].float().norm()) < 0.02  # slots vs fused, bf16
    slots.set_passthrough(True)
    assert torch.equal(same("a blue star")[0], first[0])
    slots.release(pinned)  # no rows set now: the slotted modules run passed through only
    table = pipe.text_encoder.get_input_embeddings().num_embeddings
    pipe.text_encoder.resize_token_embeddings(table + 1)
    same("a blue star")
    assert captures()[0] >= 4


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
        engine = Engine(load_pipeline(cfg), EngineConfig(batch_invariant=False, **options))
        batches = [[GenerationRequest(prompt=f"a blue star {b}-{i}", steps=3, width=64, height=64, seed=10 * b + i) for i in range(3)]
                   for b in range(3)]
        expected = [[np.asarray(im) for im in engine.generate(batch)] for batch in batches]
        main = torch.cuda.current_stream()
        pending = [engine.generate(batch, output_type="pending") for batch in batches]  # queued back to back
        assert engine._decode_stream is not None and torch.cuda.current_stream() == main
        for want, got in zip(expected, pending):
            for w, p in zip(want, got):
                np.testing.assert_array_equal(np.asarray(p.result()), w)


def step_loop_against_fused_alone(tmp_path, *, device: str, dtype: str, engine_cfg: EngineConfig):
    """The serving step loop as a replica runs it (per-sample adapter slots, padded batch sizes,
    ``fuse_alone``, warmed up first): a request alone (its adapters fused into the weights), then
    mixed-adapter requests that join the running batch (the base weights restored, the slots in
    use), against each request rendered alone with its adapters fused on an eager engine.
    Returns (relative errors, graphs compiled after the warm-up, the batcher's stats)."""
    import torch._dynamo

    from rayimg.render.adapters import load_lora_file
    from rayimg.render.engine import Engine, GenerationRequest
    from rayimg.render.multi_lora import AdapterSlots, SlotConfig
    from rayimg.render.slot_adapters import SlotAdapters
    from rayimg.render.stepper import StepBatcher
    from tests.test_render_engine import ATTN, make_lora

    cfg = ModelConfig(pretrained=SDXL, device=device, dtype=dtype)
    pipe = load_pipeline(cfg)
    files = {"a": make_lora(tmp_path / "a", "sdxl", 1, rank=4, alpha=8, unet_targets=ATTN + ["ff.net.2"]),
             "b": make_lora(tmp_path / "b", "sdxl", 2, rank=2, alpha=2, unet_targets=["to_k", "to_v", "proj_out"])}
    weights = {n: load_lora_file(p, name=n, unet_config=pipe.unet.config) for n, p in files.items()}

    def pairs(identity):
        return [(weights[name], scale) for name, _version, scale in identity]

    engine = Engine(pipe, engine_cfg)
    slots = AdapterSlots(pipe, SlotConfig(num_slots=4, max_rank=4, max_batch=4, max_adapters=2))
    batcher = StepBatcher(engine, max_batch=4, pad_to=(1, 2, 4), adapters=SlotAdapters(slots, pairs), output="latent", fuse_alone=True)
    batcher.warm_up(64, 64)
    torch._dynamo.utils.counters.clear()

    def req(prompt, seed, steps, adapters=()):
        return GenerationRequest(prompt=prompt, steps=steps, width=64, height=64, guidance_scale=5.0, seed=seed, adapters=tuple(adapters))

    schedule = {0: [req("a red square", 1, 6, [("a", "1", 0.8)])], 2: [req("a blue circle", 2, 5)],
                4: [req("a blue circle", 3, 3, [("a", "1", 1.0), ("b", "1", 0.5)]), req("a red square", 4, 4, [("b", "1", 1.0)])]}
    submitted, step = [], 0
    while batcher.busy or any(k >= step for k in schedule):
        submitted += [batcher.submit(r) for r in schedule.get(step, [])]
        batcher.step()
        step += 1
        assert step < 100
    assert all(s.error is None for s in submitted), [s.error for s in submitted]
    compiled_after = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
    fused = Engine(load_pipeline(cfg))
    errors = []
    for s in submitted:
        fused.set_adapters(pairs(s.request.adapters), s.request.adapters)
        ref = fused.generate([s.request], output_type="latent")[0].float()
        errors.append(float((s.image.float() - ref).norm() / ref.norm()))
    return errors, compiled_after, dict(batcher.stats)


def test_compiled_step_loop_with_adapter_slots_matches_fused_alone(tmp_path):
    """The serve replica's step loop with the render speed settings (compile with CUDA graphs,
    fused QKV, channels-last, float8 linears, compiled VAE): after its warm-up, mixed-adapter
    requests that join mid-run compile nothing more, and each is close to the same request
    rendered alone by an eager bf16 engine with its adapters fused (float8's tolerance, as above).
    A request alone renders with its adapters fused into the weights the graphs read in place."""
    settings = EngineConfig(compile=True, compile_mode="reduce-overhead", fuse_qkv=True, channels_last=True, fp8=True, compile_vae=True)
    errors, compiled_after, stats = step_loop_against_fused_alone(tmp_path, device="cuda", dtype="bfloat16", engine_cfg=settings)
    assert compiled_after == 0, compiled_after
    assert stats["joined_running"] == 3 and stats["samples"] > stats["steps"], stats
    assert stats["swaps"] >= 2, stats  # the first request's adapters fused while alone, the base weights back when one joined
    assert all(0 <= e < 0.15 for e in errors), errors
