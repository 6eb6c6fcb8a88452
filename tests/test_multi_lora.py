"""Mixed-adapter batches (rayimg.render.multi_lora) on the tiny models, CPU, float32.

Every image of a mixed batch is checked against the same request rendered alone by diffusers'
own LoRA path (``load_lora_weights`` + ``set_adapters``, peft layers). Latents
(``output_type="latent"``) are compared: the tiny VAE's decoder would squash differences.
"""

from __future__ import annotations

import random

import pytest
import torch

from rayimg.models.tiny import build_tiny_sd, build_tiny_sdxl
from rayimg.render.adapters import FusedAdapters, LoraError, LoraLayer, LoraWeights, load_lora_file
from rayimg.render.multi_lora import AdapterSlots, SlotConfig, SlotsExhausted, targets_of
from rayimg.render.slotted import is_slotted

from tests.test_render_engine import ATTN, TEXT, make_lora

SIZE = 64
STEPS = 2
# Latents are O(1); a batch of several samples differs from one alone by 1e-5 to 2e-5 in float32 on CPU
# (kernels block differently by batch size), LoRA or not.
TOL = dict(rtol=1e-5, atol=3e-5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run faster (and steadier) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        # attention + 3x3 conv LoRA (resnets' conv1) + text-encoder LoRA; alpha 8 / rank 4
        "a": make_lora(root / "a", "sd", 1, rank=4, alpha=8, unet_targets=ATTN + ["conv1"], text_targets=TEXT, text_alpha=1),
        # cross-attention k/v and the transformer's proj_out (a 1x1 conv in tiny SD); alpha 2 / rank 2
        "b": make_lora(root / "b", "sd", 2, rank=2, alpha=2, unet_targets=["to_k", "to_v", "proj_out"]),
        # rank 8, alpha 4: feed-forward, attention out, the shortcut conv and the time projection
        "c": make_lora(root / "c", "sd", 3, rank=8, alpha=4,
                       unet_targets=["ff.net.0.proj", "ff.net.2", "to_out.0", "conv_shortcut", "time_emb_proj"]),
    }


@pytest.fixture(scope="module")
def loras(lora_dirs):
    return {name: load_lora_file(path, name=name) for name, path in lora_dirs.items()}


def tiny_sd():
    pipe = build_tiny_sd(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(lora_dirs):
    """diffusers' own LoRA path: the tiny SD with every adapter loaded as peft layers."""
    pipe = tiny_sd()
    for name, path in lora_dirs.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    return pipe


def render(pipe, requests) -> torch.Tensor:
    """One pipeline call for ``requests`` (``(adapters, prompt, seed)``); each image's noise comes
    from its own generator, so an image's latents depend on its own request only."""
    return pipe(prompt=[r[1] for r in requests], negative_prompt=[f"blurry {r[1]}" for r in requests],
                num_inference_steps=STEPS, guidance_scale=5.0, width=SIZE, height=SIZE,
                generator=[torch.Generator().manual_seed(r[2]) for r in requests], output_type="latent").images


def render_reference(pipe, request) -> torch.Tensor:
    """``request`` alone through diffusers' ``set_adapters`` (names and weights as given)."""
    adapters = request[0]
    if adapters:
        pipe.enable_lora()
        pipe.set_adapters([name for name, _ in adapters], adapter_weights=[scale for _, scale in adapters])
    else:
        pipe.disable_lora()
    return render(pipe, [request])[0]


def with_weights(loras, requests):
    return [[(loras[name], scale) for name, scale in r[0]] for r in requests]


def parameters(*models) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": t.detach().clone() for i, m in enumerate(models)
            for n, t in [*m.named_parameters(), *m.named_buffers()]}


# --------------------------------------------------------------------------- the math against diffusers
MIXED = [
    ([("a", 1.0)], "a red circle", 1),                 # conv + text-encoder LoRA
    ([("b", 0.7)], "a blue square", 2),
    ([], "a green triangle", 3),                       # no adapter in the same batch
    ([("a", 0.5), ("b", 1.2)], "a yellow star", 4),    # two adapters, two scales
    ([("c", -0.6)], "a black cat", 5),                 # rank 8, negative scale
    ([("c", 1.0), ("a", 0.3)], "a white house", 6),
]


