"""Dilation factor over the sampling trajectory (ScaleCrafter and FreeScale schedules).

Re-dilation only helps while the sampler lays out the global structure; later steps refine
detail at the native receptive field.  A :class:`FactorSchedule` says which factor a layer uses
at each step.  Both published methods count steps of a 50-step sampler, so the window ``tau``
is stored in steps of ``steps`` and rescaled for another step count.  A factor of 1 means
"off" (the plain conv runs).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from unet_surgery.errors import TransformError

__all__ = ["FactorSchedule", "ScheduleSpec", "progressive_factor", "step_index"]


def progressive_factor(factor: float, tau: float, step: int) -> float:
    """ScaleCrafter's progressive rule: ``max(ceil(f * (tau - i) / tau), 2)`` for i < tau.

    Kept exactly as published: for ``f < 2`` it returns 2, i.e. more dilation than asked for
    (the published configs only enable it with factors >= 2).
    """
    return float(max(math.ceil(factor * (tau - step) / tau), 2))


def inferred_step(timestep: float | torch.Tensor, steps: int, num_train_timesteps: int = 1000) -> int:
    """The step of ``timestep`` on a ``steps``-step run when the sampler's list is unknown:
    ``floor(steps * (1 - t / T))``, clamped to ``[0, steps)`` -- exact at a window boundary for
    the "leading" and "trailing" spacings of DDIM-like samplers, approximate otherwise."""
    if num_train_timesteps < 1:
        raise TransformError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    u = steps * (1.0 - _scalar_timestep(timestep) / num_train_timesteps)
    return min(max(math.floor(u), 0), steps - 1)


def step_index(timestep: float | torch.Tensor, timesteps: Sequence[float] | torch.Tensor) -> int:
    """Index of ``timestep`` in the sampler's ``timesteps`` (the nearest entry; first on ties).

    Lets a caller that sees only the UNet's ``t`` argument recover the step number, whatever
    the scheduler's spacing ("leading", "trailing", "linspace", Karras...).
    """
    ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    if ts.numel() == 0:
        raise TransformError("timesteps is empty")
    t = _scalar_timestep(timestep)
    return int(torch.argmin((ts - t).abs()).item())


def _scalar_timestep(timestep: float | torch.Tensor) -> float:
    """One float from a scalar or a batch of equal timesteps (samplers repeat t per sample)."""
    t = torch.as_tensor(timestep, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise TransformError("timestep is empty")
    if not bool((t == t[0]).all()):
        raise TransformError(f"batch mixes timesteps {t.tolist()}; pass one step at a time")
    return float(t[0])


def _tau_doc() -> Any:
    return field(
        default=None,
        metadata={"doc": "active while step < tau, in steps of a `steps`-step sampler (null: every step)"},
    )


@dataclass(frozen=True)
class ScheduleSpec:
    """When a pass is active over the sampling trajectory."""

    tau: float | None = _tau_doc()
    steps: int = field(default=50, metadata={"doc": "the step count tau is expressed in (published settings: 50)"})
    progressive: bool = field(
        default=False, metadata={"doc": "ScaleCrafter's decaying factor max(ceil(f*(tau-i)/tau), 2)"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise TransformError(f"steps must be a positive integer, got {self.steps!r}")
        if self.tau is not None and (
            isinstance(self.tau, bool)
            or not isinstance(self.tau, numbers.Real)
            or not math.isfinite(self.tau)
            or self.tau < 0
        ):
            raise TransformError(f"tau must be a finite number >= 0 or None, got {self.tau!r}")

    def with_factor(self, factor: float) -> FactorSchedule:
        """This window carrying a layer's factor."""
        return FactorSchedule(tau=self.tau, steps=self.steps, progressive=self.progressive, factor=factor)


@dataclass(frozen=True)
class FactorSchedule(ScheduleSpec):
    """Factor at each sampling step: a :class:`ScheduleSpec` window carrying a factor.

    ``factor``: the layer's factor f (1 = off).  ``tau``: the window -- dilate while
    ``i < tau`` (``None``: every step).  ``steps``: the step count ``tau`` is expressed in
    (the published value 50); for another step count ``n`` the window becomes
    ``tau * n / steps``.  ``progressive``: ScaleCrafter's decaying rule inside the window.
    """

    factor: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, numbers.Real):
            raise TransformError(f"factor must be a number, got {self.factor!r}")
        if not math.isfinite(self.factor) or self.factor <= 0:
            raise TransformError(f"factor must be finite and > 0, got {self.factor}")
        super().__post_init__()

    # -- constructors named after the methods ------------------------------------------------

    @classmethod
    def constant(cls, factor: float) -> FactorSchedule:
        """The same factor at every step."""
        return cls(factor=factor)

    @classmethod
    def scalecrafter(
        cls, factor: float, tau: int, *, progressive: bool = False, steps: int = 50
    ) -> FactorSchedule:
        """ScaleCrafter: active while i < ``dilate_tau``, optionally progressive."""
        return cls(factor=factor, tau=tau, steps=steps, progressive=progressive)

    @classmethod
    def freescale(cls, factor: float, tau: int = 35, *, steps: int = 50) -> FactorSchedule:
        """FreeScale restrained dilation: a constant factor while i < ``dilate_tau`` (35)."""
        return cls(factor=factor, tau=tau, steps=steps)

    # -- queries ----------------------------------------------------------------------------

    def window(self, num_steps: int) -> float | None:
        """The window length in steps of a ``num_steps`` sampler (``None``: unbounded)."""
        if self.tau is None:
            return None
        if num_steps == self.steps:
            return float(self.tau)
        return self.tau * num_steps / self.steps

    def factor_at_step(self, i: int, num_steps: int | None = None) -> float:
        """Factor at 0-based step ``i`` of a ``num_steps`` sampler (default ``steps``)."""
        n = self.steps if num_steps is None else num_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TransformError(f"num_steps must be a positive integer, got {num_steps!r}")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise TransformError(f"step index must be an integer in [0, {n}), got {i!r}")
        if self.factor == 1:
            return 1.0
        tau = self.window(n)
        if tau is None:
            return float(self.factor)
        if i >= tau:
            return 1.0
        if self.progressive:
            return progressive_factor(self.factor, tau, i)
        return float(self.factor)

    def factor_at_timestep(
        self,
        t: float | torch.Tensor,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        num_train_timesteps: int = 1000,
    ) -> float:
        """Factor at UNet timestep ``t``.

        With the sampler's ``timesteps`` list: the exact step index (:func:`step_index`).
        Without it: the position ``u = steps * (1 - t / T)`` on a ``steps``-step trajectory
        and step ``floor(u)`` -- exact at the window boundary for the "leading" and
        "trailing" spacings of DDIM-like samplers with ``steps`` steps, approximate otherwise.
        """
        if timesteps is not None:
            ts = torch.as_tensor(timesteps).flatten()
            return self.factor_at_step(step_index(t, ts), int(ts.numel()))
        return self.factor_at_step(inferred_step(t, self.steps, num_train_timesteps), self.steps)
