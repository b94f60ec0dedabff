"""Patch-wise denoising (MultiDiffusion): overlapping views at the model's native size, fused.

The latent is covered by ``window x window`` views ``stride`` apart, the last row and column
snapped to the border (MultiDiffusion's ``get_views`` as DemoFusion and diffusers' panorama
pipeline write it: ``int((H - window) / stride - 1e-6) + 2`` views a side). Each view is
denoised by the wrapped :data:`~unet_surgery.sampling.cascade.Denoiser` at the window's size
(so every UNet pass of a recipe still applies inside each view) and the outputs are averaged
where views overlap (MultiDiffusion's count weighting, Eq. 5 of the paper with uniform weights).

MultiDiffusion averages the latents each view's scheduler step gives; we average the model
outputs and step the whole latent once. For the samplers whose step is affine in the model
output at a fixed timestep (DDIM, Euler, DPM-Solver, UniPC...) the two are the same number, and
a multistep scheduler keeps one coherent history for the whole latent.

Views run in batches of ``view_batch_size``; a :class:`ViewExecutor` decides where each batch
runs: here (:class:`LocalViews`) or spread over the processes of a ``torch.distributed`` group
(:class:`SplitViews`), which gather every batch's output and fuse them in batch order, so the
result does not depend on the number of processes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from unet_surgery.errors import SurgeryError
from unet_surgery.sampling.cascade import CascadeStage, Denoiser

View = tuple[int, int, int, int]
"""A view in latent pixels: ``(h_start, h_end, w_start, w_end)``, ends exclusive."""


class PatchError(SurgeryError):
    """Patch-wise settings that do not fit the latent or the process group."""


@dataclass(frozen=True)
class ViewStage(CascadeStage):
    """The stage a wrapped denoiser sees for a batch of views.

    ``latent_hw`` is the window's size; ``views`` the batch's views in batch order (each takes
    ``batch`` consecutive rows of the input); ``crops`` the top-left corner of each view in
    pixels, for SDXL's crop conditioning (DemoFusion's local patches), else empty.
    """

    views: tuple[View, ...] = ()
    crops: tuple[tuple[int, int], ...] = ()


def check_window(height: int, width: int, window: int, stride: int) -> None:
    """One clear line for a window or stride that does not fit a ``height x width`` latent."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise PatchError(f"patches.window: must be a positive number of latent pixels, got {window!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise PatchError(f"patches.stride: must be a positive number of latent pixels, got {stride!r}")
    if stride > window:
        raise PatchError(f"patches.stride: {stride} is larger than the window {window}: views would leave gaps")
    if window > height or window > width:
        raise PatchError(
            f"patches.window: {window} is larger than the {height}x{width} latent; use a window of at "
            f"most {min(height, width)} or a larger image"
        )


def blocks(size: int, window: int, stride: int) -> int:
    """Views along one side: ``int((size - window) / stride - 1e-6) + 2``, or 1 if it fits."""
    return int((size - window) / stride - 1e-6) + 2 if size > window else 1


def view_grid(height: int, width: int, window: int, stride: int, *, check: bool = True) -> list[View]:
    """MultiDiffusion's views of a ``height x width`` latent, row-major, the last ones snapped."""
    if check:
        check_window(height, width, window, stride)
    rows, cols = blocks(height, window, stride), blocks(width, window, stride)
    views = []
    for i in range(rows * cols):
        h0, w0 = (i // cols) * stride, (i % cols) * stride
        h1, w1 = h0 + window, w0 + window
        if h1 > height:
            h0, h1 = h0 + height - h1, height
        if w1 > width:
            w0, w1 = w0 + width - w1, width
        if h0 < 0:
            h0, h1 = 0, h1 - h0
        if w0 < 0:
            w0, w1 = 0, w1 - w0
        views.append((h0, h1, w0, w1))
    return views


def jitter_views(views: Sequence[View], height: int, width: int, window: int, stride: int,
                 rng: random.Random) -> list[View]:
    """DemoFusion's random jitter, in the frame of the latent zero-padded by ``(window - stride) // 4``.

    Inner views move by up to that range either way, border views only inwards; the draws are
    ``rng.randint`` in the official order (width first, then height, view by view).
    """
    r = (window - stride) // 4
    out = []
    for h0, h1, w0, w1 in views:
        dw = dh = 0
        if w0 != 0 and w1 != width:
            dw = rng.randint(-r, r)
        elif w0 == 0 and w1 != width:
            dw = rng.randint(-r, 0)
        elif w0 != 0 and w1 == width:
            dw = rng.randint(0, r)
        if h0 != 0 and h1 != height:
            dh = rng.randint(-r, r)
        elif h0 == 0 and h1 != height:
            dh = rng.randint(-r, 0)
        elif h0 != 0 and h1 == height:
            dh = rng.randint(0, r)
        out.append((h0 + dh + r, h1 + dh + r, w0 + dw + r, w1 + dw + r))
    return out


def batched(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` in consecutive batches of ``size`` (the last may be shorter)."""
    if size < 1:
        raise PatchError(f"view_batch_size: must be >= 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------- executors


class ViewExecutor(Protocol):
    """Runs ``fn`` on every batch and returns the outputs in batch order."""

    def run(self, batches: Sequence[Any], fn: Callable[[Any], torch.Tensor]) -> list[torch.Tensor]: ...


class LocalViews:
    """Every batch here, one after the other."""

    def run(self, batches: Sequence[Any], fn: Callable[[Any], torch.Tensor]) -> list[torch.Tensor]:
        return [fn(b) for b in batches]


class SplitViews:
    """Batches spread over the processes of a ``torch.distributed`` group and gathered each call.

    Process ``r`` of ``n`` runs batches ``r, r + n, ...`` (none when a call has fewer batches
    than processes); ``all_gather_object`` brings every output to every process (through the
    CPU), and the caller fuses them in batch order, so the fused latent is the same, bit for bit,
    as one process's. Each batch is computed with the same composition as alone, so no result
    depends on the number of processes. ``device`` is where the outputs go back to.
    """

    def __init__(self, device: torch.device | str = "cpu", group: Any = None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise PatchError("--split patches needs a torch.distributed process group (run under accelerate launch)")
        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def run(self, batches: Sequence[Any], fn: Callable[[Any], torch.Tensor]) -> list[torch.Tensor]:
        import torch.distributed as dist

        mine = {i: fn(b).cpu() for i, b in enumerate(batches) if i % self.world_size == self.rank}
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        merged: dict[int, torch.Tensor] = {}
        for part in gathered:
            merged.update(part)
        return [merged[i].to(self.device) for i in range(len(batches))]


def check_world_size(world_size: int, calls: Sequence[tuple[int, int]]) -> None:
    """Refuse more processes than the batches of views of a step's largest list of UNet calls.

    ``calls`` holds ``(views, batches)`` of every list a step makes; with more processes than
    the largest has batches, some processes would never get a view.
    """
    views, batches = max(calls, key=lambda c: c[1]) if calls else (1, 1)
    if world_size > batches:
        raise PatchError(
            f"--split patches: {world_size} processes but at most {batches} batch(es) of views "
            f"({views} views) in a step to share; use at most {batches} processes or a smaller "
            "view_batch_size or stride"
        )


# ----------------------------------------------------------------------------- fusion


def fuse_views(
    outputs: Sequence[torch.Tensor], batches: Sequence[Sequence[View]], shape: tuple[int, ...],
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the views' outputs and the count of views per pixel, accumulated in batch order.

    ``shape`` is the fused tensor's ``(B, C, H, W)``; each output holds ``len(views) * batch``
    rows, view-major.
    """
    first = outputs[0]
    value = torch.zeros(shape, device=first.device, dtype=first.dtype)
    count = torch.zeros(shape, device=first.device, dtype=first.dtype)
    for views, out in zip(batches, outputs, strict=True):
        for (h0, h1, w0, w1), part in zip(views, out.split(batch), strict=True):
            value[:, :, h0:h1, w0:w1] += part
            count[:, :, h0:h1, w0:w1] += 1
    return value, count


def stage_for(stage: CascadeStage, views: Sequence[View], window: int,
              crops: Sequence[tuple[int, int]] = ()) -> ViewStage:
    """The :class:`ViewStage` a wrapped denoiser gets for one batch of ``views``."""
    fields = {k: v for k, v in asdict(stage).items() if k in ("index", "height", "width", "restart_step")}
    return ViewStage(**fields, latent_hw=(window, window), views=tuple(views), crops=tuple(crops))


def patchwise_denoiser(
    denoise: Denoiser,
    *,
    window: int,
    stride: int,
    view_batch_size: int = 1,
    executor: ViewExecutor | None = None,
) -> Denoiser:
    """A denoiser that runs ``denoise`` on overlapping ``window`` views and averages them.

    ``denoise(x, t, stage)`` gets ``len(stage.views) * B`` rows (views in ``stage.views``
    order, each the whole batch) and returns as many. Works for latents and pixels alike (a toy
    model's 3-channel images): the wrapper only slices the last two dimensions. A latent the
    window covers exactly is one view, and the result is ``denoise``'s own, bit for bit.
    """
    runner: ViewExecutor = executor if executor is not None else LocalViews()

    def fused(x: torch.Tensor, t: torch.Tensor, stage: CascadeStage) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])
        views = view_grid(height, width, window, stride)
        batches = batched(views, view_batch_size)
        batch = int(x.shape[0])

        def one(views_: list[View]) -> torch.Tensor:
            rows = torch.cat([x[:, :, h0:h1, w0:w1] for h0, h1, w0, w1 in views_])
            return denoise(rows, t, stage_for(stage, views_, window))

        outputs = runner.run(batches, one)
        shape = (batch, int(outputs[0].shape[1]), height, width)
        value, count = fuse_views(outputs, batches, shape, batch)
        return value / count

    return fused


def patch_settings(recipe: Any) -> tuple[int, int]:
    """``(window, stride)`` of a recipe's ``patches`` section, defaults filled in.

    The window defaults to the base resolution in latent pixels (the model's native size, the
    smaller side for a non-square base), the stride to half the window.
    """
    spec = recipe.patches
    window = spec.window if spec.window is not None else min(recipe.base_resolution) // recipe.vae_scale_factor
    stride = spec.stride if spec.stride is not None else max(1, window // 2)
    return window, stride


def num_view_batches(height: int, width: int, window: int, stride: int, view_batch_size: int) -> tuple[int, int]:
    """``(views, batches)`` of a ``height x width`` latent (checks the window and stride)."""
    views = view_grid(height, width, window, stride)
    return len(views), len(batched(views, view_batch_size))