def test_mixed_batch_equals_each_request_alone_in_diffusers(loras, reference):
    pipe = tiny_sd()
    slots = AdapterSlots(pipe, SlotConfig(num_slots=4, max_rank=8, max_batch=6, max_adapters=2))
    assert any(type(m).__name__ == "SlottedConv2d" for m in pipe.unet.modules())
    with slots.batch(with_weights(loras, MIXED), guidance=True):
        mixed = render(pipe, MIXED)
    base = tiny_sd()
    for i, request in enumerate(MIXED):
        expected = render_reference(reference, request)
        torch.testing.assert_close(mixed[i], expected, **TOL, msg=lambda m: f"request {i} {request[0]}: {m}")
        if request[0]:
            effect = (expected - render(base, [request])[0]).abs().max()
            assert effect > 0.05, f"request {i}: the adapters should change the image (changed by {effect})"
    # Alone through the slots, an image equals diffusers' to the last bits or nearly.
    with slots.batch(with_weights(loras, MIXED[3:4])):
        alone = render(pipe, MIXED[3:4])[0]
    torch.testing.assert_close(alone, render_reference(reference, MIXED[3]), rtol=0, atol=2e-5)


def test_text_encoder_lora_applies_to_its_own_prompt_only(loras):
    """Adapter a's text-encoder layers change only the embeddings of the prompt that asks for it."""
    pipe = tiny_sd()
    slots = AdapterSlots(pipe, SlotConfig(num_slots=2, max_rank=8, max_batch=3))
    prompts = ["a red circle", "a red circle", "a blue square"]
    with slots.batch([[(loras["a"], 1.0)], [], [(loras["a"], 0.5)]]):
        embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    plain = tiny_sd().encode_prompt(prompts, "cpu", 1, False)[0]
    assert (embeds[0] - plain[0]).abs().max() > 1e-3
    assert torch.equal(embeds[1], plain[1])
    assert (embeds[2] - plain[2]).abs().max() > 1e-3


def test_scale_zero_is_the_base_model(loras):
    pipe, base = tiny_sd(), tiny_sd()
    requests = [([("a", 0.0)], "a red circle", 1), ([("b", 0.0), ("c", 0.0)], "a blue square", 2), ([], "a cat", 3)]
    expected = render(base, requests)
    slots = AdapterSlots(pipe, SlotConfig(num_slots=3, max_rank=8, max_batch=3))
    with slots.batch(with_weights(loras, requests)):
        assert torch.equal(render(pipe, requests), expected)
    with slots.batch(with_weights(loras, [([("a", 1.0)], "", 0)] * 3)):
        assert not torch.allclose(render(pipe, requests), expected, atol=1e-2)
        # passthrough: the base computation only, whatever the rows say (no batch needs to be set)
        slots.set_passthrough(True)
        assert torch.equal(render(pipe, requests), expected)
        # ... and with an adapter fused into the weights, what the fused path gives without slots
        fused, plain = FusedAdapters(pipe), FusedAdapters(base)
        fused.apply([(loras["b"], 0.8)])
        plain.apply([(loras["b"], 0.8)])
        assert torch.equal(render(pipe, requests[:1]), render(base, requests[:1]))
        fused.restore()
        plain.restore()
        slots.set_passthrough(False)
    with pytest.raises(LoraError, match="no batch is set"):
        render(pipe, requests)


