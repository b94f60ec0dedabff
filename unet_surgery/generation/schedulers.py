"""``--scheduler NAME``: a diffusers sampler made from the pipeline's own scheduler config."""

from __future__ import annotations

from typing import Any

# Short name -> (diffusers class, extra config). The pipeline's config (betas, timestep spacing,
# prediction type) is kept; only the sampling rule changes.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace ``pipe.scheduler`` by the ``name`` sampler built from its config."""
    import diffusers

    class_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)
