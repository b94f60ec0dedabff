"""The work list of a generation run: every (prompt, seed) pair, its file name, and the prompts file.

The list is ordered prompt-major (all seeds of prompt 0, then prompt 1, ...). A job's file name
depends only on its prompt index and seed, and each image is drawn from its own seed, so how the
list is split between processes cannot change any file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from unet_surgery.core.limits import MAX_SIDE
from unet_surgery.errors import SurgeryError
from unet_surgery.io import excerpt, read_bounded_text, shown_value

MAX_PROMPT_FILE_BYTES = 16 << 20
MAX_IMAGES = 1_000_000  # prompts x seeds of one run: a million PNGs is already days of GPU time


class GenerationError(SurgeryError):
    """Bad input to ``generate``: the message names the argument (one line, exit 2 on the CLI)."""


@dataclass(frozen=True)
class Job:
    """One image: the prompt's index in the list, the prompt and the seed."""

    prompt_index: int
    prompt: str
    seed: int

    @property
    def file_name(self) -> str:
        """``p0003-s000042.png``: sorts in job order, never depends on the process that wrote it."""
        return f"p{self.prompt_index:04d}-s{self.seed:06d}.png"


def make_jobs(prompts: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """Every prompt with every seed, prompt-major."""
    if not prompts:
        raise GenerationError("no prompt given (--prompt TEXT or --prompts FILE)")
    if not seeds:
        raise GenerationError("--seed: no seed given")
    if len(prompts) * len(seeds) > MAX_IMAGES:  # checked before the list is built
        raise GenerationError(
            f"{len(prompts)} prompt(s) x {len(seeds)} seed(s) is {len(prompts) * len(seeds)} images, more than "
            f"{MAX_IMAGES} in one run; split the prompts or seeds between runs"
        )
    if len(set(seeds)) != len(seeds):
        raise GenerationError(f"--seed: seeds repeat ({excerpt(', '.join(map(str, seeds[:20])))}); each names one file")
    return [Job(i, p, s) for i, p in enumerate(prompts) for s in seeds]


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value
_RANGE = re.compile(r"^([0-9]{1,19})-([0-9]{1,19})$")


def parse_seeds(spec: str | int | Iterable[int]) -> list[int]:
    """Seeds from ``42``, ``0,5,9``, ``0-7`` (inclusive) or a mix (``1,4-6``), or a list of ints."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        items: list[int] = [spec]
    elif isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",")):
            match = _RANGE.match(part)
            if match:
                lo, hi = int(match[1]), int(match[2])
                if hi < lo or hi - lo >= MAX_IMAGES:
                    raise GenerationError(f"--seed: range {part!r} must go upwards and hold at most a million seeds")
                if len(items) + hi - lo + 1 > MAX_IMAGES:  # many ranges, each under the bound
                    raise GenerationError(f"--seed: {excerpt(spec)} holds more than a million seeds")
                items.extend(range(lo, hi + 1))
            elif re.fullmatch(r"[0-9]{1,19}", part):
                items.append(int(part))
            else:
                raise GenerationError(f"--seed: {excerpt(part)} is not a seed (use 42, 0,5,9 or 0-7)")
    elif isinstance(spec, bool):
        raise GenerationError(f"--seed: {spec!r} is not a seed")
    else:
        items = list(spec)
    for seed in items:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            shown = "an integer out of range" if isinstance(seed, int) else excerpt(repr(seed))
            raise GenerationError(f"--seed: {shown} is not a seed between 0 and 2**63-1")
    return items


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines and lines starting with ``#`` are skipped."""
    file = Path(path)
    text = read_bounded_text(file, MAX_PROMPT_FILE_BYTES, GenerationError, prefix="--prompts: ", encoding="utf-8-sig")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise GenerationError(f"--prompts: {file} holds no prompt (one a line; # starts a comment)")
    return prompts




def parse_size(spec: str | int | tuple[int, int], multiple: int = 8) -> tuple[int, int]:
    """``(width, height)`` from a ``WIDTHxHEIGHT`` string, ``N`` (square) or a ``(height, width)`` pair.

    Strings are width first (``--size 1024x768``, as A1111 and the diffusers scripts write
    them), Python pairs height first (as ``pipe(height=, width=)`` and tensor shapes); both
    sides a positive multiple of ``multiple``.
    """
    if isinstance(spec, str):
        parts = spec.lower().split("x")
        if len(parts) not in (1, 2) or not all(re.fullmatch(r"[0-9]{1,6}", p.strip()) for p in parts):
            raise GenerationError(f"--size: {excerpt(spec)} is not WIDTHxHEIGHT (e.g. 1024x768) or a single side")
        values = [int(p) for p in parts]
    elif isinstance(spec, bool):
        raise GenerationError(f"--size: {spec} is not a size")
    elif isinstance(spec, int):
        values = [spec]
    else:
        values = list(spec)[::-1]  # (height, width) -> [width, height]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise GenerationError(f"--size: {shown_value(spec)} must be two positive integers, WIDTHxHEIGHT")
    if max(values) > MAX_SIDE:
        raise GenerationError(f"--size: {shown_value(spec)} has a side over {MAX_SIDE} pixels")
    for side, v in zip(("width", "height"), values, strict=True):
        if v % multiple:
            raise GenerationError(
                f"--size: {side} {v} is not a multiple of {multiple} (the VAE's scale factor); "
                f"try {max(multiple, round(v / multiple) * multiple)}"
            )
    return values[0], values[1]
