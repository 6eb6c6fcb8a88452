"""Warm starts: compiled graphs stored once per key on the job's storage and loaded by the next
process (torch's mega-cache, rayimg.render.compile_cache).

Each run is a fresh Python process with its own empty ``TORCHINDUCTOR_CACHE_DIR``, so neither
in-process caches nor inductor's local disk cache can be what makes the second run warm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayimg.config import EngineConfig
from rayimg.render.compile_cache import CompileCacheError, cache_key, decode_entry, encode_entry, entry_uri

ROOT = Path(__file__).resolve().parents[1]

# A small compiled module through CompileCache, as the Renderer drives it: look up before the
# shape's first call, save after it.
MODULE_RUN = """
import json, sys, torch
if sys.argv[2:] == ["tf32"]:  # a process-wide setting that inductor keys its graphs on
    torch.backends.cuda.matmul.allow_tf32 = True
from rayimg.config import EngineConfig
from rayimg.render.compile_cache import CompileCache, cache_key
from rayimg.storage import Storage

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
cfg = EngineConfig(compile=True)
cache = CompileCache(Storage(), sys.argv[1], lambda shape: cache_key(
    cfg, device="cpu", dtype=torch.float32, model_id="mlp", model_hash="0", shape=shape))
shape = {"batch": 2}
cache.before_call(shape)
with torch.no_grad():
    out = torch.compile(model, dynamic=False)(torch.linspace(-1, 1, 16).reshape(2, 8))
cache.after_call(shape)
print(json.dumps({"events": cache.events, "out": out.tolist()}))
"""

# The Renderer and the server's step loop (StepBatcher) over one tiny SD model with its VAE decoder
# compiled, in the order argv[3] names ("renderer,stepper" or "stepper,renderer"): each looks up
# and saves its own entry.
RENDER_AND_STEP_RUN = """
import json, sys, hashlib
from rayimg.config import EngineConfig, ModelConfig
from rayimg.render.engine import GenerationRequest
from rayimg.render.renderer import Renderer
from rayimg.render.stepper import StepBatcher

renderer = Renderer(ModelConfig(pretrained="rayimg-tiny-sd", device="cpu", cache_dir=sys.argv[1]),
                    EngineConfig(compile_vae=True, compile_cache=sys.argv[2]))
request = GenerationRequest(prompt="a red circle", steps=2, width=64, height=64, seed=3)
result = {}
for part in sys.argv[3].split(","):
    before = len(renderer.compile_cache_status)
    if part == "renderer":
        result["png"] = hashlib.sha256(renderer.render([request])[0].png).hexdigest()
    else:
        batcher = StepBatcher(renderer.engine, max_batch=2, compile_cache=renderer.compile_cache)
        slot = batcher.submit(request)
        while batcher.busy:
            batcher.step()
        result["pixels"] = hashlib.sha256(slot.image.tobytes()).hexdigest()
    result[part] = renderer.compile_cache_status[before:]
print(json.dumps(result))
"""


def run_fresh(code: str, *args: str, inductor_dir: Path) -> tuple[dict, str]:
    """Run ``code`` in a new process with an empty inductor cache; (its JSON result, its stderr)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def cache_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "rayimg compile cache" in line]


