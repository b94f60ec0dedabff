"""Image generation with recipes on SD/SDXL pipeline folders, one process or many (``accelerate``).

:func:`generate` is the Python API of ``unet-surgery generate``; see ``docs/generate.md``.
"""

from unet_surgery.generation.jobs import (
    GenerationError,
    Job,
    make_jobs,
    parse_seeds,
    parse_size,
    read_prompts,
)
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
