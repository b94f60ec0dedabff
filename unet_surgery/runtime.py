"""What the current UNet call is: timestep, step index and latent size, for per-step rewrites.

A patched model must work inside any unmodified sampling loop, so rewritten layers cannot be
told the step by the caller. Instead a forward pre-hook on the UNet records each call's
timestep and latent size in a :class:`UNetCallTracker`; layers read it when they run. The step
index comes from the sampler's timestep list when one is known (``set_timesteps``, done by
pipeline integration) and is otherwise inferred from the sequence of calls.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unet_surgery.errors import SurgeryError
from unet_surgery.graph.inputs import call_spec
from unet_surgery.ops.schedules import step_index

# Branches a slice of the batch can run (see UNetCall.groups).
MAIN, DAMPED = "main", "damped"

# Names the timestep and latent take in forwards without a call spec (custom UNets).
_TIMESTEP_NAMES = ("timestep", "timesteps", "t")
_SAMPLE_NAMES = ("sample", "x")


@dataclass
class UNetCall:
    """One forward of the UNet as the rewritten layers see it."""

    timestep: float | None
    latent_hw: tuple[int, int]
    batch: int
    step: int | None  # 0-based index into the sampler's timesteps, when known
    # Consecutive slices of the batch that run different branches: ((rows, branch), ...).
    # Set by noise-damped guidance; None means the whole batch runs the main branch.
    groups: tuple[tuple[int, str], ...] | None = None
    # Every rewritten layer's setting for this call, resolved once before the forward runs
    # (Patch.resolve_settings). Layers read it instead of the step, so a compiled forward
    # guards on these settings and compiles once per distinct phase, not once per step.
    settings: dict[str, Any] | None = None
    # ControlNet residuals of this call not yet added (patching.controlnet.PendingResiduals).
    controlnet: Any = None


class _PerThread(threading.local):
    """The call in flight and the timesteps seen so far, one set per thread."""

    def __init__(self) -> None:
        self.current: UNetCall | None = None
        self.seen: list[float] = []


@dataclass
class UNetCallTracker:
    """Records each UNet call; shared by every rewrite of one patch.

    What the call in flight is (``current``) and the inferred step count are per thread: one
    patched model called from two threads runs each call with its own timestep. The
    sampler's timestep list (``set_timesteps``) is shared.
    """

    num_train_timesteps: int = 1000
    timesteps: list[float] | None = None
    _signature: inspect.Signature | None = None
    _local: _PerThread = field(default_factory=_PerThread, repr=False, compare=False)

    @property
    def current(self) -> UNetCall | None:
        return self._local.current

    @current.setter
    def current(self, call: UNetCall | None) -> None:
        self._local.current = call

    @property
    def _seen(self) -> list[float]:
        return self._local.seen

    def __deepcopy__(self, memo: dict[int, Any]) -> UNetCallTracker:
        """A fresh tracker with the same settings (no call in flight): thread state is not copied."""
        copied = UNetCallTracker(self.num_train_timesteps, None if self.timesteps is None else list(self.timesteps))
        memo[id(self)] = copied
        return copied

    def set_timesteps(self, timesteps: Sequence[float] | torch.Tensor | None) -> None:
        """Tell the tracker the sampler's timestep list, so steps are exact indices into it."""
        self.timesteps = None if timesteps is None else [float(t) for t in torch.as_tensor(timesteps).flatten()]
        self._seen.clear()

    def reset(self) -> None:
        self.current = None
        self._seen.clear()

    def step_of(self, timestep: float) -> int:
        if self.timesteps:
            return step_index(timestep, self.timesteps)
        # No list known: count distinct timesteps in call order (a new run starts when t rises).
        if self._seen and timestep > self._seen[-1]:
            self._seen.clear()
        if not self._seen or timestep != self._seen[-1]:
            self._seen.append(timestep)
        return len(self._seen) - 1

    def record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._signature is None:
            self._signature = inspect.signature(module.forward)
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError as exc:
            # Never guess: dropping the positional arguments could lose a positional timestep
            # and silently run every step with the wrong schedule.
            raise SurgeryError(
                f"cannot read this {type(module).__name__} call ({exc}); the patch needs the "
                "sample and timestep arguments of its forward"
            ) from exc
        spec = call_spec(module)
        sample_names = (spec.sample,) if spec is not None else _SAMPLE_NAMES
        timestep_names = (spec.timestep,) if spec is not None else _TIMESTEP_NAMES
        sample = next((bound[n] for n in sample_names if isinstance(bound.get(n), torch.Tensor)), None)
        if sample is None:
            sample = next((a for a in args if isinstance(a, torch.Tensor)), None)
        t_value = next((bound[n] for n in timestep_names if n in bound and bound[n] is not None), None)
        timestep = _scalar(t_value)
        hw = (int(sample.shape[-2]), int(sample.shape[-1])) if sample is not None else (0, 0)
        batch = int(sample.shape[0]) if sample is not None else 0
        step = self.step_of(timestep) if timestep is not None else None
        self.current = UNetCall(timestep=timestep, latent_hw=hw, batch=batch, step=step)


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    t = torch.as_tensor(value).detach().flatten()
    if t.numel() == 0:
        return None
    return float(t[0].to("cpu", torch.float64)) if t.device.type != "meta" else None