def test_key_names_every_graph_setting_and_the_shape():
    base = dict(device="cpu", dtype=torch.bfloat16, model_id="m", model_hash="h",
                shape={"mode": "txt2img", "batch": 1, "width": 64, "height": 64, "guidance": True})
    key = cache_key(EngineConfig(compile=True), **base)
    assert key == cache_key(EngineConfig(compile=True, png_compress_level=9, compile_cache="elsewhere"), **base)
    assert key["torch"] == torch.__version__ and key["accelerator"] == "cpu" and key["dtype"] == "bfloat16"
    uri = entry_uri("s3://bucket/cc", key)
    others = [
        cache_key(EngineConfig(compile=True), **{**base, "shape": {**base["shape"], "batch": 4}}),
        cache_key(EngineConfig(compile=True), **{**base, "shape": {**base["shape"], "width": 128}}),
        cache_key(EngineConfig(compile=True, fuse_qkv=True), **base),
        cache_key(EngineConfig(compile=True, compile_mode="reduce-overhead"), **base),
        cache_key(EngineConfig(compile=True, compile_vae=True), **base),
        cache_key(EngineConfig(compile=True, channels_last=True), **base),
        cache_key(EngineConfig(compile=True, vae_batch=4), **base),
        cache_key(EngineConfig(compile=True), **{**base, "dtype": torch.float32}),
        cache_key(EngineConfig(compile=True), **{**base, "model_hash": "other"}),
    ]
    uris = {entry_uri("s3://bucket/cc", other) for other in others}
    assert uri.startswith("s3://bucket/cc/") and uri.endswith(".bin") and uri not in uris and len(uris) == len(others)

    entry = encode_entry(key, b"payload")
    assert decode_entry(entry, key) == b"payload"
    with pytest.raises(CompileCacheError, match="another key"):
        decode_entry(entry, others[0])
    with pytest.raises(CompileCacheError, match="checksum"):
        decode_entry(entry[:-1] + b"P", key)
    with pytest.raises(CompileCacheError, match="magic"):
        decode_entry(b"junk" + entry, key)


def test_second_process_loads_the_artifacts_and_a_corrupt_one_is_ignored(tmp_path):
    prefix = str(tmp_path / "compile-cache")
    cold, err = run_fresh(MODULE_RUN, prefix, inductor_dir=tmp_path / "inductor-1")
    assert [e["action"] for e in cold["events"]] == ["cold", "saved"], err
    assert cold["events"][0]["graphs_compiled"] >= 1 and cold["events"][1]["bytes"] > 0
    entry = Path(cold["events"][1]["uri"])
    assert entry.is_file() and entry.parent == Path(prefix)

    warm, err = run_fresh(MODULE_RUN, prefix, inductor_dir=tmp_path / "inductor-2")
    [loaded] = warm["events"]
    assert loaded["action"] == "loaded" and loaded["bytes"] == cold["events"][1]["bytes"]
    assert loaded["graphs_from_cache"] >= 1 and loaded["graphs_compiled"] == 0  # nothing compiled from cold
    assert warm["out"] == cold["out"]
    phases = loaded["compile_phases_s"]  # where the first call went, by torch's own counters
    assert set(phases) == {"dynamo tracing", "backend", "guards"} and 0 < phases["dynamo tracing"] < loaded["first_call_s"], phases
    spent = "".join(f", {name} {value:.1f}s" for name, value in phases.items())
    assert cache_lines(err) == [f"rayimg compile cache: loaded {loaded['bytes']} bytes for mlp batch=2 on cpu "
                                f"(torch {torch.__version__}) from {entry}",
                                f"rayimg compile cache: first call for mlp batch=2 on cpu (torch {torch.__version__}) took "
                                f"{loaded['first_call_s']:.1f}s ({loaded['graphs_from_cache']} graph(s) from the cache, 0 compiled{spent})"]

    data = bytearray(entry.read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])  # flip bytes inside the payload
    entry.write_bytes(bytes(data))
    recovered, err = run_fresh(MODULE_RUN, prefix, inductor_dir=tmp_path / "inductor-3")
    assert [e["action"] for e in recovered["events"]] == ["ignored", "saved"]
    assert "checksum" in recovered["events"][0]["reason"] and recovered["events"][0]["graphs_compiled"] >= 1
    warnings = [line for line in err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"WARNING: rayimg compile cache: ignoring {entry} (CompileCacheError: payload checksum mismatch)")
    assert recovered["out"] == cold["out"]  # the run compiled from cold and went on
    assert decode_entry(entry.read_bytes(), recovered["events"][0]["key"])  # and wrote a good entry back

    # the entry is sound, but this process sets TF32, which inductor keys its graphs on: said, not hidden
    other, err = run_fresh(MODULE_RUN, prefix, "tf32", inductor_dir=tmp_path / "inductor-4")
    [loaded] = other["events"]
    assert loaded["action"] == "loaded" and loaded["graphs_from_cache"] == 0 and loaded["graphs_compiled"] >= 1
    [warning] = [line for line in err.splitlines() if line.startswith("WARNING: rayimg compile cache: first call")]
    assert "matched none of this process's graphs" in warning and "TF32" in warning


