"""The ``fouriscale_guidance`` pass: FouriScale's guidance branch, and ``--amp_guidance``.

Official code (LeonHLJ/FouriScale @ 6fb392e, ``text2image.py`` / ``text2image_xl.py`` and
``model.py``): with classifier-free guidance the loop batches ``[uncond, cond, cond]`` and the
text embeddings ``[neg, pos, pos]``. The first two thirds run FouriScale as the ``fouriscale``
pass does; the third, the guidance branch, gets the *weak* low-pass mask (and, in the SDXL
processor, dilation ``ceil(max(d / 1.5, 1))``), and in every self-attention
(``TrainingFreeAttnProcessor`` on each ``attn1``) its queries and keys are those of the second
third: ``key[-1] = key[-2]; query[-1] = query[-2]``. The guided prediction is
``eps_u + w * (eps_3 - eps_u)``: the second third only lends its attention maps.
``text2image_xl.py --amp_guidance`` multiplies ``w`` by 2.4 for steps ``i < start_step``.

Here the pre hook turns the pipeline's ``[uncond, cond]`` into ``[uncond, cond, cond]`` (branch
``main`` for the first two thirds, ``fouriscale_guidance`` for the last, so the ``fouriscale``
pass gives each conv its weak setting there), the selected self-attentions copy the rows of the
second third of their query and key projections over the third's, and the post hook returns
``[eps_u, eps_3]`` (``[eps_u, eps_u + a * (eps_3 - eps_u)]`` while amplified), so the pipeline's
own ``eps_u + w * (cond' - eps_u)`` is the official formula for any ``w``.

Outside FouriScale's window every branch runs the plain UNet and the third equals the second,
so the batch is split only while some ``fouriscale`` layer is dilated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from unet_surgery.core.schema import PassConfig, Recipe, Selector, doc, fail
from unet_surgery.errors import SelectionError, SurgeryError, TransformError
from unet_surgery.graph.records import AttentionRecord, UNetMap
from unet_surgery.ops import rewrite
from unet_surgery.passes.base import (
    FilterFn,
    LayerRewrite,
    PassHandler,
    Plan,
    handler_for,
    register_pass,
    spatial_self_attentions,
    step_position,
)
from unet_surgery.passes.cfg_batch import end_split, map_sample, split_batch
from unet_surgery.passes.fouriscale import GUIDANCE, FouriScaleHandler, FouriScalePass
from unet_surgery.runtime import MAIN, UNetCall

PROJECTIONS = ("to_q", "to_k")
"""The query and key projections of an attention module (diffusers ``Attention``, LDM ``CrossAttention``)."""


def _self_attention() -> Selector:
    return Selector(op=("attention",), kind=("self",), axis=("spatial",))


@dataclass(frozen=True)
class FouriScaleGuidancePass(PassConfig):
    """FouriScale's guidance: a third batch branch with the weak mask and the conditional attention maps."""

    type: ClassVar[str] = "fouriscale_guidance"
    select: Selector = doc(
        "self-attentions whose guidance-branch queries and keys are the conditional branch's "
        "(official: every attn1); default: every spatial self-attention",
        default_factory=_self_attention,
    )
    amp_guidance: bool = doc(
        "multiply the guidance scale by amp_factor while step < amp_stop_step (official text2image_xl.py "
        "--amp_guidance, off by default)",
        default=False,
    )
    amp_factor: float = doc("the guidance-scale multiplier of amp_guidance (official: 2.4)", default=2.4)
    amp_stop_step: float = doc("amplified while step < this (official: the FouriScale start_step)", default=20)
    steps: int = doc("the step count amp_stop_step is expressed in (official: 50)", default=50)

    def validate(self, where: str) -> None:
        if not math.isfinite(self.amp_factor) or self.amp_factor <= 0:
            fail(f"{where}.amp_factor", f"amp_factor must be a positive number, got {self.amp_factor}")
        if self.steps < 1:
            fail(f"{where}.steps", f"steps must be >= 1, got {self.steps}")
        if self.amp_stop_step < 0:
            fail(f"{where}.amp_stop_step", f"amp_stop_step must be >= 0, got {self.amp_stop_step}")


# ----------------------------------------------------------------------------- the q/k rewrite


@dataclass(frozen=True)
class BorrowedRows:
    """Rows ``[target, target + rows)`` of a projection's output become rows ``[source, source + rows)``.

    In units of the model's batch (``total`` rows); a projection whose input batch is ``k``
    times larger (video UNets fold frames into the batch) scales the slices by ``k``.
    """

    source: int
    target: int
    rows: int
    total: int

    def apply(self, out: Tensor) -> Tensor:
        if out.shape[0] % self.total:
            raise TransformError(f"batch of {out.shape[0]} does not split into {self.total} model rows")
        k = out.shape[0] // self.total
        s, t, n = self.source * k, self.target * k, self.rows * k
        return torch.cat([out[:t], out[s : s + n], out[t + n :]])


class _BorrowedRowsMixin(rewrite.Rewritten):
    """Forward of a query or key projection whose guidance rows are the conditional rows."""

    _rewrite_prefix = "BorrowedRows"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._rewrite_base.forward(self, *args, **kwargs)
        borrowed = rewrite.read_setting(self)  # type: ignore[arg-type]
        return out if borrowed is None else borrowed.apply(out)


