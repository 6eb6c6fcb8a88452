"""Per-row isolation of adapter problems: a catalog row naming an adapter of the other model
family, a textual-inversion adapter or an adapter whose weights fail to load goes to
``errors.jsonl`` with its reason; the rest of the catalog renders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rayimg.config import RenderJob, from_dict
from rayimg.registry import AdapterIncompatible, adapter_family, check_adapter, publish_adapter
from rayimg.run.render import run as render
from rayimg.storage import Storage
from tests.test_render_engine import ATTN, TEXT, make_lora

SD_ID = "rayimg-tiny-sd"
OTHER_HASH = "0" * 64


def lora_metadata(model_id: str, family: str | None, model_hash: str = OTHER_HASH, **extra) -> dict:
    """adapter.json's fields as the train job writes them (``family`` None: as published before
    the family was recorded; the train job's model.family was 'auto')."""
    base = {"id": model_id, "hash": model_hash, **({"family": family} if family else {})}
    return {"base_model": base, "method": "lora", "rank": 4, "alpha": 4, "target_modules": ATTN, "trigger_word": None,
            "training_config": {"model": {"pretrained": model_id, "family": "auto"}}, "steps": 10, **extra}


# --------------------------------------------------------------------------- check_adapter
def test_check_adapter_family_method_and_inference():
    sdxl = {**lora_metadata("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"), "name": "x", "version": "2"}
    with pytest.raises(AdapterIncompatible) as e:
        check_adapter(sdxl, family="sd", model_id=SD_ID, model_hash="1" * 64)
    assert str(e.value).startswith("adapter 'x' version '2' was trained for an SDXL base model ('stabilityai/stable-diffusion-xl-base-1.0'), "
                                   "this job renders an SD 1.5-family model ('rayimg-tiny-sd')")
    # another base model of the same family is fine, with a warning
    assert "transfer across fine-tunes" in check_adapter(sdxl, family="sdxl", model_id="my/sdxl-finetune", model_hash="1" * 64)
    # trained on this very model: nothing to say
    assert check_adapter({**sdxl, "base_model": {"id": "m", "hash": "1" * 64}}, family="sdxl", model_id="m", model_hash="1" * 64) is None

    ti = {"name": "y", "version": "1", "method": "textual_inversion", "placeholder_token": "<tok>", "base_model": {"id": SD_ID, "hash": "h"},
          "weights": {"learned_embeds.safetensors": "abc"}}
    with pytest.raises(AdapterIncompatible, match=r"adapter 'y' version '1' is a textual inversion \(an embedding for token '<tok>'\), not a LoRA"):
        check_adapter(ti, family="sd", model_id=SD_ID, model_hash="h")
    with pytest.raises(AdapterIncompatible, match="not a JSON object"):
        check_adapter(["not", "a", "dict"], family="sd", model_id=SD_ID)

    # family of adapters published before it was recorded
    old = lora_metadata("acme/base", None)
    assert adapter_family(old) is None
    assert adapter_family(old, {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": [2, 1280]}) == "sdxl"
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    assert adapter_family(old, {key: [4, 2048]}) == "sdxl" and adapter_family(old, {key: [4, 768]}) == "sd"
    assert adapter_family(lora_metadata("stabilityai/stable-diffusion-xl-base-1.0", None)) == "sdxl"
    assert adapter_family(lora_metadata("runwayml/stable-diffusion-v1-5", None)) == "sd"
    assert adapter_family({**old, "training_config": {"model": {"family": "sdxl"}}}) == "sdxl"
    with pytest.raises(AdapterIncompatible, match="was trained for an SDXL base model"):
        check_adapter({**old, "name": "z", "version": "1"}, family="sd", model_id=SD_ID, shapes={key: [4, 2048]})
    assert check_adapter(old, family="sd", model_id=SD_ID) is None  # unknown family: the load-time check decides


# --------------------------------------------------------------------------- the render job
@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from rayimg.train.export import save_textual_inversion

    root = str(tmp_path_factory.mktemp("registry"))
    files = tmp_path_factory.mktemp("adapter-files")
    st = Storage()
    publish_adapter(st, root, "good-sd", None, make_lora(files / "sd", "sd", 1, rank=4, alpha=4, unet_targets=ATTN),
                    lora_metadata(SD_ID, "sd"))
    publish_adapter(st, root, "xl-style", None, make_lora(files / "sdxl", "sdxl", 2, rank=4, alpha=4, unet_targets=ATTN),
                    lora_metadata("rayimg-tiny-sdxl", "sdxl"))
    # published before the family was recorded, base id naming no family: the weights tell
    publish_adapter(st, root, "old-xl", None, make_lora(files / "old-xl", "sdxl", 3, rank=4, alpha=4, unet_targets=ATTN, text_targets=TEXT),
                    lora_metadata("acme/base", None))
    publish_adapter(st, root, "old-sd", None, make_lora(files / "old-sd", "sd", 4, rank=4, alpha=4, unet_targets=ATTN),
                    lora_metadata("acme/base", None))
    save_textual_inversion(files / "ti", "sd", {"<cat-toy>": torch.randn(1, 32)}, token="<cat-toy>")
    publish_adapter(st, root, "cat-toy", None, files / "ti",
                    {"base_model": {"id": SD_ID, "hash": OTHER_HASH, "family": "sd"}, "method": "textual_inversion", "rank": None,
                     "trigger_word": "<cat-toy>", "placeholder_token": "<cat-toy>", "num_vectors": 1, "steps": 10})
    # passes validation (its adapter.json is fine), fails at load: its weights do not match the sha256
    uri, _ = publish_adapter(st, root, "corrupt", None, make_lora(files / "corrupt", "sd", 5, rank=4, alpha=4, unet_targets=ATTN),
                             lora_metadata(SD_ID, "sd"))
    Path(uri, "pytorch_lora_weights.safetensors").write_bytes(b"not the published weights")
    return root


GOOD = [
    {"id": "plain", "prompt": "a red circle", "seed": 1},
    {"id": "good", "prompt": "a red circle", "seed": 1, "adapters": "good-sd"},
    {"id": "old-sd", "prompt": "a red circle", "seed": 2, "adapters": "old-sd:0.5"},
]
BAD = {
    "xl": ({"prompt": "x", "seed": 1, "adapters": "xl-style"},
           "adapter 'xl-style' version '1' was trained for an SDXL base model ('rayimg-tiny-sdxl'), "
           "this job renders an SD 1.5-family model ('rayimg-tiny-sd')"),
    "xl-with-good": ({"prompt": "x", "seed": 1, "adapters": "good-sd,xl-style"}, "was trained for an SDXL base model"),
    "ti": ({"prompt": "x <cat-toy>", "seed": 1, "adapters": "cat-toy"},
           "adapter 'cat-toy' version '1' is a textual inversion (an embedding for token '<cat-toy>'), not a LoRA"),
    "old-xl": ({"prompt": "x", "seed": 1, "adapters": "old-xl"},
               "adapter 'old-xl' version '1' was trained for an SDXL base model ('acme/base')"),
    "corrupt": ({"prompt": "x", "seed": 3, "adapters": "corrupt"}, "adapter could not be loaded: adapter 'corrupt' version '1': sha256"),
}


def test_bad_adapter_rows_go_to_errors_and_the_rest_renders(ray_cluster, registry, tmp_path):
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in GOOD + [{"id": k, **row} for k, (row, _) in BAD.items()]))
    out = str(tmp_path / "out")
    job = from_dict(RenderJob, {
        "catalog": {"source": str(catalog)}, "output": {"uri": out}, "registry": registry, "model": {"device": "cpu"},
        "defaults": {"steps": 2, "width": 64, "height": 64, "guidance_scale": 3.0},
        "limits": {"max_width": 128, "max_height": 128, "max_steps": 10}, "engine": {"batch_size": 2}})
    summary = render(job)  # returns normally: exit 0
    assert summary["errors"] == len(BAD) and summary["images"] == len(GOOD)
    errors = {json.loads(line)["row_id"]: json.loads(line)["reason"] for line in open(f"{out}/errors.jsonl")}
    assert set(errors) == set(BAD)
    for row_id, (_row, reason) in BAD.items():
        assert reason in errors[row_id], (row_id, errors[row_id])
    manifest = pq.read_table(io.BytesIO(Storage().read_bytes(f"{out}/manifest.parquet"))).to_pylist()
    assert sorted(r["row_id"] for r in manifest) == sorted(r["id"] for r in GOOD)
    for r in manifest:
        assert Path(r["path"]).stat().st_size > 0
    from PIL import Image

    sheet = Image.open(summary["contact_sheet"])  # a sample of the rendered rows, captioned
    assert summary["contact_sheet"] == f"{out}/contact_sheet.png" and sheet.width > 64
