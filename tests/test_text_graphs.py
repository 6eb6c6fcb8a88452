"""rayimg.render.text_graphs on the CPU: install leaves CPU encoders alone, the wrapped forward
passes every call through unchanged when it cannot replay, and a graph's key changes exactly
when a replay could not follow a change (a storage replaced, slot rows' Python state), not when
weights change in place. The replays themselves: tests/test_gpu_engine.py."""

from __future__ import annotations

import pytest
import torch

from rayimg.models.tiny import build_tiny_sdxl
from rayimg.render.adapters import FusedAdapters, load_lora_file
from rayimg.render.multi_lora import AdapterSlots, SlotConfig
from rayimg.render.text_graphs import GraphedForward, install

from tests.test_render_engine import ATTN, TEXT, make_lora


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny_sdxl(0)
    p.set_progress_bar_config(disable=True)
    return p


def ids_of(pipe, text: str) -> torch.Tensor:
    return pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids


def test_install_leaves_cpu_encoders_alone(pipe):
    assert install(pipe) == []
    assert "forward" not in pipe.text_encoder.__dict__ and "forward" not in pipe.text_encoder_2.__dict__


@torch.no_grad()
def test_calls_it_cannot_replay_run_the_eager_forward(pipe):
    encoder = pipe.text_encoder_2
    wrapped = GraphedForward(encoder)
    ids = ids_of(pipe, "a red circle")
    mask = torch.ones_like(ids)
    for kwargs in ({"output_hidden_states": True}, {}, {"attention_mask": mask}, {"return_dict": False}):
        got, want = wrapped(ids, **kwargs), encoder(ids, **kwargs)
        assert type(got) is type(want)
        for a, b in zip(got if isinstance(got, tuple) else got.to_tuple(), want if isinstance(want, tuple) else want.to_tuple()):
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                assert torch.equal(x, y)
    assert wrapped.stats == {"replays": 0, "captures": 0, "eager": 4}
    # as the pipelines call it: the instance's forward, the module unchanged
    encoder.forward = wrapped
    try:
        out = pipe.encode_prompt(prompt=["a red circle"], device=torch.device("cpu"), num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    finally:
        del encoder.forward
    plain = pipe.encode_prompt(prompt=["a red circle"], device=torch.device("cpu"), num_images_per_prompt=1,
                               do_classifier_free_guidance=False)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[2], plain[2]) and wrapped.stats["eager"] == 5


def test_key_follows_what_a_replay_cannot_see(tmp_path):
    pipe = build_tiny_sdxl(0)
    wrapped = GraphedForward(pipe.text_encoder)
    key = wrapped._state()
    assert wrapped._state() == key
    # a fused adapter is copied into the weights' own storage: a replay reads it, the key stays
    lora = load_lora_file(make_lora(tmp_path / "t", "sdxl", 2, rank=4, alpha=4, unet_targets=ATTN, text_targets=TEXT)
                          / "pytorch_lora_weights.safetensors", name="t")
    fused = FusedAdapters(pipe)
    q_proj = next(m for name, m in pipe.text_encoder.named_modules() if name.endswith("q_proj"))
    before = q_proj.weight.clone()
    fused.apply([(lora, 1.0)])
    assert not torch.equal(q_proj.weight, before)
    assert wrapped._state() == key
    fused.apply([])
    # slots: installing them changes module classes; the rows' passthrough and count are Python state
    slots = AdapterSlots(pipe, SlotConfig(num_slots=2, max_rank=4, max_batch=2))
    slotted = wrapped._state()
    assert slotted != key
    pinned = slots.acquire([(lora, 1.0)])
    slots.set_batch([pinned], guidance=False)
    one_row = wrapped._state()
    assert one_row != slotted
    slots.set_passthrough(True)
    assert wrapped._state() != one_row
    slots.set_passthrough(False)
    assert wrapped._state() == one_row
    slots.release(pinned)
    # a textual inversion grows the embedding table: a new storage, a new key
    pipe.text_encoder.resize_token_embeddings(pipe.text_encoder.get_input_embeddings().num_embeddings + 1)
    assert wrapped._state() != one_row