def test_renderer_reports_no_cache_without_compile(tmp_path):
    from rayimg.config import ModelConfig
    from rayimg.render.renderer import Renderer

    model = ModelConfig(pretrained="rayimg-tiny-sd", device="cpu", cache_dir=str(tmp_path / "models"))
    plain = Renderer(model, EngineConfig(), compile_cache=str(tmp_path / "cc"))
    assert plain.compile_cache is None and plain.compile_cache_status == []
    compiled = Renderer(model, EngineConfig(compile=True, compile_cache=str(tmp_path / "mine")), compile_cache=str(tmp_path / "cc"))
    assert compiled.compile_cache.prefix == str(tmp_path / "mine")  # the engine's own prefix wins over the job's default


@pytest.mark.slow
def test_renderer_and_step_loop_second_process_starts_warm_with_the_same_images(tmp_path):
    """The tiny SD model with its VAE decoder compiled (CPU inductor), through the Renderer and
    through the server's step loop: the first process compiles and saves each one's shape; the
    second loads them, compiles nothing, and renders the same PNG and pixels. The step loop goes
    first in the second process, so its own entry is what makes it warm."""
    models, prefix = str(tmp_path / "models"), str(tmp_path / "compile-cache")
    cold, _ = run_fresh(RENDER_AND_STEP_RUN, models, prefix, "renderer,stepper", inductor_dir=tmp_path / "inductor-1")
    assert [e["action"] for e in cold["renderer"]] == ["cold", "saved"]
    assert cold["renderer"][0]["key"]["shape"] == {"mode": "txt2img", "batch": 1, "width": 64, "height": 64, "guidance": True}
    assert [e["action"] for e in cold["stepper"]] == ["cold", "saved"]
    assert cold["stepper"][0]["key"]["shape"] == {"mode": "step-decode", "batch": 1, "width": 64, "height": 64}
    warm, err = run_fresh(RENDER_AND_STEP_RUN, models, prefix, "stepper,renderer", inductor_dir=tmp_path / "inductor-2")
    [stepper], [renderer] = warm["stepper"], warm["renderer"]
    assert stepper["action"] == "loaded" and stepper["graphs_from_cache"] >= 1 and stepper["graphs_compiled"] == 0
    assert renderer["action"] == "loaded" and renderer["graphs_compiled"] == 0
    assert any(line.startswith("rayimg compile cache: loaded ") for line in cache_lines(err))
    assert warm["png"] == cold["png"] and warm["pixels"] == cold["pixels"]


@pytest.mark.slow
def test_render_job_second_run_starts_warm_and_reports_it(ray_cluster, tmp_path):
    """Two render jobs with a compiled VAE decoder (tiny SD, CPU inductor) sharing one compile
    cache: the first compiles and saves, the second loads the stored graphs; both summaries and
    the job's log say so, and the images are the same bytes."""
    from rayimg.config import RenderJob, from_dict
    from rayimg.run.render import run as render

    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"a red square {i}", "seed": i}) + "\n" for i in range(2)))
    cache = str(tmp_path / "compile-cache")

    def job(out: str):
        return from_dict(RenderJob, {
            "catalog": {"source": str(catalog)}, "output": {"uri": out}, "registry": str(tmp_path / "registry"),
            "model": {"device": "cpu", "cache_dir": str(tmp_path / "models")},
            "defaults": {"steps": 2, "width": 64, "height": 64, "guidance_scale": 3.0},
            "engine": {"batch_size": 2, "compile_vae": True, "compile_cache": cache}})

    cold = render(job(str(tmp_path / "out-1")))
    assert cold["compile_cache"] == {"cold": 1, "saved": 1}, cold
    # the actor compiled the catalog's shape before its first unit came (while the rows were validated)
    [warm_up] = cold["warm_ups"]
    assert warm_up["shape"] == [64, 64, 3.0] and warm_up["seconds"] > 0, cold
    assert len(list(Path(cache).glob("*.bin"))) == 1
    warm = render(job(str(tmp_path / "out-2")))
    assert warm["compile_cache"] == {"loaded": 1}, warm
    assert warm["rendered"] == 2 and warm["first_image_s"] is not None
    for png in (tmp_path / "out-1" / "images").glob("*.png"):
        assert (tmp_path / "out-2" / "images" / png.name).read_bytes() == png.read_bytes()