def _install(attn: nn.Module, source: Any, extras: dict[str, Any]) -> None:
    children = [getattr(attn, name, None) for name in PROJECTIONS]
    if not all(isinstance(c, nn.Module) for c in children):
        raise TransformError(
            f"{type(attn).__name__} has no separate {' and '.join(PROJECTIONS)} projections: "
            "FouriScale's guidance shares the conditional branch's queries and keys through them"
        )
    for child in children:
        rewrite.install(child, rewrite.swapped_class(_BorrowedRowsMixin, type(child)), source)  # type: ignore[arg-type]


def _restore(attn: nn.Module) -> None:
    for name in PROJECTIONS:
        child = getattr(attn, name)
        if rewrite.is_rewritten(child, _BorrowedRowsMixin):
            rewrite.restore(child)


SHARED_QK = LayerRewrite(
    name="shared_qk",
    group="shared_qk_attentions",
    off=None,
    install=_install,
    restore=_restore,
    summary=lambda borrowed: None,  # only a split batch borrows rows; export runs one branch
)
"""A self-attention whose ``to_q``/``to_k`` outputs copy the conditional rows over the guidance rows."""


# ----------------------------------------------------------------------------- the handler


@register_pass
class FouriScaleGuidanceHandler(PassHandler[FouriScaleGuidancePass]):
    """Plans the selected self-attentions; splits the batch while FouriScale acts; folds it back."""

    type = "fouriscale_guidance"
    config = FouriScaleGuidancePass
    rewrite = SHARED_QK
    cfg_batches = True

    def layers(self, config: FouriScaleGuidancePass, index: int, unet_map: UNetMap, plan: Plan,
               filter_fn: FilterFn | None) -> list[AttentionRecord]:
        return spatial_self_attentions(config, index, unet_map, plan, filter_fn)

    def check_plan(self, plan: Plan) -> None:
        if not plan.entries("fouriscale"):
            raise SelectionError("fouriscale_guidance needs a fouriscale pass: the guidance branch is FouriScale's")
        if plan.entries("noise_damped_cfg"):
            raise SelectionError("fouriscale_guidance and noise_damped_cfg both split the batch: use one of them")
        if len({id(e) for e in plan.entries(self.type).values()}) > 1:
            raise SelectionError("a recipe takes one fouriscale_guidance pass")

    def describe(self, entry: FouriScaleGuidancePass) -> str:
        amp = f", guidance x{entry.amp_factor:g} before step {entry.amp_stop_step:g} of {entry.steps}" if entry.amp_guidance else ""
        return "guidance branch: conditional queries and keys" + amp

    def setting(self, patch: Any, entry: FouriScaleGuidancePass, branch: str, call: UNetCall | None, current: Any) -> Any:
        if call is None or not call.groups or call.groups[-1][1] != GUIDANCE:
            return current
        total = sum(rows for rows, _ in call.groups)
        rows = call.groups[-1][0]
        return BorrowedRows(source=total - 2 * rows, target=total - rows, rows=rows, total=total)

    def attach(self, patch: Any) -> None:
        entry = next(iter(patch.plan.entries(self.type).values()))
        hooks = _GuidanceHooks(patch, entry)
        patch.hooks.add(self.type, pre=hooks.pre, post=hooks.post)

    def no_effect_reasons(self, config: FouriScaleGuidancePass, index: int, recipe: Recipe, plan: Plan | None) -> list[str]:
        if not any(type(p).type == "fouriscale" for p in recipe.passes):
            return ["no fouriscale pass: the guidance branch has nothing to differ by"]
        return []


def fouriscale_active(patch: Any, call: UNetCall) -> bool:
    """Whether some ``fouriscale`` layer is dilated on ``call`` (the branches differ only then)."""
    handler = handler_for("fouriscale")
    assert isinstance(handler, FouriScaleHandler)
    entries: dict[int, FouriScalePass] = {id(e): e for e in patch.plan.entries("fouriscale").values()}
    return any(handler.dilation_now(patch, e, call) != 1.0 for e in entries.values())


class _GuidanceHooks:
    """The pre/post model hooks of FouriScale's guidance, acting while ``patch.cfg_batches``."""

    def __init__(self, patch: Any, entry: FouriScaleGuidancePass) -> None:
        self.patch, self.entry = patch, entry

    def amplified(self, call: UNetCall) -> bool:
        entry = self.entry
        if not entry.amp_guidance or entry.amp_factor == 1.0:
            return False
        position = step_position(self.patch, call, entry.steps)
        if position is None:
            return False
        step, n = position
        return step < entry.amp_stop_step * n / entry.steps

    def pre(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        patch = self.patch
        call = patch.tracker.current
        if call is None or not patch.cfg_batches or call.groups is not None or not fouriscale_active(patch, call):
            return None
        layout = ((0, MAIN), (1, MAIN), (1, GUIDANCE))  # [u, c] -> [u, c, c]
        return split_batch(patch, call, args, kwargs, layout, "FouriScale's guidance")

    def post(self, module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        call = self.patch.tracker.current
        if call is None or call.groups is None or call.groups[-1][1] != GUIDANCE:
            return None
        rows = call.groups[-1][0]
        amp = self.entry.amp_factor if self.amplified(call) else None
        end_split(call)

        def fold(sample: Tensor) -> Tensor:
            n = sample.shape[0] // 3
            uncond, guided = sample[:n], sample[2 * n :]
            if sample.shape[0] != 3 * n or n % rows:
                raise SurgeryError(f"FouriScale's guidance expected a batch of 3 x {rows} rows, got {sample.shape[0]}")
            return torch.cat([uncond, guided if amp is None else uncond + amp * (guided - uncond)])

        return map_sample(output, fold, "FouriScale's guidance")
