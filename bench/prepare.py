"""Prepare headline: `rayimg prepare` (the Ray Data job, `rayimg.run.prepare.run`) on random
1024² JPEGs against the bare VAE encode loop at the same batch size, in the same process.

The model dir has the published SDXL VAE and text encoders (random init; cost per image equals
the real model's) and a tiny UNet, which prepare never runs. The figure is the job's steady
rate (from its first encoded batch to the end: actor start and model load excluded), the
reference `vae.encode(x).latent_dist.mean` on a resident batch (no data loading).

    python bench/prepare.py                 # GPU: 1,200 images at 1024², batch 16 (~2-3 min on an H100)
    python bench/prepare.py --smoke         # CPU: the tiny SDXL, 48 images at 64² (~20 s)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common


def build_vae_model_dir(root: Path, device: str) -> Path:
    """Real-size VAE + text encoders, tiny UNet, saved with ``save_pretrained``."""
    if (root / "model_index.json").is_file():
        return root
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from sdxl_random import build_sdxl_text_encoders, build_sdxl_vae
    from rayimg.models.tiny import build_tiny_sdxl

    tiny = build_tiny_sdxl(seed=0)
    te1, te2 = build_sdxl_text_encoders(dtype=torch.bfloat16, device=device)
    vae = build_sdxl_vae(dtype=torch.bfloat16, device=device)
    # the real-size text encoders have the real 49,408-token vocabulary; the repo tokenizer's ids fit in it
    tok = CLIPTokenizer.from_pretrained(str(common.ROOT / "rayimg/models/tokenizer"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tiny.tokenizer_2,
                                     unet=tiny.unet.to(torch.bfloat16), scheduler=tiny.scheduler)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def reference_vae(model_dir: Path, batch: int, resolution: int, iters: int, device: str, dtype: str) -> dict:
    """Images/s of the bare VAE encode at ``resolution``²: the ceiling prepare works toward."""
    import torch
    from diffusers import AutoencoderKL

    torch_dtype = getattr(torch, dtype)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch_dtype).to(device).eval()
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=torch_dtype)
    with torch.no_grad():
        m = common.measure(lambda: vae.encode(x).latent_dist.mean, warmup=2, calls=iters, device=device, items_per_call=batch)
    del vae
    if common.is_cuda(device):
        torch.cuda.empty_cache()
    return m


def prepare_job(model_dir: Path, data_dir: Path, cache_dir: Path, *, batch: int, resolution: int, device: str, dtype: str,
                text: bool, shard_size: int = 64):
    """The PrepareJob a user would write for this data (one encoder actor, one GPU)."""
    from rayimg.config import PrepareJob, from_dict

    gpu = common.is_cuda(device)
    return from_dict(PrepareJob, {
        "model": {"pretrained": str(model_dir), "dtype": dtype, "device": "cuda" if gpu else "cpu"},
        "data": {"source": str(data_dir), "min_size": min(512, resolution)},
        "transforms": {"resolution": resolution},
        "cache": {"output": str(cache_dir), "batch_size": batch, "shard_size": shard_size, "concurrency": 1,
                  "num_gpus_per_actor": 1.0 if gpu else 0.0, "cache_text_embeddings": text},
        "cluster": {"num_gpus": 1 if gpu else 0, "num_cpus": None if gpu else 2},
    })


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny SDXL, small images: checks the code path, numbers meaningless")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--text", action="store_true", help="also cache text embeddings")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write this headline's JSON here")
    args = ap.parse_args(argv)
    smoke = args.smoke
    device, dtype = ("cpu", "float32") if smoke else ("cuda", "bfloat16")
    images = args.images or (48 if smoke else 1200)
    batch = args.batch or (8 if smoke else 16)
    resolution = args.resolution or (64 if smoke else 1024)
    t0 = time.perf_counter()
    env = common.device_info(device)

    import ray

    from rayimg.run.prepare import run as prepare

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rayimg-bench-prepare-"))
    t = time.perf_counter()
    if smoke:
        model_dir = common.save_sdxl_dir(work / "model", tiny=True)
    else:
        model_dir = build_vae_model_dir(work / "model", device)
    data = common.write_image_folder(work / f"jpegs-{resolution}", images, resolution)
    common.log("prepare", f"model dir and {images} JPEGs ready in {time.perf_counter() - t:.1f}s")

    ref = reference_vae(model_dir, batch, resolution, iters=3 if smoke else 6, device=device, dtype=dtype)
    common.log("prepare", f"reference: bare VAE encode {ref['items_per_s']:.2f} images/s (batch {batch}, {dtype}, {resolution}²)")

    job = prepare_job(model_dir, data, work / "cache", batch=batch, resolution=resolution, device=device, dtype=dtype, text=args.text,
                      shard_size=8 if smoke else 64)
    t = time.perf_counter()
    with common.GpuSampler() as gpu:
        report = prepare(job)
    total = time.perf_counter() - t
    ray.shutdown()
    steady = report.get("steady_items_per_s")
    details = {"images": report["items"], "job_seconds": round(total, 2), "images_per_s_end_to_end": round(report["items"] / total, 3),
               "batch": batch, "resolution": resolution, "dtype": dtype, "text_embeddings": args.text, "reference_measure": ref,
               "gpu_samples": gpu.summary()}
    result = common.headline(
        "prepare", figure=steady, unit="images/s", what=f"`rayimg prepare` steady rate, {resolution}² JPEGs -> SDXL latents, batch {batch}, 1 encoder",
        reference=ref["items_per_s"], reference_what=f"bare VAE encode loop, batch {batch}, resident tensors",
        device=env, command=common.command_line(), seconds=time.perf_counter() - t0, details=details)
    common.report(result, args.json)
    return result


if __name__ == "__main__":
    main()
