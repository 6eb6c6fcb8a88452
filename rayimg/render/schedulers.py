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
    return cls.from_config(base_config, **extra)
