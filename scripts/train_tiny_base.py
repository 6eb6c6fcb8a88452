"""Train the project's tiny base model (``rayimg-tiny-shapes``) from scratch, on a CPU.

    python scripts/train_tiny_base.py --config scripts/train_tiny_base.yaml [field=value ...]
    python scripts/train_tiny_base.py --phase denoiser   # reuse the trained VAE in <out_dir>/vae
    python scripts/train_tiny_base.py --phase continue --device cuda continue_from=rayimg-tiny-shapes \
        continue_train.batch_size=512 continue_train.max_seconds=200   # more steps from the committed model, on a GPU
    python scripts/train_tiny_base.py --phase continue --install out_dir=DIR   # ship DIR/model (adherence re-measured here)

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
from scripts.tiny_base import base_model as bm  # noqa: E402
from rayimg.demo.shapes import write_imagefolder  # noqa: E402
from rayimg.models.tiny import load_tokenizer  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.0f}s] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).with_suffix(".yaml")))
    ap.add_argument("--phase", choices=("all", "vae", "denoiser", "decoder", "assemble", "continue"), default="all",
                    help="vae: phase 1; denoiser: phase 2; decoder: phase 2b, the VAE decoder alone (may run beside "
                         "phase 2; writes <out_dir>/vae-decoder); assemble: put the fine-tuned decoder into <out_dir>/model")
    ap.add_argument("--checkpoint-every", type=int, default=0, help="save and judge the model every N denoiser steps")
    ap.add_argument("--install", action="store_true", help="copy the result to rayimg/models/pretrained/rayimg-tiny-shapes "
                    "(with --phase continue and continue_train.steps=0: measure and install <out_dir>/model as it is)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="shorthand for the override device=...")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    job = load(bm.BaseModelJob, args.config, args.overrides + ([f"device={args.device}"] if args.device else []))
    torch.set_num_threads(job.threads)
    if job.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(job), indent=2))
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}

    if args.phase == "continue" and job.continue_train.steps == 0:  # measure and install only
        return continue_denoiser(job, out, None, None, args.install)
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

    if args.phase == "decoder":
        vae = AutoencoderKL.from_pretrained(out / "vae").eval()
        log(f"phase 2b: VAE decoder, {job.decoder_train.steps} steps")
        t = time.perf_counter()
        bm.finetune_decoder(vae, pixels[: job.vae_images], job.decoder_train, seed=job.seed + 2, log=log)
        vae.save_pretrained(out / "vae-decoder", safe_serialization=True)
        times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}
        times["decoder_s"] = round(time.perf_counter() - t)
        (out / "times.json").write_text(json.dumps(times))
        return 0
    if args.phase == "assemble":
        return assemble(job, out, args.install)
    if args.phase == "continue":
        return continue_denoiser(job, out, pixels, captions, args.install)

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
                      checkpoint=checkpoint if args.checkpoint_every else None, checkpoint_every=args.checkpoint_every,
                      device=job.device)
    times["denoiser_s"] = round(time.perf_counter() - t)
    (out / "times.json").write_text(json.dumps(times))
    path = bm.save_pipeline(pipe, out / "model")
    log(f"saved {path} (training: VAE {times.get('vae_s', '?')}s, UNet + text encoder {times['denoiser_s']}s)")
    if (out / "vae-decoder").is_dir():
        return assemble(job, out, args.install)
    return finish(job, out, path, times, args.install)


def continue_denoiser(job, out: Path, pixels, captions, install: bool) -> int:
    """Phase 2c: more UNet + text-encoder steps (``continue_train``) from <out_dir>/model, on the
    first ``continue_images`` pictures; the fine-tuned decoder goes in first when there is one."""
    import shutil

    from diffusers import StableDiffusionPipeline

    from rayimg.config import ModelConfig
    from rayimg.models.loader import resolve_model_dir

    path = out / "model"
    if job.continue_from:
        source = resolve_model_dir(ModelConfig(pretrained=job.continue_from))
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(source, path)
        log(f"phase 2c starts from {source}")
    elif (out / "vae-decoder").is_dir():
        assemble(job, out, install=False, measure=False)
    if not (path / "model_index.json").is_file():
        raise SystemExit(f"continue: no model in {path}; run the earlier phases or set continue_from=rayimg-tiny-shapes")
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").is_file() else {}
    if job.continue_from and (path / "training.json").is_file():  # carry the earlier phases' record on
        times = json.loads((path / "training.json").read_text()).get("times_s", {})
        (out / "times.json").write_text(json.dumps(times))
    if job.continue_train.steps == 0:  # the model as it is, with the record of the run that trained it
        recorded = json.loads((path / "training.json").read_text()) if (path / "training.json").is_file() else {}
        return finish(job, out, path, times, install, config=recorded.get("config"))
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    pipe.to(job.device)
    n = job.continue_images
    t = time.perf_counter()
    latents = bm.encode_latents(pipe.vae, pixels[:n]) * pipe.vae.config.scaling_factor
    log(f"phase 2c: up to {job.continue_train.steps} more steps of batch {job.continue_train.batch_size} on {n} pictures' "
        f"latents, on {job.device} (encoded in {time.perf_counter() - t:.0f}s)")
    t = time.perf_counter()
    bm.train_denoiser(pipe, latents, captions[:n], job.continue_train, seed=job.seed + 3, log=log, device=job.device)
    times["continue_s"] = times.get("continue_s", 0) + round(time.perf_counter() - t)
    times.setdefault("continue_runs", []).append({"device": job.device, "max_steps": job.continue_train.steps,
                                                  "batch_size": job.continue_train.batch_size, "seconds": round(time.perf_counter() - t)})
    (out / "times.json").write_text(json.dumps(times))
    bm.save_pipeline(pipe.to("cpu"), path)
    return finish(job, out, path, times, install)


def assemble(job, out: Path, install: bool, measure: bool = True) -> int:
    """<out_dir>/model with the decoder of <out_dir>/vae-decoder (same encoder, same latents)."""
    from diffusers import AutoencoderKL

    path = out / "model"
    vae = AutoencoderKL.from_pretrained(path / "vae")
    tuned = AutoencoderKL.from_pretrained(out / "vae-decoder")
    for a, b in zip(vae.encoder.state_dict().values(), tuned.encoder.state_dict().values()):
        if not torch.equal(a.float(), b.half().float()):  # the model dir holds float16 weights
            raise SystemExit("assemble: vae-decoder has another encoder than the model's VAE; retrain phase 2b from <out_dir>/vae")
    vae.decoder.load_state_dict(tuned.decoder.state_dict())
    vae.post_quant_conv.load_state_dict(tuned.post_quant_conv.state_dict())
    vae.to(torch.float16).save_pretrained(path / "vae", safe_serialization=True)
    times = json.loads((out / "times.json").read_text())
    log(f"assembled {path} with the fine-tuned decoder of {out / 'vae-decoder'}")
    return finish(job, out, path, times, install) if measure else 0


def finish(job, out: Path, path: Path, times: dict, install: bool, config: dict | None = None) -> int:
    factor = json.loads((path / "vae" / "config.json").read_text())["scaling_factor"]
    adherence = report(path)
    import diffusers
    import transformers

    record = {"config": config or to_dict(job), "times_s": times, "threads": job.threads, "scaling_factor": factor,
              "adherence": {k: v for k, v in adherence.items() if k != "rows"},
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}}
    (path / "training.json").write_text(json.dumps(record, indent=2))
    if install:
        import shutil

        from rayimg.models.tiny import PRETRAINED_MODELS

        target = PRETRAINED_MODELS["rayimg-tiny-shapes"]
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(path, target)
        log(f"installed as rayimg-tiny-shapes: {target}")
    return 0


def report(model_dir: Path, step: int | None = None) -> dict:
    from scripts.tiny_base.adherence import measure_adherence

    result = measure_adherence(str(model_dir))
    log(f"adherence {f'at step {step}' if step is not None else f'of {model_dir}'}: colour {result['color_accuracy']:.1%}, shape {result['shape_accuracy']:.1%} "
        f"over {result['count']} renders")
    rows = [{k: v for k, v in r.items() if k != "image"} for r in result["rows"]]
    (Path(model_dir) / "adherence.json").write_text(json.dumps({**result, "rows": rows}, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main())
