"""Prepare throughput on a GPU: JPEG files -> real Ray Data pipeline -> SDXL-size VAE latents.

Builds an SDXL-family model dir whose VAE (and text encoders) have the published SDXL sizes
(random init; cost per image equals the real model's) with a tiny UNet, which prepare never
runs. Writes N random 1024x1024 JPEGs, runs `rayimg prepare` on them (bf16, one GPU actor) and,
in the same process, times the reference: the bare VAE encode loop at the same batch size.

    python bench/prepare_bench.py --images 640 --batch 16 [--text]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_jpeg(args):
    path, seed, size = args
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(size // 16, size // 16, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((size, size), Image.BICUBIC)
    d = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 20, size // 5))
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img.save(path, format="JPEG", quality=92)
    return path


def build_model_dir(root: Path) -> Path:
    import torch
    from diffusers import StableDiffusionXLPipeline

    from rayimg.models.real_size import build_sdxl_text_encoders, build_sdxl_vae
    from rayimg.models.tiny import build_tiny_sdxl

    tiny = build_tiny_sdxl(seed=0)
    te1, te2 = build_sdxl_text_encoders(dtype=torch.bfloat16, device="cuda")
    vae = build_sdxl_vae(dtype=torch.bfloat16, device="cuda")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(Path(__file__).resolve().parents[1] / "rayimg/models/tokenizer"))
    # Real-size text encoders use the real 49,408-token vocabulary; the repo tokenizer's ids fit in it.
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tiny.tokenizer_2,
                                     unet=tiny.unet.to(torch.bfloat16), scheduler=tiny.scheduler)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def reference_vae(model_dir: Path, batch: int, iters: int) -> float:
    """Images/s of the bare VAE encode (bf16) at 1024x1024: the ceiling prepare works toward."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch.bfloat16).cuda().eval()
    x = torch.randn(batch, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            vae.encode(x).latent_dist.mean
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            vae.encode(x).latent_dist.mean
        torch.cuda.synchronize()
    del vae
    torch.cuda.empty_cache()
    return batch * iters / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--text", action="store_true", help="also cache text embeddings")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import ray
    import torch

    from rayimg.config import PrepareJob, from_dict
    from rayimg.run.prepare import run as prepare

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rayimg-bench-"))
    t = time.perf_counter()
    model_dir = build_model_dir(work / "sdxl-vae-model")
    print(f"model dir built in {time.perf_counter() - t:.1f}s", flush=True)
    data = work / "jpegs"
    data.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    jobs = [(str(data / f"{i:06d}.jpg"), i, 1024) for i in range(args.images)]
    with ProcessPoolExecutor(max(1, (os.cpu_count() or 2) - 1)) as pool:
        list(pool.map(make_jpeg, jobs, chunksize=16))
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": Path(p).name, "text": f"a photo number {i}"}) + "\n"
                                                 for p, i, _ in jobs))
    print(f"{args.images} JPEGs written in {time.perf_counter() - t:.1f}s", flush=True)

    ref = reference_vae(model_dir, args.batch, iters=6)
    print(f"reference: bare VAE encode {ref:.1f} images/s (batch {args.batch}, bf16, 1024^2)", flush=True)

    ray.init(num_gpus=1, include_dashboard=False)
    cfg = from_dict(PrepareJob, {
        "model": {"pretrained": str(model_dir), "dtype": "bfloat16", "device": "cuda"},
        "data": {"source": str(data), "min_size": 512},
        "transforms": {"resolution": 1024},
        "cache": {"output": str(work / "cache"), "batch_size": args.batch, "shard_size": 64, "concurrency": 1,
                  "num_gpus_per_actor": 1.0, "cache_text_embeddings": args.text},
    })
    t = time.perf_counter()
    report = prepare(cfg)
    total = time.perf_counter() - t
    rate = report["items"] / total
    result = {
        "images": report["items"], "seconds": round(total, 2), "images_per_s_end_to_end": round(rate, 2),
        "images_per_s_steady": report.get("steady_items_per_s"),
        "reference_vae_images_per_s": round(ref, 2), "ratio_steady_vs_bare_vae": round((report.get("steady_items_per_s") or 0) / ref, 3),
        "batch": args.batch, "text_embeddings": args.text, "gpu": torch.cuda.get_device_name(0),
    }
    print("RESULT " + json.dumps(result), flush=True)
    Path(args.out, "prepare_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