def test_sdxl_mixed_batch_equals_diffusers(tmp_path):
    xl_dirs = {
        "xl": make_lora(tmp_path / "xl", "sdxl", 3, rank=4, alpha=4, unet_targets=ATTN, text_targets=TEXT),  # both text encoders
        "xc": make_lora(tmp_path / "xc", "sdxl", 4, rank=2, alpha=1, unet_targets=["ff.net.2", "conv2", "proj_in"]),
    }
    xl_loras = {name: load_lora_file(path, name=name) for name, path in xl_dirs.items()}
    assert set(xl_loras["xl"].layers) == {"unet", "text_encoder", "text_encoder_2"}
    reference = build_tiny_sdxl(0)
    reference.set_progress_bar_config(disable=True)
    for name, path in xl_dirs.items():
        reference.load_lora_weights(str(path), adapter_name=name)
    pipe = build_tiny_sdxl(0)
    pipe.set_progress_bar_config(disable=True)
    requests = [([("xl", 1.0)], "a red circle", 1), ([], "a blue square", 2), ([("xl", 0.6), ("xc", 1.5)], "a cat", 3)]
    slots = AdapterSlots(pipe, SlotConfig(num_slots=2, max_rank=4, max_batch=3))
    with slots.batch(with_weights(xl_loras, requests)):
        mixed = render(pipe, requests)
    for i, request in enumerate(requests):
        torch.testing.assert_close(mixed[i], render_reference(reference, request), **TOL, msg=lambda m: f"request {i}: {m}")
    reference.disable_lora()
    assert (mixed[0] - render(reference, requests[:1])[0]).abs().max() > 0.05


def test_render_engine_layout_fused_qkv_and_channels_last(loras, reference):
    """Slots installed after the render engine's speed-ups (fused QKV projections, channels-last UNet)."""
    from rayimg.config import EngineConfig
    from rayimg.render import speedups

    pipe = tiny_sd()
    speedups.apply(pipe, EngineConfig(fuse_qkv=True, channels_last=True))
    conv = pipe.unet.down_blocks[0].resnets[0].conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    slots = AdapterSlots(pipe, SlotConfig(num_slots=3, max_rank=8, max_batch=4))
    attn1 = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    attn2 = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    # q, k and v of self-attention share one table (three rank bands); cross-attention's k, v another
    assert type(attn1.to_qkv).__name__ == "SlottedLinear" and attn1.to_qkv.lora_slot_down.shape[1] == 3 * 8
    assert type(attn2.to_kv).__name__ == "SlottedLinear" and type(attn2.to_q).__name__ == "SlottedLinear"
    assert type(attn1.to_q) is torch.nn.Linear  # unused once fused: no slots
    # a channels-last conv at batch 1, against the LoRA as two convolutions (peft's form)
    lone = slots.acquire([(loras["a"], 1.0)])
    slots.set_batch([lone], guidance=False)
    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(0)).to(memory_format=torch.channels_last)
    y = conv(x)
    layer = loras["a"].layers["unet"]["down_blocks.0.resnets.0.conv1"]
    delta = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, layer.down, padding=1), layer.up) * layer.scale
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1) + delta, rtol=1e-5, atol=1e-5)
    slots.release(lone)
    requests = MIXED[:4]
    with slots.batch(with_weights(loras, requests)):
        mixed = render(pipe, requests)
    for i, request in enumerate(requests):
        torch.testing.assert_close(mixed[i], render_reference(reference, request), **TOL, msg=lambda m: f"request {i}: {m}")
    pipe.unfuse_qkv_projections()  # the installed layout no longer matches: a new load is refused
    with pytest.raises(LoraError, match="fuse"):
        slots.load(loras["c"])


def test_float8_linears_take_slots():
    """A float8 linear (rayimg.render.fp8) keeps its float8 product; the LoRA is added to it."""
    from rayimg.render.fp8 import Float8Linear, convert_unet

    pipe = tiny_sd()
    assert convert_unet(pipe.unet) > 0
    slots = AdapterSlots(pipe, SlotConfig(num_slots=1, max_rank=2, max_batch=2, unet_targets=("to_q",), text_targets=()))
    module = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(module, Float8Linear) and type(module).__name__ == "SlottedFloat8Linear"
    g = torch.Generator().manual_seed(0)
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = LoraLayer(torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g), alpha=1.0)
    lora = LoraWeights({"unet": {path: layer}}, "e" * 64, "q-only")
    x = torch.randn(2, 16, 64, generator=g)
    with slots.batch([[(lora, 0.5)], []], guidance=False):
        y = module(x)
    base = Float8Linear.forward(module, x)
    torch.testing.assert_close(y[0], base[0] + 0.5 * layer.scale * (x[0] @ layer.down.T @ layer.up.T), rtol=0, atol=1e-5)
    assert torch.equal(y[1], base[1])


