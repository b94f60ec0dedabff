"""Image generation with recipes on SD/SDXL pipeline folders, one process or many (``accelerate``).

:func:`generate` is the Python API of ``unet-surgery generate``; see ``docs/generate.md``. The
names load on first use, so the command line's ``--help`` imports no torch.
"""

from typing import TYPE_CHECKING, Any

from unet_surgery.generation.jobs import (
    GenerationError,
    Job,
    make_jobs,
    parse_seeds,
    parse_size,
    read_prompts,
)

if TYPE_CHECKING:
    from unet_surgery.generation.run import MANIFEST, GenerateResult, generate

__all__ = [
    "MANIFEST",
    "GenerateResult",
    "GenerationError",
    "Job",
    "generate",
    "make_jobs",
    "parse_seeds",
    "parse_size",
    "read_prompts",
]


def __getattr__(name: str) -> Any:
    if name in ("MANIFEST", "GenerateResult", "generate"):
        from unet_surgery.generation import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
