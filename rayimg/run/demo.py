"""`rayimg demo`: the whole product on a laptop CPU, on the project's trained tiny shapes model.

1. start (or join) a Ray cluster;
2. generate a DreamBooth-style set of a concept the base model never saw (a cross), its captions
   naming it by a trigger token ("a red sks on a white background"), mixed with pictures of the
   base model's own shapes under their own names (prior preservation);
3. prepare it (Ray Data: the latent + text-embedding cache);
4. train a LoRA on it (Ray Train) and publish it to a local adapter registry;
5. render a catalog (Ray Data) of prompts with and without the adapter;
6. start the Serve app and make one HTTP request with the adapter;
7. judge every render (rayimg.demo.judge) and write a labelled contact sheet.

Everything lands under ``output_dir``; ``summary.json`` says where.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.request
from pathlib import Path

from rayimg.config import (
    CacheConfig, CatalogConfig, CheckpointConfig, DataConfig, DemoJob, PrepareJob, PublishConfig, RenderJob,
    RenderOutputConfig, ScalingConfig, TrainJob, TransformConfig, absolute_paths,
)


def _stage(say, title: str):
    say(f"== {title}")


def run(cfg: DemoJob) -> dict:
    import ray
    from PIL import Image

    from rayimg.run.cluster import connect
    from rayimg.demo.contact_sheet import contact_sheet
    from rayimg.demo.judge import judge
    from rayimg.demo.shapes import BASE_SHAPES, dataset_specs, write_imagefolder
    from rayimg.models.loader import resolve_model_dir
    from rayimg.run import prepare as prepare_job
    from rayimg.run import render as render_job
    from rayimg.run import train as train_job

    t0 = time.perf_counter()
    cfg = absolute_paths(cfg)
    out = Path(cfg.output_dir)
    if "://" in cfg.output_dir:
        raise SystemExit("error: output_dir: the demo writes to a local dir (it opens the images it renders)")
    timings: dict[str, float] = {}
    mark = [t0]

    def say(msg: str) -> None:
        print(f"[demo {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - mark[0], 1)
        mark[0] = now

    trigger = cfg.concept.trigger
    _stage(say, "1/7 Ray")
    say("starting a local Ray cluster in this process" if not cfg.cluster.address else f"connecting to Ray at {cfg.cluster.address}")
    # A readable log: no Ray Data progress bars, and the workers' own logs stay in Ray's session
    # dir (the jobs print their progress from this process).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized() and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        ray.init(address="local", num_cpus=cfg.cluster.num_cpus, num_gpus=cfg.cluster.num_gpus, include_dashboard=False,
                 configure_logging=False, log_to_driver=False)
        mode = "local"
    else:
        mode = connect(cfg.cluster)
    model_dir = resolve_model_dir(cfg.model)
    say(f"Ray ready ({mode} cluster); base model {cfg.model.pretrained} ({model_dir})")
    lap("ray")

    _stage(say, "2/7 data")
    data_dir = out / "concept-data"
    backgrounds = tuple(cfg.concept.backgrounds)
    specs = dataset_specs(cfg.concept.num_images, cfg.concept.seed, shapes=(cfg.concept.shape,), backgrounds=backgrounds,
                          radii=tuple(cfg.concept.radii), balanced=cfg.concept.balanced)
    # Prior pictures: the base model's own shapes under their own names, so the LoRA learns what
    # 'sks' is without drawing crosses for every prompt.
    specs += dataset_specs(cfg.concept.num_prior_images, cfg.concept.seed + 1, shapes=BASE_SHAPES, backgrounds=backgrounds)
    write_imagefolder(data_dir, specs=specs, shape_word={cfg.concept.shape: trigger})
    first = json.loads((data_dir / "metadata.jsonl").read_text().splitlines()[0])["text"]
    say(f"wrote {cfg.concept.num_images} pictures of a {cfg.concept.shape} (a shape the base model never saw) to {data_dir}, "
        f"captioned with the trigger '{trigger}', e.g. \"{first}\""
        + (f", and {cfg.concept.num_prior_images} of the base model's own shapes (prior preservation)" if cfg.concept.num_prior_images else ""))
    lap("data")

    _stage(say, "3/7 prepare (Ray Data)")
    cache_dir = out / "cache"
    prepare_job.run(PrepareJob(
        model=cfg.model, cluster=cfg.cluster, data=DataConfig(source=str(data_dir), format="imagefolder"),
        transforms=TransformConfig(resolution=cfg.train.resolution, random_flip=False),
        # A text-encoder LoRA needs the captions, not cached text embeddings.
        cache=CacheConfig(output=str(cache_dir), cache_text_embeddings=not cfg.lora.train_text_encoder, shard_size=64),
    ))
    lap("prepare")

    _stage(say, "4/7 train a LoRA (Ray Train)")
    registry = out / "registry"
    job = TrainJob(
        model=cfg.model, cluster=cfg.cluster, cache=str(cache_dir), train=cfg.train, lora=cfg.lora,
        scaling=ScalingConfig(num_workers=cfg.num_workers, use_gpu=False, cpus_per_worker=1.0),
        checkpoint=CheckpointConfig(storage_path=str(out / "runs"), every_n_steps=cfg.train.max_steps or 1000, num_to_keep=1),
        publish=PublishConfig(registry=str(registry), name=cfg.adapter_name, trigger_word=trigger, kohya=False),
    )
    job.validate()
    trained = train_job.run(job)
    version = trained["version"]
    losses = trained.get("losses") or []
    say(f"published adapter {cfg.adapter_name} version {version} to {trained['uri']} "
        f"(loss {sum(losses[:10]) / max(1, len(losses[:10])):.3f} -> {sum(losses[-10:]) / max(1, len(losses[-10:])):.3f})")
    lap("train")

    _stage(say, "5/7 render a catalog with and without the adapter (Ray Data)")
    prompts = [p.replace("{trigger}", trigger) for p in cfg.prompts]
    gen = cfg.generation
    rows = []
    for i, prompt in enumerate(prompts):
        for seed in cfg.seeds:
            for with_adapter in (False, True):
                rows.append({"id": f"p{i:02d}-s{seed}-{'lora' if with_adapter else 'base'}", "prompt": prompt, "seed": seed,
                             "adapters": [{"name": cfg.adapter_name, "version": version}] if with_adapter else []})
    catalog = out / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    render_dir = out / "render"
    rendered = render_job.run(RenderJob(
        model=cfg.model, cluster=cfg.cluster, registry=str(registry), catalog=CatalogConfig(source=str(catalog)),
        defaults=gen, output=RenderOutputConfig(uri=str(render_dir)),
    ))
    import pyarrow.parquet as pq

    paths = {r["row_id"]: r["path"] for r in pq.read_table(render_dir / "manifest.parquet").to_pylist()}
    missing = [r["id"] for r in rows if r["id"] not in paths]
    if missing:
        raise RuntimeError(f"the render job left rows unrendered: {missing}; see {render_dir}/errors.jsonl")
    say(f"rendered {rendered['images']} image(s) into {render_dir}/images")
    lap("render")

    _stage(say, "6/7 serve (Ray Serve) and one HTTP request")
    served = _serve_one(cfg, registry, version, prompts[0], say) if cfg.serve else {"status": "skipped (serve: false)"}
    lap("serve")

    _stage(say, "7/7 judge and contact sheet")
    results = []
    for r in rows:
        image = Image.open(paths[r["id"]].removeprefix("file://")).convert("RGB")
        verdict = judge(image)
        results.append({**r, "path": paths[r["id"]], "adapter": bool(r["adapters"]), "trigger": trigger in r["prompt"].split(),
                        "judged_color": verdict.color, "judged_shape": verdict.shape, "image": image})
    concept = cfg.concept.shape

    def rate(adapter: bool) -> float | None:
        picked = [r for r in results if r["trigger"] and r["adapter"] == adapter]
        return sum(r["judged_shape"] == concept for r in picked) / len(picked) if picked else None

    with_rate, without_rate = rate(True), rate(False)
    columns = [f"seed {s} {label}" for s in cfg.seeds for label in ("base", "+ LoRA")]
    grid, captions = [], []
    by_id = {r["id"]: r for r in results}
    for i, _prompt in enumerate(prompts):
        cells = [by_id[f"p{i:02d}-s{s}-{label}"] for s in cfg.seeds for label in ("base", "lora")]
        grid.append([c["image"] for c in cells])
        captions.append([f"{c['judged_color']} {c['judged_shape']}" for c in cells])
    if served.get("image") is not None:
        grid.append([served["image"]] + [None] * (len(columns) - 1))
        captions.append([f"{served['judged_color']} {served['judged_shape']}"] + [""] * (len(columns) - 1))
    labels = prompts + (["served over HTTP: " + prompts[0] + " + LoRA"] if served.get("image") is not None else [])
    sheet_path = out / "contact_sheet.png"
    contact_sheet(grid, labels, columns, captions, title=f"rayimg demo: '{trigger}' = {concept} (LoRA {cfg.adapter_name} v{version}); "
                  f"under each picture: what the judge sees").save(sheet_path)
    lap("contact_sheet")

    summary = {
        "output_dir": str(out),
        "contact_sheet": str(sheet_path),
        "dataset": str(data_dir),
        "cache": str(cache_dir),
        "adapter": {"name": cfg.adapter_name, "version": version, "uri": trained["uri"], "trigger": trigger, "concept": concept},
        "render": {"dir": str(render_dir), "manifest": str(render_dir / "manifest.parquet"), "catalog": str(catalog)},
        "concept_rate_with_adapter": with_rate,
        "concept_rate_without_adapter": without_rate,
        "renders": [{k: v for k, v in r.items() if k != "image"} for r in results],
        "serve": {k: v for k, v in served.items() if k != "image"},
        "timings_s": timings,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    say(f"with the trigger '{trigger}': {concept} judged in {_pct(with_rate)} of renders with the LoRA, {_pct(without_rate)} without")
    say(f"contact sheet: {sheet_path}")
    say(f"renders: {render_dir}/images (manifest {render_dir}/manifest.parquet); adapter: {trained['uri']}")
    say(f"serve: {served.get('status')}")
    say(f"done in {summary['seconds']:.0f}s; summary {out / 'summary.json'}")
    return summary


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0%}"


def _serve_one(cfg: DemoJob, registry: Path, version: str, prompt: str, say) -> dict:
    """Start the Serve app (serving.app.start), POST one /v1/generate with the adapter, judge the
    answer, and shut Serve down."""
    from PIL import Image
    from ray import serve

    from rayimg.config import ServeJob
    from rayimg.demo.judge import judge
    from serving.app import start

    job = ServeJob(model=cfg.model, cluster=cfg.cluster, registry=str(registry), defaults=cfg.generation,
                   num_cpus_per_replica=0.5, num_cpus_ingress=0.25, app_name="rayimg-demo")
    job.validate()
    started = time.perf_counter()
    url = start(job)
    say(f"Serve app up at {url} in {time.perf_counter() - started:.0f}s (web page {url}/)")
    body = {"prompt": prompt, "seed": cfg.seeds[0], "adapters": [{"name": cfg.adapter_name, "version": version}]}
    request = urllib.request.Request(f"{url}/v1/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        t = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        seconds = time.perf_counter() - t
        image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0]["b64_json"]))).convert("RGB")
        path = Path(cfg.output_dir) / "served.png"
        image.save(path)
        verdict = judge(image)
        say(f"POST {url}/v1/generate {json.dumps(body)} -> 200 in {seconds:.1f}s, saved {path} (judge: {verdict.color} {verdict.shape})")
        return {"status": f"ok: POST {url}/v1/generate answered in {seconds:.1f}s", "url": url, "request": body, "path": str(path),
                "judged_color": verdict.color, "judged_shape": verdict.shape, "image": image}
    finally:
        serve.shutdown()