# --------------------------------------------------------------------------- slots
def random_adapters(pipe, count: int, seed: int) -> list[LoraWeights]:
    """Small adapters on random modules (linear and conv, UNet and text encoder) with random ranks
    and alphas, so slots are reused by adapters of other ranks and other modules."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    candidates = [("unet", n, m) for n, m in pipe.unet.named_modules() if n.endswith(("to_q", "to_k", "to_out.0", "conv1", "proj_out"))]
    candidates += [("text_encoder", n, m) for n, m in pipe.text_encoder.named_modules() if n.endswith(("q_proj", "out_proj"))]
    out = []
    for i in range(count):
        layers: dict[str, dict[str, LoraLayer]] = {}
        for component, name, module in rng.sample(candidates, rng.randint(1, 4)):
            rank = rng.randint(1, 8)
            if isinstance(module, torch.nn.Conv2d):
                down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g)
                up = torch.randn(module.out_channels, rank, 1, 1, generator=g)
            else:
                down, up = torch.randn(rank, module.in_features, generator=g), torch.randn(module.out_features, rank, generator=g)
            layers.setdefault(component, {})[name.removeprefix("text_model.")] = LoraLayer(down, up, alpha=rng.choice([1.0, rank, 8.0]))
        out.append(LoraWeights(layers, f"{i:064x}", f"random-{i}"))
    return out


def test_ten_thousand_loads_and_evictions_leave_the_base_weights_bit_identical(loras):
    pipe = tiny_sd()
    before = parameters(pipe.unet, pipe.text_encoder)
    keys = list(pipe.unet.state_dict())
    slots = AdapterSlots(pipe, SlotConfig(num_slots=3, max_rank=8, max_batch=2))
    assert list(pipe.unet.state_dict()) == keys  # the tables are not part of the model's state
    pool = random_adapters(pipe, 12, seed=0) + list(loras.values())
    rng = random.Random(1)
    pinned = []
    while slots.stats["loads"] < 10_000:
        weights = rng.choice(pool)
        if rng.random() < 0.1:
            if not any(weights.fingerprint in p.fingerprints for p in pinned):
                slots.evict(weights)
        elif rng.random() < 0.05 and len(pinned) < 2:
            pinned.append(slots.acquire([(weights, 1.0)]))
        elif pinned and rng.random() < 0.05:
            slots.release(pinned.pop(rng.randrange(len(pinned))))
        else:
            slots.load(weights)
        for p in pinned:  # a pinned adapter never leaves its slot
            assert slots.loaded().get(p.fingerprints[0]) == p.slots[0]
    assert slots.stats["evictions"] > 5_000
    assert all(torch.equal(t, before[n]) for n, t in parameters(pipe.unet, pipe.text_encoder).items())

    # The tables equal those of fresh slots loaded with the same adapters in the same slots:
    # nothing of an earlier occupant (its modules, its higher ranks) is left behind.
    resident = sorted(slots.loaded().items(), key=lambda item: item[1])
    by_key = {w.fingerprint: w for w in pool}
    tables = {k: t.clone() for k, t in slots.stores.items()}
    module = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert module.lora_slot_down.untyped_storage().data_ptr() == slots.stores[(torch.device("cpu"), torch.float32)].untyped_storage().data_ptr()
    for p in pinned:
        slots.release(p)
    slots.uninstall()
    assert list(pipe.unet.state_dict()) == keys and not hasattr(module, "lora_slot_down") and type(module) is torch.nn.Linear
    fresh = AdapterSlots(pipe, SlotConfig(num_slots=3, max_rank=8, max_batch=2))
    for key, slot in resident:
        assert fresh.load(by_key[key]) == slot
    assert tables.keys() == fresh.stores.keys()
    assert all(torch.equal(tables[k], fresh.stores[k]) for k in tables)
    # Evicting everything leaves every table zero.
    for key, _ in resident:
        assert fresh.evict(key)
    assert not any(t.any() for t in fresh.stores.values())
    fresh.uninstall()
    assert all(torch.equal(t, before[n]) for n, t in parameters(pipe.unet, pipe.text_encoder).items())


def test_slot_manager_lru_pins_and_refusals(loras):
    pipe = tiny_sd()
    slots = AdapterSlots(pipe, SlotConfig(num_slots=2, max_rank=8, max_batch=2, max_adapters=2))
    a, b, c = loras["a"], loras["b"], loras["c"]
    pa = slots.acquire([(a, 1.0)])
    slots.load(b)
    assert slots.load(a) == pa.slots[0] and slots.stats["hits"] == 1
    slots.load(c)  # b is the least recently used unpinned adapter
    assert set(slots.loaded()) == {a.fingerprint, c.fingerprint} and slots.stats["evictions"] == 1
    pc = slots.acquire([(c, 0.5)])
    with pytest.raises(SlotsExhausted, match="pinned"):
        slots.acquire([(b, 1.0)])
    with pytest.raises(LoraError, match="pinned"):
        slots.evict(c)
    slots.release(pc)
    pb = slots.acquire([(b, 1.0)])
    assert set(slots.loaded()) == {a.fingerprint, b.fingerprint}

    # Calls with no batch set, or with a batch whose adapters were released, refuse to run.
    request = [([], "a cat", 1)]
    with pytest.raises(LoraError, match="set_batch"):
        render(pipe, request)
    slots.set_batch([pb], guidance=True)
    render(pipe, request)
    with pytest.raises(LoraError, match="2 rows"):
        slots.set_batch([pb], guidance=False)
        render(pipe, request)
    # A compiled UNet's caller checks each call's rows outside the graph, with the same error.
    slots.check_rows("unet", 1)
    with pytest.raises(LoraError, match=r"unet call got 2 rows but the batch set has 1 rows"):
        slots.check_rows("unet", 2)
    slots.set_batch([pb], guidance=True)
    slots.check_rows("unet", 2)
    slots.check_rows("text_encoder", 1)
    slots.release(pb)
    with pytest.raises(LoraError, match="no batch is set"):
        render(pipe, request)
    with pytest.raises(LoraError, match="released"):
        slots.set_batch([pb])
    with pytest.raises(LoraError, match="released already"):
        slots.release(pb)

    # Refusals name the adapter and the reason; nothing is loaded.
    with pytest.raises(LoraError, match="max_adapters"):
        slots.acquire([(a, 1.0), (b, 1.0), (c, 1.0)])
    with pytest.raises(LoraError, match="max_batch"):
        slots.set_batch([pa] * 3)
    small = AdapterSlots(tiny_sd(), SlotConfig(num_slots=1, max_rank=2))
    with pytest.raises(LoraError, match=r"adapter 'a'.*rank 4.*max_rank"):
        small.load(a)
    with pytest.raises(LoraError, match=r"adapter 'a'.*text_encoder.*no adapter slots"):
        AdapterSlots(tiny_sd(), SlotConfig(num_slots=1, max_rank=8, text_targets=())).load(a)
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    nan = LoraWeights({"unet": {path: LoraLayer(torch.full((1, 64), float("nan")), torch.zeros(64, 1), 1.0)}}, "n" * 64, "nan")
    with pytest.raises(LoraError, match="'nan'.*NaN"):
        small.load(nan)
    misshapen = LoraWeights({"unet": {path: LoraLayer(torch.zeros(1, 7), torch.zeros(64, 1), 1.0)}}, "m" * 64, "misshapen")
    with pytest.raises(LoraError, match="misshapen.*attn1.to_q"):
        small.load(misshapen)
    assert small.loaded() == {}
    with pytest.raises(ValueError, match="num_slots"):
        SlotConfig(num_slots=0)
    # Slot-row images: one per adapter, cached up to SlotConfig.images, rebuilt after that.
    one_image = AdapterSlots(tiny_sd(), SlotConfig(num_slots=2, max_rank=8, images=1))
    for weights in (a, b, b, a):
        one_image.evict(weights)
        one_image.load(weights)
    assert one_image.stats["images"] == 3 and one_image.row_nbytes * 3 == one_image.nbytes
    # Slots for exactly the modules a registry's adapters use.
    targets = targets_of([b])
    exact = AdapterSlots(tiny_sd(), SlotConfig(num_slots=1, max_rank=2, unet_targets=targets["unet"], text_targets=()))
    assert exact.num_modules == sum(len(m) for m in b.layers.values())
    exact.load(b)


class TinyNet(torch.nn.Module):
    """A 3x3 conv and a linear, as in a UNet block (defined outside torch, so dynamo traces it)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.proj_out = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj_out(self.conv1(x).flatten(2).transpose(1, 2))


