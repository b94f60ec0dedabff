"""Noise-damped classifier-free guidance (ScaleCrafter) with three evaluations in one call.

A pipeline batches ``[uncond, cond]`` and combines ``uncond + w * (cond - uncond)``. While the
noise-damped window is open, a pre-hook turns that batch into ``[uncond, uncond, cond]``; the
first slice runs the damped (vanilla-table) branch and the other two the main branch, in one
UNet call (each re-dilated conv splits its batch, :class:`~unet_surgery.ops.BatchSplit`). A
forward hook then returns

    uncond' = eps_v(u)          cond' = eps_v(u) + eps_d(c) - eps_d(u)

so the pipeline's own combination yields ``eps_v(u) + w * (eps_d(c) - eps_d(u))``, the
published formula, for any guidance scale. The published loop spends four evaluations (two
batch-2 calls) and discards one.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from unet_surgery.errors import SurgeryError
from unet_surgery.runtime import DAMPED, MAIN


def _expand(value: Any, batch: int) -> Any:
    """[u, c] -> [u, u, c] along dim 0 for every per-sample tensor.

    Recurses into dicts (SDXL's added conditioning) and lists/tuples (ControlNet residuals,
    IP-adapter embeddings).
    """
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] % batch or value.shape[0] < 2:
            return value
        half = value.shape[0] // 2
        return torch.cat([value[:half], value[:half], value[half:]])
    if isinstance(value, dict):
        return {k: _expand(v, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_expand(v, batch) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _combine(sample: torch.Tensor, rows: int) -> torch.Tensor:
    k = sample.shape[0] // (3 * rows)
    n = rows * k
    vanilla_u, damped_u, damped_c = sample[:n], sample[n : 2 * n], sample[2 * n :]
    return torch.cat([vanilla_u, vanilla_u + (damped_c - damped_u)])


class NoiseDampedGuidance:
    """Pre/post forward hooks on the patched UNet; installed by :meth:`Patch.enable_noise_damped_cfg`."""

    def __init__(self, patch: Any) -> None:
        from unet_surgery.passes.base import handler_for

        self.patch = patch
        self.handler: Any = handler_for("noise_damped_cfg")
        if not patch.plan.entries(self.handler.type):
            raise SurgeryError(f"recipe {patch.recipe.name!r} has no noise_damped_cfg pass")
        self._local = threading.local()  # rows of the call in flight, per thread like the tracker
        self._handles: list[Any] = []

    @property
    def _rows(self) -> int | None:
        return getattr(self._local, "rows", None)

    @_rows.setter
    def _rows(self, rows: int | None) -> None:
        self._local.rows = rows

    def active(self) -> bool:
        return bool(self.handler.guidance_active(self.patch, self.patch.tracker.current))

    def enable(self) -> None:
        if self._handles:
            return
        model = self.patch.model
        # Eager, like the patch's own pre-hook: they decide from the timestep's value.
        self._handles = [
            model.register_forward_pre_hook(torch.compiler.disable(self._pre), with_kwargs=True),
            model.register_forward_hook(torch.compiler.disable(self._post), with_kwargs=True, always_call=True),
        ]

    def disable(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._rows = None

    def _pre(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._rows = None
        call = self.patch.tracker.current
        if call is None or not self.active():
            return None
        if call.batch % 2:
            raise SurgeryError(
                f"noise-damped guidance needs a [uncond, cond] batch of even size, got {call.batch}"
            )
        rows = call.batch // 2
        call.groups = ((rows, DAMPED), (2 * rows, MAIN))
        call.batch = 3 * rows
        self.patch.resolve_settings()
        self._rows = rows
        return tuple(_expand(a, 2 * rows) for a in args), {k: _expand(v, 2 * rows) for k, v in kwargs.items()}

    def _post(self, module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        rows, self._rows = self._rows, None
        call = self.patch.tracker.current
        if call is not None:
            call.groups = None
            call.settings = None  # resolved for the split batch; later reads resolve live
        if rows is None:
            return None
        if isinstance(output, torch.Tensor):
            return _combine(output, rows)
        if isinstance(output, tuple):
            return (_combine(output[0], rows), *output[1:])
        if hasattr(output, "sample"):
            output.sample = _combine(output.sample, rows)
            return output
        raise SurgeryError(f"cannot apply noise-damped guidance to a UNet returning {type(output).__name__}")
