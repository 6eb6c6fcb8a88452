"""`rayimg demo`: the embedded default — a local Ray cluster, the project's tiny model, real renders."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from rayimg.cluster import connect
from rayimg.config import DemoJob
from rayimg.storage import Storage, join


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def run(cfg: DemoJob) -> dict:
    import ray

    from rayimg.models.loader import resolve_model_dir
    from rayimg.render.engine import GenerationRequest
    from rayimg.render.renderer import Renderer

    t0 = time.perf_counter()
    storage = Storage()

    def say(msg: str) -> None:
        print(f"[demo {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    say("starting Ray" if not (cfg.cluster.address) else f"connecting to Ray at {cfg.cluster.address}")
    mode = connect(cfg.cluster)
    say(f"Ray ready ({mode} cluster)")
    model_dir = resolve_model_dir(cfg.model)  # builds the tiny model once, then it is a plain diffusers dir
    say(f"base model: {cfg.model.pretrained} -> {model_dir}")
    model_cfg = type(cfg.model)(**{**cfg.model.__dict__, "pretrained": str(model_dir)})

    gen = cfg.generation
    requests = [
        GenerationRequest(prompt=p, negative_prompt=gen.negative_prompt, steps=gen.steps, guidance_scale=gen.guidance_scale,
                          width=gen.width, height=gen.height, scheduler=gen.scheduler, seed=gen.seed + i)
        for i, p in enumerate(cfg.prompts)
    ]

    @ray.remote(num_cpus=1)
    def render(model_cfg, batch):
        return Renderer(model_cfg).render(batch)

    say(f"rendering {len(requests)} prompt(s) on Ray ({gen.width}x{gen.height}, {gen.steps} steps, {gen.scheduler})")
    results = ray.get(render.remote(model_cfg, requests))
    written = []
    manifest = []
    for request, image in zip(requests, results):
        uri = join(cfg.output_dir, "images", f"{_slug(request.prompt)}-{image.key[:12]}.png")
        storage.write_bytes(uri, image.png)
        written.append(uri)
        manifest.append({"path": uri, "key": image.key, "seconds": round(image.seconds, 3), **image.params})
        say(f"wrote {uri}")
    storage.write_text(join(cfg.output_dir, "manifest.jsonl"), "".join(json.dumps(m) + "\n" for m in manifest))
    say(f"done: {len(written)} image(s) in {Path(str(cfg.output_dir)).resolve() if '://' not in cfg.output_dir else cfg.output_dir}")
    return {"images": written, "seconds": time.perf_counter() - t0}