def counting(backend, graphs: list):
    def compile_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return backend(graph_module, example_inputs)

    return compile_graph


def test_compiled_modules_keep_one_graph_across_loads_and_batches(loras):
    """Loading adapters into slots and changing a batch's adapters are copies into the same
    tensors: one compiled graph (no graph break, no recompile) computing what eager computes."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.compile_fx import compile_fx

    # dynamo's caches are per code object and process-wide: compiles by earlier tests of the session
    # (the step loop's) can have used up this block's recompile budget, and it would then run eager
    torch._dynamo.reset()
    # A block of the tiny UNet (resnets with conv1, conv_shortcut, time_emb_proj; attention, proj_in/out,
    # feed-forward), traced whole and through AOT autograd.
    pipe = tiny_sd()
    slots = AdapterSlots(pipe, SlotConfig(num_slots=2, max_rank=8, max_batch=2))
    block = pipe.unet.down_blocks[1]
    g = torch.Generator().manual_seed(0)
    x, temb, text = torch.randn(2, 32, 8, 8, generator=g), torch.randn(2, 128, generator=g), torch.randn(2, 77, 32, generator=g)
    batches = [[[(loras["a"], 1.0)], [(loras["b"], 0.5)]], [[(loras["c"], 0.8), (loras["a"], 0.3)], []]]
    eager = []
    for batch in batches:
        with slots.batch(batch, guidance=False):
            eager.append(block(x, temb, encoder_hidden_states=text)[0])
    graphs = []
    block.compile(backend=counting(aot_autograd(fw_compiler=lambda gm, _: gm.forward), graphs), fullgraph=True, dynamic=False)
    for batch, expected in zip(batches, eager):
        for key in list(slots.loaded()):
            slots.evict(key)  # each batch loads its adapters afresh
        with slots.batch(batch, guidance=False):
            assert torch.equal(block(x, temb, encoder_hidden_states=text)[0], expected)
    assert len(graphs) == 1 and (eager[0] - eager[1]).abs().max() > 1e-3
    # each slotted module's low-rank product accumulates into its base output in place (no copy of it)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    slotted = sum(is_slotted(m) for m in block.modules())
    assert slotted and targets.count("rayimg.add_low_rank_.default") == slotted, (slotted, sorted(set(targets)))
    assert not any("baddbmm" in t for t in targets), sorted(set(targets))

    # inductor's kernels for the gathers, the grouped conv and the batched products
    holder = type("Holder", (), {"unet": TinyNet()})()
    slots = AdapterSlots(holder, SlotConfig(num_slots=2, max_rank=4, max_batch=3))

    def lora(i: int, rank: int) -> LoraWeights:
        return LoraWeights({"unet": {
            "conv1": LoraLayer(torch.randn(rank, 4, 3, 3, generator=g), torch.randn(8, rank, 1, 1, generator=g), 2.0),
            "proj_out": LoraLayer(torch.randn(rank, 8, generator=g), torch.randn(8, rank, generator=g), 1.0)}}, f"{i:064x}", f"tiny-{i}")

    tiny = [lora(i, rank) for i, rank in enumerate((1, 4, 2))]
    x = torch.randn(3, 4, 6, 6, generator=g)
    batches = [[[(tiny[0], 1.0)], [], [(tiny[1], 0.5), (tiny[0], -1.0)]], [[(tiny[2], 2.0)], [(tiny[1], 1.0)], []]]
    eager = []
    for batch in batches:
        with slots.batch(batch, guidance=False):
            eager.append(holder.unet(x))
    graphs = []
    holder.unet.compile(backend=counting(compile_fx, graphs), fullgraph=True, dynamic=False)
    for batch, expected in zip(batches, eager):
        with slots.batch(batch, guidance=False):
            torch.testing.assert_close(holder.unet(x), expected, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1 and len(slots.loaded()) == 2
