"""A ``[uncond, cond]`` batch turned into more slices and back: the model hooks of guidance passes.

A pipeline batches ``[uncond, cond]`` halves and combines ``uncond + w * (cond - uncond)``. A
pass that runs another branch (noise-damped guidance, FouriScale's guidance) expands that batch
in its pre hook (:func:`split_batch`: the call's branch slices and the expanded inputs) and
folds the UNet's output back to two halves in its post hook (:func:`map_sample`,
:func:`end_split`), so the pipeline's own combination gives the pass's formula.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from unet_surgery.errors import SurgeryError
from unet_surgery.runtime import UNetCall


def expand_halves(value: Any, batch: int, halves: tuple[int, ...]) -> Any:
    """``[h0, h1]`` -> ``cat([h_i for i in halves])`` along dim 0 for every per-sample tensor.

    ``batch`` is the caller's batch (both halves); a tensor whose first dim is not a multiple
    of it (a shared embedding) is left alone. Recurses into dicts (SDXL's added conditioning)
    and lists/tuples (ControlNet residuals, IP-adapter embeddings).
    """
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] % batch or value.shape[0] < 2:
            return value
        half = value.shape[0] // 2
        parts = (value[:half], value[half:])
        return torch.cat([parts[i] for i in halves])
    if isinstance(value, dict):
        return {k: expand_halves(v, batch, halves) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [expand_halves(v, batch, halves) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def map_sample(output: Any, fn: Callable[[torch.Tensor], torch.Tensor], what: str) -> Any:
    """``output`` with its sample (a tensor, the first item of a tuple, or ``.sample``) replaced by ``fn(sample)``."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    if hasattr(output, "sample"):
        output.sample = fn(output.sample)
        return output
    raise SurgeryError(f"cannot apply {what} to a UNet returning {type(output).__name__}")


def split_batch(
    patch: Any, call: UNetCall, args: tuple[Any, ...], kwargs: dict[str, Any],
    layout: tuple[tuple[int, str], ...], what: str,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split ``call``'s ``[uncond, cond]`` batch into ``layout``'s slices; the expanded inputs.

    ``layout`` is ``((half, branch), ...)``, one per slice of the new batch: which half it
    copies (0 uncond, 1 cond) and which branch runs it. Consecutive slices of one branch form
    one group of ``call.groups``; the settings are resolved again for the split batch.
    """
    if call.batch % 2:
        raise SurgeryError(f"{what} needs a [uncond, cond] batch of even size, got {call.batch}")
    rows = call.batch // 2
    groups: list[tuple[int, str]] = []
    for _, branch in layout:
        if groups and groups[-1][1] == branch:
            groups[-1] = (groups[-1][0] + rows, branch)
        else:
            groups.append((rows, branch))
    call.groups = tuple(groups)
    call.batch = len(layout) * rows
    patch.resolve_settings()
    halves = tuple(half for half, _ in layout)
    return (
        tuple(expand_halves(a, 2 * rows, halves) for a in args),
        {k: expand_halves(v, 2 * rows, halves) for k, v in kwargs.items()},
    )


def end_split(call: UNetCall) -> None:
    """The call runs one batch again; settings resolved for the split batch are dropped (later reads resolve live)."""
    call.groups = None
    call.settings = None
