"""Schedulers by name, built from the pipeline's own scheduler config."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

# name -> (class, extra config)
SCHEDULER_TABLE = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}


def make_scheduler(name: str, base_config):
    """A fresh scheduler ``name`` sharing the noise schedule of ``base_config``."""
    if name not in SCHEDULER_TABLE:
        raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULER_TABLE)}")
    cls, extra = SCHEDULER_TABLE[name]
    extra = dict(extra)
    if name == "ddim" and "clip_sample" not in base_config:
        # DDIM's class default clips the predicted x0 to [-1, 1], which is for pixel-space models;
        # latents are not bounded so (SD's own DDIM/PNDM configs say clip_sample: false). A config
        # from another scheduler (Euler, say) lacks the key: keep latent diffusion unclipped.
        extra["clip_sample"] = False
    return cls.from_config(base_config, **extra)
