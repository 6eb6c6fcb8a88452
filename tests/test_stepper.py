"""Step-level batching (rayimg.render.stepper) on the tiny models (CPU, float32): requests that
join a running batch, leave it at their own step counts and mix schedulers, guidance scales and
seeds give the latents of the same request rendered alone through the engine (diffusers'
pipeline), within the engine's batch tolerance."""

from __future__ import annotations

import pytest
import torch

from rayimg.config import ModelConfig
from rayimg.models import load_model
from rayimg.render.engine import Engine, GenerationRequest
from rayimg.render.stepper import StepBatcher

SIZE = 64


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("models"))
    return {name: Engine(load_model(ModelConfig(pretrained=name, device="cpu", cache_dir=cache)).pipeline)
            for name in ("rayimg-tiny-sd", "rayimg-tiny-sdxl")}


def req(prompt="a red square", **kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": prompt, "width": SIZE, "height": SIZE, "steps": 4, "guidance_scale": 5.0, **kw})


def alone(engine, request) -> torch.Tensor:
    return engine.generate([request], output_type="latent")[0]


def run(batcher, schedule: dict[int, list]) -> tuple[list, list[tuple[int, object]]]:
    """Submit ``schedule[step]`` before that step; run until idle. Returns the slots in submit
    order and the (step, slot) finish events."""
    slots, events, step = [], [], 0
    while batcher.busy or any(k >= step for k in schedule):
        for r in schedule.get(step, []):
            slots.append(batcher.submit(r))
        for s in batcher.step():
            events.append((step, s))
        step += 1
        assert step < 200
    return slots, events


@pytest.mark.parametrize("model", ["rayimg-tiny-sd", "rayimg-tiny-sdxl"])
def test_joins_and_leaves_match_the_request_alone(engines, model):
    engine = engines[model]
    batcher = StepBatcher(engine, max_batch=4, output="latent")
    first = [req(seed=1, steps=6), req("a blue circle", seed=2, steps=3, scheduler="euler_a", guidance_scale=3.0)]
    later = [req("green grass", seed=3, steps=5, scheduler="dpmpp_2m_karras", negative_prompt="blurry"),
             req("a red square", seed=4, steps=2, scheduler="ddim", guidance_scale=8.0)]
    slots, events = run(batcher, {0: first, 2: later})
    assert all(s.error is None for s in slots), [s.error for s in slots]
    assert batcher.stats["joined_running"] == 2  # the later two joined a running batch
    finished_at = {id(s): step for step, s in events}
    # each leaves after its own steps: the 3-step request (joined at 0) before the 6-step one
    assert finished_at[id(slots[1])] == 2 and finished_at[id(slots[0])] == 5 and finished_at[id(slots[3])] == 3
    for slot in slots:
        torch.testing.assert_close(slot.image, alone(engine, slot.request), rtol=0, atol=1e-4)
        assert set(slot.timings) == {"queue_s", "denoise_s", "decode_s"} and slot.timings["denoise_s"] > 0, slot.timings


def test_guidance_off_waits_for_its_own_group_and_images_decode(engines):
    engine = engines["rayimg-tiny-sd"]
    batcher = StepBatcher(engine, max_batch=4)
    slots, events = run(batcher, {0: [req(seed=5, steps=3), req(seed=6, steps=2, guidance_scale=1.0)], 1: [req(seed=7, steps=2)]})
    no_cfg = slots[1]
    finished_at = {id(s): step for step, s in events}
    # the CFG-free request shares no UNet call with the CFG group: it starts once that group drains
    assert finished_at[id(no_cfg)] > max(finished_at[id(slots[0])], finished_at[id(slots[2])])
    # its time says so: it queued through the others' steps, and every image spent time decoding
    assert no_cfg.timings["queue_s"] > max(slots[0].timings["queue_s"], slots[2].timings["queue_s"]) + slots[0].timings["denoise_s"] / 2
    assert all(s.timings["decode_s"] > 0 for s in slots)
    import numpy as np

    for slot in slots:
        ref = np.asarray(engine.generate([slot.request])[0], dtype=np.int16)
        assert slot.image.size == (SIZE, SIZE)
        assert np.abs(np.asarray(slot.image, dtype=np.int16) - ref).max() <= 1


def test_a_decode_is_finished_behind_the_next_step(engines):
    """A sample whose steps end while others run has its decode queued and is finished by the next
    step, once that step's UNet call is queued (the host takes its pixels while the device runs
    the step); the last sample is finished at once; a failure while a sample decodes ends the
    others, and that sample gets its own image."""
    import numpy as np

    engine = engines["rayimg-tiny-sd"]
    batcher = StepBatcher(engine, max_batch=4)
    short, long = batcher.submit(req(seed=11, steps=2)), batcher.submit(req(seed=12, steps=4))
    assert batcher.step() == [] and batcher.step() == []
    assert not short.done and [s for s, _ in batcher.decoding] == [short] and batcher.busy
    assert batcher.step() == [short] and long.step == 3 and not batcher.decoding
    assert batcher.step() == [long] and not batcher.busy  # nothing else running: finished in its own step
    for slot in (short, long):
        ref = np.asarray(engine.generate([slot.request])[0], dtype=np.int16)
        assert slot.error is None and np.abs(np.asarray(slot.image, dtype=np.int16) - ref).max() <= 1
        assert slot.timings["decode_s"] > 0

    a, b = batcher.submit(req(seed=13, steps=1)), batcher.submit(req(seed=14, steps=3))
    assert batcher.step() == [] and [s for s, _ in batcher.decoding] == [a]
    assert batcher.fail(RuntimeError("stopped")) == [a, b] and not batcher.busy
    assert a.error is None and a.image.size == (SIZE, SIZE) and "stopped" in str(b.error)


def test_padding_and_cancel(engines):
    engine = engines["rayimg-tiny-sd"]
    batcher = StepBatcher(engine, max_batch=4, pad_to=(1, 2, 4), output="latent")
    stop = {"now": False}
    keep = [req(seed=8, steps=3), req(seed=9, steps=4, scheduler="unipc")]
    doomed = batcher.submit(req(seed=10, steps=4), cancelled=lambda: stop["now"])
    slots = [batcher.submit(r) for r in keep]
    batcher.step()
    stop["now"] = True
    done = []
    while batcher.busy:
        done += batcher.step()
    assert doomed.error is not None and "cancelled" in str(doomed.error) and doomed.image is None
    assert doomed.step == 1  # left at the first step boundary after its client went away
    # UNet rows (two per sample with CFG): 3 samples padded to 4; then 2 (one cancelled); 2; 1
    assert batcher.stats["unet_rows"] == 2 * (4 + 2 + 2 + 1)
    for slot in slots:
        torch.testing.assert_close(slot.image, alone(engine, slot.request), rtol=0, atol=1e-4)
        assert set(slot.timings) == {"queue_s", "denoise_s", "decode_s"} and slot.timings["denoise_s"] > 0, slot.timings


def test_bad_request_fails_alone(engines):
    engine = engines["rayimg-tiny-sd"]
    batcher = StepBatcher(engine, max_batch=2, output="latent")
    with pytest.raises(ValueError, match="adapters"):
        batcher.submit(req(adapters=[("nope", "1", 1.0)]))
    good = batcher.submit(req(seed=11, steps=2))
    while batcher.busy:
        batcher.step()
    torch.testing.assert_close(good.image, alone(engine, good.request), rtol=0, atol=1e-4)


def test_mixed_adapters_join_running_batch_and_match_fused_alone(tmp_path):
    """Per-sample LoRA through AdapterSlots: requests with different adapters (one with
    text-encoder and conv layers, one combining two adapters, one with none) share UNet calls,
    join mid-run, and each equals the same request rendered alone with its adapters fused."""
    from rayimg.models.tiny import build_tiny_sd
    from rayimg.render.adapters import load_lora_file
    from rayimg.render.multi_lora import AdapterSlots, SlotConfig
    from rayimg.render.slot_adapters import SlotAdapters
    from tests.test_render_engine import ATTN, TEXT, make_lora

    files = {"a": make_lora(tmp_path / "a", "sd", 1, rank=4, alpha=8, unet_targets=ATTN + ["conv1"], text_targets=TEXT, text_alpha=1),
             "b": make_lora(tmp_path / "b", "sd", 2, rank=2, alpha=2, unet_targets=["to_k", "to_v", "proj_out"])}
    weights = {n: load_lora_file(p, name=n) for n, p in files.items()}

    def pairs(identity):
        return [(weights[name], scale) for name, _version, scale in identity]

    slotted = Engine(build_tiny_sd(0))
    slots = AdapterSlots(slotted.pipe, SlotConfig(num_slots=2, max_rank=4, max_batch=4, max_adapters=2))
    batcher = StepBatcher(slotted, max_batch=4, adapters=SlotAdapters(slots, pairs), output="latent")
    fused = Engine(build_tiny_sd(0))
    requests = {0: [req(seed=1, steps=3, adapters=[("a", "1", 0.8)]), req("a blue circle", seed=2, steps=4)],
                1: [req("a blue circle", seed=3, steps=2, adapters=[("a", "1", 1.0), ("b", "1", 0.5)], scheduler="euler_a"),
                    req(seed=4, steps=3, adapters=[("b", "1", 1.0)])]}
    slots_, _ = run(batcher, requests)
    assert all(s.error is None for s in slots_), [s.error for s in slots_]
    assert batcher.stats["joined_running"] == 2 and batcher.stats["samples"] > batcher.stats["steps"]
    assert not any(slots._pins)  # every request released its slots
    for s in slots_:
        fused.set_adapters(pairs(s.request.adapters), s.request.adapters)
        torch.testing.assert_close(s.image, alone(fused, s.request), rtol=0, atol=1e-4)


def test_a_lone_sample_renders_with_its_adapters_fused_and_a_join_restores_the_slots(tmp_path):
    """``fuse_alone``: a request alone at batch 1 runs the base step with its UNet adapters fused
    (the slotted modules compute their base output only); when a request with other adapters
    joins, the base weights come back and both run on the slots; the survivor, alone again, gets
    its own adapters fused. Each image equals the request rendered alone with its adapters fused.
    An adapter with text-encoder layers keeps the slots (no swap), and so does a lone sample padded
    above batch 1."""
    from rayimg.models.tiny import build_tiny_sd
    from rayimg.render.adapters import load_lora_file
    from rayimg.render.multi_lora import AdapterSlots, SlotConfig
    from rayimg.render.slot_adapters import SlotAdapters
    from tests.test_render_engine import ATTN, TEXT, make_lora

    files = {"a": make_lora(tmp_path / "a", "sd", 1, rank=4, alpha=8, unet_targets=ATTN),
             "b": make_lora(tmp_path / "b", "sd", 2, rank=2, alpha=2, unet_targets=["to_k", "to_v"]),
             "t": make_lora(tmp_path / "t", "sd", 3, rank=4, alpha=4, unet_targets=ATTN, text_targets=TEXT, text_alpha=1)}
    weights = {n: load_lora_file(p, name=n) for n, p in files.items()}

    def pairs(identity):
        return [(weights[name], scale) for name, _version, scale in identity]

    engine = Engine(build_tiny_sd(0))
    slots = AdapterSlots(engine.pipe, SlotConfig(num_slots=2, max_rank=4, max_batch=4, max_adapters=1))
    batcher = StepBatcher(engine, max_batch=4, pad_to=(1, 2, 4), adapters=SlotAdapters(slots, pairs), output="latent", fuse_alone=True)
    slot_rows, hook = rows_seen(engine.pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_k)
    a = req(seed=1, steps=5, adapters=[("a", "1", 0.8)])
    b = req("a blue circle", seed=2, steps=2, adapters=[("b", "1", 1.0)])
    try:
        done, _ = run(batcher, {0: [a], 2: [b]})  # a alone (2 steps), a + b (2 steps), a alone (1 step)
    finally:
        hook.remove()
    assert all(s.error is None for s in done), [s.error for s in done]
    # fuse a, restore for the shared steps, fuse a again for its last step alone
    assert batcher.stats["swaps"] == 3 and batcher.stats["swap_s"] > 0
    assert done[0].swap_s > 0 and done[1].swap_s > 0  # a waited for all three swaps, b for the restore when it joined
    assert engine.adapter_identity == (("a", "1", 0.8),) and slots.rows["unet"].passthrough
    assert slot_rows == [2, 2, 4, 4, 2]  # the module ran at each step (guidance: two rows a sample, padded to 2)
    fused = Engine(build_tiny_sd(0))
    for s in done:
        fused.set_adapters(pairs(s.request.adapters), s.request.adapters)
        torch.testing.assert_close(s.image, alone(fused, s.request), rtol=0, atol=1e-4)

    # the next step with slots restores the base weights first
    plain = req("green grass", seed=4, steps=2)
    joined, _ = run(batcher, {0: [plain, req(seed=5, steps=2, adapters=[("b", "1", 0.5)])]})
    assert engine.adapter_identity == () and not slots.rows["unet"].passthrough and batcher.stats["swaps"] == 4
    fused.set_adapters([])
    torch.testing.assert_close(joined[0].image, alone(fused, plain), rtol=0, atol=1e-4)

    text = req(seed=6, steps=2, adapters=[("t", "1", 1.0)])
    for pad_to, request in (((1, 2, 4), text), ((2, 4), a)):
        kept = StepBatcher(engine, max_batch=4, pad_to=pad_to, adapters=SlotAdapters(slots, pairs), output="latent", fuse_alone=True)
        [lone], _ = run(kept, {0: [request]})
        assert lone.error is None and kept.stats["swaps"] == 0 and engine.adapter_identity == ()
        fused.set_adapters(pairs(request.adapters), request.adapters)
        torch.testing.assert_close(lone.image, alone(fused, request), rtol=0, atol=1e-4)


def rows_seen(module: torch.nn.Module) -> tuple[list[int], object]:
    """The batch rows of each forward of ``module`` (a list filled in place) and the hook's handle."""
    rows: list[int] = []
    return rows, module.register_forward_hook(lambda _m, args, _out: rows.append(int(args[0].shape[0])))


def test_samples_finishing_together_decode_one_by_one_and_fail_alone(engines):
    """Three samples leave in the same step: each is decoded alone (batch 1, the one compiled
    decode graph), each equals the request rendered alone, and a decode that fails fails only
    its own sample."""
    import numpy as np

    engine = engines["rayimg-tiny-sd"]
    requests = [req(seed=s, steps=2, scheduler=name) for s, name in ((21, "euler"), (22, "ddim"), (23, "euler_a"))]
    batcher = StepBatcher(engine, max_batch=4)
    decoded, handle = rows_seen(engine.pipe.vae.decoder)
    try:
        slots, events = run(batcher, {0: requests})
    finally:
        handle.remove()
    assert {step for step, _ in events} == {1} and decoded == [1, 1, 1]
    for slot in slots:
        ref = np.asarray(engine.generate([slot.request])[0], dtype=np.int16)
        assert np.abs(np.asarray(slot.image, dtype=np.int16) - ref).max() <= 1

    calls = {"n": 0}

    def second_fails(_module, _args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("decoder out of memory")

    handle = engine.pipe.vae.decoder.register_forward_pre_hook(second_fails)
    try:
        again, _ = run(StepBatcher(engine, max_batch=4), {0: requests})
    finally:
        handle.remove()
    assert [s.error is None for s in again] == [True, False, True] and "out of memory" in str(again[1].error)
    for before, after in zip((slots[0], slots[2]), (again[0], again[2])):
        assert np.array_equal(np.asarray(before.image), np.asarray(after.image))


def test_warm_up_runs_every_padded_size_once_and_leaves_no_trace():
    """warm_up over per-sample adapter slots: one UNet call per pad_to size up to the one
    max_batch pads to (two rows per sample with guidance) and one batch-1 decode; afterwards the
    batcher is idle with its stats and output as before, every slot is released, and a request
    renders exactly as on a batcher that never warmed up."""
    import numpy as np

    from rayimg.models.tiny import build_tiny_sd
    from rayimg.render.multi_lora import AdapterSlots, SlotConfig
    from rayimg.render.slot_adapters import SlotAdapters

    engine = Engine(build_tiny_sd(0))
    slots = AdapterSlots(engine.pipe, SlotConfig(num_slots=2, max_rank=4, max_batch=4, max_adapters=2))

    def batcher(**kw):
        return StepBatcher(engine, adapters=SlotAdapters(slots), **{"max_batch": 3, "pad_to": (1, 2, 4, 8), **kw})

    warmed = batcher()
    stats = dict(warmed.stats)
    unet_rows, unet_hook = rows_seen(engine.pipe.unet)
    decoded, decode_hook = rows_seen(engine.pipe.vae.decoder)
    try:
        lines = []
        report = warmed.warm_up(SIZE, SIZE, log=lines.append)
        assert [line.split(" ready in ")[0] for line in lines] == [
            f"warm-up: UNet step at batch {b} ({SIZE}x{SIZE})" for b in (1, 2, 4)] + [f"warm-up: decode at {SIZE}x{SIZE}"]
        assert unet_rows == [2, 2, 4, 4, 8, 8] and decoded == [1]  # pads 1, 2 and 4, twice each (3 samples pad to 4; 8 is never used)
        assert report["unet_batches"] == [1, 2, 4] and report["guidance"] and report["decode"] and report["seconds"] > 0
        unet_rows.clear()
        plain = batcher(pad_to=(), output="latent")
        assert plain.warm_up(SIZE, SIZE, guidance=False)["unet_batches"] == [1, 3]
        assert unet_rows == [1, 1, 3, 3]  # without padding: 1 and max_batch; one row per sample without guidance
    finally:
        unet_hook.remove()
        decode_hook.remove()
    assert not warmed.busy and warmed.stats == stats and warmed.output == "pil" and plain.output == "latent"
    assert not any(slots._pins)

    request = req("a blue circle", seed=31, steps=3, scheduler="dpmpp_2m_karras")
    after, _ = run(warmed, {0: [request]})
    fresh, _ = run(batcher(), {0: [request]})
    assert after[0].error is None and np.array_equal(np.asarray(after[0].image), np.asarray(fresh[0].image))
    assert warmed.stats == {**stats, "steps": 3, "samples": 3, "unet_rows": 6}


def test_step_loop_runs_its_first_call_on_its_own_thread_and_raises_its_error(engines):
    """StepLoop's ``first`` (the replica's warm-up) runs on the loop's thread, where the steps
    record their CUDA graphs, before any request, and sees the compiler settings of the thread
    that made the loop (torch keeps them per thread); its failure is the constructor's."""
    import threading

    import torch._dynamo

    from serving.stepping import StepLoop

    batcher = StepBatcher(engines["rayimg-tiny-sd"], max_batch=2)
    with torch._dynamo.config.patch(cache_size_limit=123):
        loop = StepLoop(batcher, first=lambda: (threading.current_thread(), torch._dynamo.config.cache_size_limit))
    assert loop.first_result == (loop.thread, 123) and loop.thread.is_alive()

    def broken():
        raise RuntimeError("warm-up failed: no room")

    with pytest.raises(RuntimeError, match="warm-up failed: no room"):
        StepLoop(StepBatcher(engines["rayimg-tiny-sd"], max_batch=2), first=broken)


def attention_slots(pipe):
    """Adapter slots on the UNet's attention projections only (the app's default layout): 2 slots,
    rank <= 4, batches of up to 4 samples, one adapter each."""
    from rayimg.render.multi_lora import AdapterSlots, SlotConfig
    from tests.test_render_engine import ATTN

    return AdapterSlots(pipe, SlotConfig(num_slots=2, max_rank=4, max_batch=4, max_adapters=1, text_targets=(), unet_targets=tuple(ATTN)))


@pytest.mark.parametrize("shared", [True, False])
def test_shared_graph_serves_every_padded_batch_with_one_compile(tmp_path, shared):
    """``shared_graph``: the UNet's batch dimension is traced dynamic, so the graph compiled at the
    first padded size serves every other size (with adapter slots on the attention projections,
    the app's default: the slot forward's row check stays out of the traced code), and the images
    equal the uncompiled step loop's. Without it, the next size compiles again."""
    from rayimg.models.tiny import build_tiny_sd
    from rayimg.render.adapters import load_lora_file
    from rayimg.render.slot_adapters import SlotAdapters
    from tests.test_render_engine import ATTN, make_lora

    weights = {"a": load_lora_file(make_lora(tmp_path / "a", "sd", 1, rank=4, alpha=8, unet_targets=ATTN), name="a")}

    def pairs(identity):
        return [(weights[name], scale) for name, _version, scale in identity]

    def batcher(compiled: bool) -> StepBatcher:
        engine = Engine(build_tiny_sd(0))
        slots = attention_slots(engine.pipe)
        if compiled:
            engine.pipe.unet.compile(backend=counting, dynamic=False)  # as the engine compiles it
        return StepBatcher(engine, max_batch=4, pad_to=(1, 2, 4), adapters=SlotAdapters(slots, pairs), output="latent",
                           shared_graph=shared and compiled)

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    waves = [[req(seed=1, steps=2, adapters=[("a", "1", 0.8)])],
             [req(seed=2, steps=2), req("a blue circle", seed=3, steps=2, adapters=[("a", "1", 1.0)])],
             [req(seed=4 + i, steps=2, adapters=[("a", "1", 0.5)] if i % 2 else []) for i in range(3)]]  # pads to 4
    compiled, plain = batcher(True), batcher(False)
    after_first = None
    for wave in waves:
        got, _ = run(compiled, {0: wave})
        want, _ = run(plain, {0: wave})
        assert all(s.error is None for s in got + want), [s.error for s in got + want]
        for g, w in zip(got, want):
            torch.testing.assert_close(g.image, w.image, rtol=0, atol=1e-5)
        after_first = len(graphs) if after_first is None else after_first
    assert after_first >= 1
    if shared:
        assert len(graphs) == after_first  # batches 2 and 4 reused the first graph
    else:
        assert len(graphs) > after_first  # another size: another compile


def test_slot_math_keeps_a_dynamic_batch_through_inductor(tmp_path):
    """What ``shared_graph`` needs from inductor's lowering, not only from tracing: a transformer
    block of tiny SD with adapter slots on its attention projections, compiled by inductor as the
    engine compiles (``dynamic=False``) with the batch marked, compiles once for 2, 4 and 8 rows
    and matches the eager block."""
    from rayimg.models.tiny import build_tiny_sd
    from rayimg.render.adapters import load_lora_file
    from tests.test_render_engine import ATTN, make_lora

    torch.manual_seed(0)
    pipe = build_tiny_sd(0)
    lora = load_lora_file(make_lora(tmp_path / "a", "sd", 1, rank=4, alpha=8, unet_targets=ATTN), name="a")
    slots = attention_slots(pipe)
    a, none = slots.acquire([(lora, 0.8)]), slots.acquire([])
    block = pipe.unet.down_blocks[1].attentions[0]
    channels, cross = pipe.unet.config.block_out_channels[1], pipe.unet.config.cross_attention_dim
    compiled = torch.compile(block, backend="inductor", dynamic=False)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for samples in (1, 2, 4):  # 2, 4, 8 rows with guidance
            slots.set_batch([a if i % 2 == 0 else none for i in range(samples)], guidance=True)
            x, text = torch.randn(2 * samples, channels, 8, 8), torch.randn(2 * samples, 7, cross)
            want = block(x, encoder_hidden_states=text, return_dict=False)[0]
            for t in (x, text):
                torch._dynamo.maybe_mark_dynamic(t, 0)
            got = compiled(x, encoder_hidden_states=text, return_dict=False)[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1
