"""`rayimg prepare|train|render|serve|demo --config FILE [section.field=value ...]`.

The job's config is loaded and validated, and its model, inputs and devices checked
(:mod:`rayimg.run.preflight`), before any Ray work starts; a bad value exits with code 2 and one
line ``error: <field>: <problem>`` on stderr. A job that fails inside Ray workers exits 1 with one
line naming the root cause. Jobs run on the cluster at RAY_ADDRESS (or ``cluster.address``),
else on a local Ray cluster started in-process.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import yaml

from rayimg.config import JOBS, ConfigError, describe, load_job, to_dict

SUMMARIES = {
    "prepare": "stream a captioned dataset, clean it and cache VAE latents / text embeddings",
    "train": "train a LoRA, DreamBooth, textual-inversion or full fine-tune on Ray Train",
    "render": "bulk-render a prompt catalog with Ray Data (resumable)",
    "serve": "serve the model and its LoRA adapters over HTTP with Ray Serve",
    "demo": "run the whole flow on the project's tiny model, on a laptop CPU",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayimg",
        description="Distributed batch trainer and renderer for text-to-image diffusion models, built on Ray.",
        epilog="Override any config field on the command line: rayimg train --config jobs/configs/sdxl_lora.yaml train.learning_rate=5e-5",
    )
    sub = parser.add_subparsers(dest="job", metavar="{" + ",".join(JOBS) + "}", required=True)
    for job in JOBS:
        p = sub.add_parser(job, help=SUMMARIES[job], description=SUMMARIES[job])
        p.add_argument("--config", "-c", help="job config YAML (see jobs/configs/)")
        p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
        p.add_argument("--help-config", action="store_true", help="list every config field with its type, default and meaning")
        p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    return parser


def run_job(job: str, cfg):
    """Check, then run a validated job config (imports the job's Ray wiring only now:
    ``rayimg.run.<job>``, or the Ray Serve app in ``serving/`` for ``serve``)."""
    from rayimg.run import preflight
    from rayimg.run.failures import hide_ray_data_traces

    preflight.check(job, cfg)
    name = "serving.app" if job == "serve" else f"rayimg.run.{job}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise SystemExit(f"error: `rayimg {job}` is not available in this version of rayimg yet") from None
    hide_ray_data_traces()
    return module.run(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.help_config:
        print("\n".join(describe(JOBS[args.job])))
        return 0
    try:
        cfg = load_job(args.job, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # a caller's Ray stays up
    try:
        run_job(args.job, cfg)
    except ConfigError as e:  # raised by checks that need the data or the model (e.g. a missing dataset)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from rayimg.run.failures import disconnect, failure

        reported = failure(e)
        if reported is None:
            raise
        line, code = reported
        if not ray_was_up:
            disconnect()
        print(f"error: {line}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