# The same small module, compiled in place and routed through rayimg.render.aot (what the
# Renderer does to its UNet): its graph is stored whole, so a new process does not trace it.
AOT_RUN = """
import json, sys, torch
from torch._dynamo.utils import counters
from rayimg.config import EngineConfig
from rayimg.render import aot
from rayimg.render.compile_cache import CompileCache, cache_key
from rayimg.storage import Storage

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
cfg = EngineConfig(compile=True)
cache = CompileCache(Storage(), sys.argv[1], lambda shape: cache_key(
    cfg, device="cpu", dtype=torch.float32, model_id="mlp", model_hash="0", shape=shape))
model.compile(mode="reduce-overhead", dynamic=False)
aot.install(model, cache, "reduce-overhead")  # the render speed settings' mode (CUDA graphs; none on CPU)
x = torch.linspace(-1, 1, 16).reshape(2, 8)
with torch.no_grad():
    out = model(x)
    model[2].weight.mul_(2)  # weights are read in place (adapters are fused into them)
    doubled, eager = model(x), model.forward(x)
print(json.dumps({"events": cache.events, "out": out.tolist(), "doubled": doubled.tolist(), "eager": eager.tolist(),
                  "traced": counters["stats"]["unique_graphs"]}))
"""


def test_aot_graph_loads_without_tracing_reads_weights_in_place_and_a_corrupt_one_is_ignored(tmp_path):
    prefix = str(tmp_path / "compile-cache")
    inductor = tmp_path / "inductor"  # shared: what is tested is dynamo's tracing, not inductor's disk cache
    cold, err = run_fresh(AOT_RUN, prefix, inductor_dir=inductor)
    assert [e["action"] for e in cold["events"]] == ["aot_saved"], err
    assert cold["traced"] >= 1 and torch.allclose(torch.tensor(cold["doubled"]), torch.tensor(cold["eager"]), atol=1e-6)
    entry = Path(cold["events"][0]["uri"])
    assert entry.is_file() and cold["events"][0]["key"]["aot"]["structure"]

    warm, err = run_fresh(AOT_RUN, prefix, inductor_dir=inductor)
    assert [e["action"] for e in warm["events"]] == ["aot_loaded"], err
    assert warm["traced"] == 0  # dynamo traced nothing
    assert warm["out"] == cold["out"] and warm["doubled"] == cold["doubled"]  # and the weight change reached the loaded graph
    assert any(line.startswith("rayimg compile cache: loaded the Sequential graph for 2x8") and "no tracing" in line for line in cache_lines(err))

    data = bytearray(entry.read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])
    entry.write_bytes(bytes(data))
    recovered, err = run_fresh(AOT_RUN, prefix, inductor_dir=inductor)
    assert [e["action"] for e in recovered["events"]] == ["aot_ignored", "aot_saved"]
    assert "checksum" in recovered["events"][0]["reason"] and recovered["out"] == cold["out"]
    assert decode_entry(entry.read_bytes(), recovered["events"][0]["key"])  # a good entry written back


def test_aot_dispatch_is_removed_before_adapter_slots_change_the_unet(tmp_path):
    from rayimg.models.tiny import build_tiny_sd
    from rayimg.render import aot
    from rayimg.render.compile_cache import CompileCache
    from rayimg.render.multi_lora import AdapterSlots, SlotConfig
    from rayimg.storage import Storage

    pipe = build_tiny_sd(0)
    pipe.unet.compile(dynamic=False)  # lazy: nothing compiles without a call
    plain = pipe.unet._compiled_call_impl
    aot.install(pipe.unet, CompileCache(Storage(), str(tmp_path), lambda shape: {"shape": shape}), None)
    assert aot.installed(pipe.unet) and pipe.unet._compiled_call_impl is not plain
    AdapterSlots(pipe, SlotConfig(num_slots=2, max_rank=4, max_batch=1, max_adapters=1))
    assert not aot.installed(pipe.unet) and pipe.unet._compiled_call_impl is plain
