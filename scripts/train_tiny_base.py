"""Train the project's tiny base model (``rayimg-tiny-shapes``) from scratch, on a CPU.

    python scripts/train_tiny_base.py --config scripts/train_tiny_base.yaml [field=value ...]
    python scripts/train_tiny_base.py --phase denoiser   # reuse the trained VAE in <out_dir>/vae

Phase 1 trains the VAE on synthetic shape pictures (rayimg.demo.shapes), phase 2 the UNet and
text encoder on the VAE's latents; the pipeline is saved in diffusers format (float16
safetensors) to ``<out_dir>/model`` and its prompt adherence measured with the judge. Copy it
to rayimg/models/pretrained/rayimg-tiny-shapes to ship it. See docs/DEMO_MODEL.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rayimg.configbase import load, to_dict  # noqa: E402
from rayimg.demo import base_model as bm  # noqa: E402
from rayimg.demo.shapes import write_imagefolder  # noqa: E402
from rayimg.models.tiny import load_tokenizer  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.0f}s] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).with_suffix(".yaml")))
    ap.add_argument("--phase", choices=("all", "vae", "denoiser"), default="all")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="save and judge the model every N denoiser steps")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    job = load(bm.BaseModelJob, args.config, args.overrides)
    torch.set_num_threads(job.threads)
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(job), indent=2))
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}

    data_dir = out / "data"
    if not (data_dir / "metadata.jsonl").is_file() or sum(1 for _ in open(data_dir / "metadata.jsonl")) != job.num_images:
        log(f"writing {job.num_images} synthetic pictures to {data_dir}")
        write_imagefolder(data_dir, job.num_images, job.data_seed)
    pixels, captions = bm.load_pixels(data_dir)
    log(f"read {len(pixels)} pictures through rayimg's ImageFolder reader")

    tokenizer = load_tokenizer()
    if args.phase in ("all", "vae"):
        torch.manual_seed(job.seed)
        vae = bm.build_vae(job.vae)
        log(f"phase 1: VAE, {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters")
        t = time.perf_counter()
        bm.train_vae(vae, pixels[: job.vae_images], job.vae_train, seed=job.seed, log=log)
        times["vae_s"] = round(time.perf_counter() - t)
        vae.save_pretrained(out / "vae", safe_serialization=True)
        (out / "times.json").write_text(json.dumps(times))
        if args.phase == "vae":
            return 0

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    t = time.perf_counter()
    latents = bm.encode_latents(vae, pixels)
    factor = bm.set_scaling_factor(vae, latents)
    latents = latents * factor
    log(f"encoded {len(latents)} latents {tuple(latents.shape[1:])} in {time.perf_counter() - t:.0f}s; scaling_factor {factor:.4f}")

    torch.manual_seed(job.seed + 1)
    text_encoder = bm.build_text_encoder(job.text_encoder, tokenizer)
    unet = bm.build_unet(job.unet, latents.shape[-1], latents.shape[1], job.text_encoder.hidden_size)
    pipe = bm.build_pipeline(vae, text_encoder, tokenizer, unet)
    log(f"phase 2: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M + text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M parameters")

    def checkpoint(step: int) -> None:
        path = bm.save_pipeline(pipe, out / f"model-step{step}")
        log(f"checkpoint {path}")
        report(path, step)

    t = time.perf_counter()
    bm.train_denoiser(pipe, latents, captions, job.denoiser_train, seed=job.seed, log=log,
                      checkpoint=checkpoint if args.checkpoint_every else None, checkpoint_every=args.checkpoint_every)
    times["denoiser_s"] = round(time.perf_counter() - t)
    (out / "times.json").write_text(json.dumps(times))
    path = bm.save_pipeline(pipe, out / "model")
    log(f"saved {path} (training: VAE {times.get('vae_s', '?')}s, UNet + text encoder {times['denoiser_s']}s)")
    report(path, job.denoiser_train.steps)
    return 0


def report(model_dir: Path, step: int) -> None:
    from rayimg.demo.adherence import measure_adherence

    result = measure_adherence(str(model_dir))
    log(f"adherence at step {step}: colour {result['color_accuracy']:.1%}, shape {result['shape_accuracy']:.1%} "
        f"over {result['count']} renders")
    (Path(model_dir) / "adherence.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
