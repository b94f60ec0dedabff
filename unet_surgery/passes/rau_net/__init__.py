"""The ``rau_net`` pass: HiDiffusion's resolution-aware U-Net (one down/up pair per pass).

While the switching window is open the selected down-path layer halves the feature map once
more and its up-path partner restores the size it had, so the deeper levels see a
training-size layout (HiDiffusion, ``hidiffusion.py``). The selection names the down side;
the up side is found in the map:

* a stride-2 3x3 conv (a downsampler) at level L -> it runs with stride 4, padding 2,
  dilation 2; its partner is the first 3x3 conv of the up stage at level L (the upsampler's
  conv, which then upsamples to the recorded size);
* spatial self-attention ops of the down stage at level L -> the transformer number
  ``pool_after`` of that level is average-pooled 2x2 after it runs; its partner is the
  transformer number ``restore_after`` of the up stage at level L, resized back (bicubic).

The window follows the official switching rule: active while
``int(n * start) <= step < int(n * switch)`` on an ``n``-step sampler.

Below the pair every level sees a size derived from the reduced one, which need not halve
evenly (a 264-pixel SD1.5 latent reaches 33 at level 1 under the 4x downsampler, then 17
and 9). The plain 2x upsampling then misses the skip it is concatenated with. The official
code forwards the skip sizes to every upsampler (``num_upsamplers += 12``); here each
deeper level's downsampler conv records the size it saw and the upsampler conv into that
level resizes (nearest) to it, while the pair is active: a *size role*, a no-op wherever the
2x upsampling already matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from unet_surgery.core.schema import PassConfig, Recipe, Selector, doc, fail
from unet_surgery.errors import SelectionError
from unet_surgery.graph.records import AttentionRecord, ConvRecord, UNetMap
from unet_surgery.ops import rewrite
from unet_surgery.ops.hidiffusion import RauSetting, SizeLink, rau_block_, rau_conv_
from unet_surgery.passes.base import (
    FilterFn,
    LayerRewrite,
    PassHandler,
    Plan,
    register_pass,
    selection,
    step_position,
)
from unet_surgery.runtime import UNetCall


def _install(module: nn.Module, source: Any, extras: dict[str, Any]) -> None:
    if isinstance(module, nn.Conv2d):
        rau_conv_(module, source)
    else:
        rau_block_(module, source)


RAU_NET = LayerRewrite(
    name="rau_net",
    group="rau_net",
    off=None,
    install=_install,
    restore=rewrite.restore,
    summary=lambda s: None if s is None else {"rau_net": s.side if s.reduce else f"{s.side}, keeps the size"},
)
"""A RAU-Net conv or transformer (:mod:`unet_surgery.ops.hidiffusion`); None is plain."""


@dataclass(frozen=True)
class RauNetPass(PassConfig):
    """HiDiffusion's RAU-Net: one more 2x reduction on the down path, undone on the up path."""

    type: ClassVar[str] = "rau_net"
    select: Selector = doc(
        "the down-path side: one stride-2 3x3 conv (downsampler form), or the spatial "
        "self-attention ops of one level's down stage (pooling form)"
    )
    switch: float = doc("switching ratio (published T1_ratio / T2_ratio): active while step < int(steps * switch)")
    start: float = doc(
        "first active step as a ratio: int(steps * start) <= step (aggressive RAU-Net: 8/50)", default=0.0
    )
    pool_after: int = doc("pooling form: pool after this transformer of the down stage (0 = first)", default=0)
    restore_after: int | None = doc(
        "pooling form: restore after this transformer of the up stage; default (and the only value "
        "whose skips fit): the last one before the up stage takes an unpooled skip, "
        "n_down - 1 - pool_after (SD1.5/SDXL: 1, as published)",
        default=None,
    )
    steps: int = doc("steps assumed when the sampler's timestep list is unknown", default=50)

    def validate(self, where: str) -> None:
        for name in ("switch", "start"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(f"{where}.{name}", f"must be a ratio in [0, 1], got {getattr(self, name)}")
        if self.pool_after < 0 or (self.restore_after is not None and self.restore_after < 0):
            fail(where, "pool_after and restore_after must be >= 0")
        if self.steps < 1:
            fail(f"{where}.steps", f"must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class RauEntry:
    """One side of a RAU-Net pair: the pass config, the side and the pass index (the pair key).

    ``level`` is None for the pair itself; for a size role (a sampler conv below the pair,
    see the module docstring) it is the level whose size the role keeps.
    """

    config: RauNetPass
    side: str
    index: int
    min_latent: int  # 2**(D+1), D the map's deepest level: see room_to_shrink
    level: int | None = None


@dataclass(frozen=True)
class RauLayer:
    """Every RAU-Net role one layer has: pair sides first, then size roles, each in pass order.

    Several passes may give one conv a role (SDXL at 4x: the level-1 downsampler is the
    downsampler pair's down side and, for the pooling pair, the sampler that keeps level
    1's size); the first role whose pass is active decides the layer's setting.
    """

    roles: tuple[RauEntry, ...]

    def with_role(self, role: RauEntry) -> RauLayer:
        roles = [*self.roles, role]
        return RauLayer(tuple(sorted(roles, key=lambda r: (r.level is not None, r.index))))


def _link(patch: Any, index: int) -> SizeLink:
    """The size link of pair ``index``: in the patch's state slot of that pass, one per pair
    (the official code keeps separate state per pair)."""
    slot = patch.state.slot(index)
    link = slot.get("link")
    if link is None:
        link = slot["link"] = SizeLink()
    return link


def _size_link(patch: Any, level: int) -> SizeLink:
    """The size link of ``level``'s samplers, shared by the passes of this type (only one role
    acts on a call, and its down and up side decide alike)."""
    slot = patch.state.slot(RauNetPass.type)
    link = slot.get(level)
    if link is None:
        link = slot[level] = SizeLink()
    return link


def step_window_open(patch: Any, config: RauNetPass, call: UNetCall | None) -> bool:
    """The official switching rule on ``call``: ``int(n * start) <= i < int(n * switch)``."""
    position = step_position(patch, call, config.steps)
    if position is None:
        return False
    i, n = position
    return int(n * config.start) <= i < int(n * config.switch)


def room_to_shrink(entry: RauEntry, call: UNetCall | None) -> bool:
    """Whether ``call``'s latent is large enough for RAU-Net's extra halving.

    With the deepest level ``D``, the deepest map is ``latent / 2**D``; RAU-Net halves it once
    more, so the latent must be at least ``2**(D + 1)`` per side (``entry.min_latent``) to keep
    a pixel there. On a smaller call (a 24-pixel SD1.5 image) the official code reaches empty
    or 1x1 maps that GroupNorm refuses, while the plain model runs it. Our rule: RAU-Net stays
    off on such a call.
    """
    return call is not None and min(call.latent_hw) >= entry.min_latent


def transformer_path(rec: AttentionRecord) -> str:
    """The spatial transformer owning an attention op (diffusers and LDM: ``<x>.transformer_blocks.k.attnN``)."""
    head, sep, _ = rec.path.rpartition(".transformer_blocks.")
    if not sep:
        raise SelectionError(f"{rec.path} is not inside a spatial transformer (no .transformer_blocks.)")
    return head


def transformers(records: list[AttentionRecord]) -> list[str]:
    """Transformer paths of ``records``, in execution order."""
    first: dict[str, int] = {}
    for rec in records:
        path = transformer_path(rec)
        first[path] = min(first.get(path, rec.order), rec.order)
    return sorted(first, key=first.__getitem__)


def _spatial_self(rec: AttentionRecord) -> bool:
    return rec.kind == "self" and rec.axis == "spatial"


def upsampler_conv(unet_map: UNetMap, level: int) -> ConvRecord:
    """The conv right after the upsampling into ``level``: the first 3x3 conv of the up stage there,
    preceded (in execution order) by a conv one level deeper."""
    convs = sorted((c for c in unet_map.convs if c.axis == "spatial"), key=lambda c: c.order)
    for k, conv in enumerate(convs):
        if conv.stage == "up" and conv.level == level and conv.spatial_kernel == (3, 3):
            if k > 0 and convs[k - 1].level == level + 1:
                return conv
            break
    raise SelectionError(f"no upsampler conv into level {level} found in {unet_map.model_class}")


def downsampler_conv(unet_map: UNetMap, level: int) -> ConvRecord | None:
    """The stride-2 3x3 conv that takes ``level`` one level deeper (None: the level has none,
    e.g. the deepest one, or a model that downsamples by pooling)."""
    found = [c for c in unet_map.convs if c.axis == "spatial" and c.stage == "down" and c.level == level
             and c.spatial_kernel == (3, 3) and c.spatial_stride == (2, 2)]
    return found[0] if len(found) == 1 else None


def restore_point(n_down: int, pool_after: int) -> int:
    """The up transformer after which the pooled size is restored.

    The down stage's skips after transformer ``pool_after`` are pooled; the up stage takes
    them in reverse, so up resnet ``j`` takes down skip ``n_down - 1 - j`` (``j = n_down``: the
    level's input). The first unpooled skip is taken by resnet ``n_down - pool_after``, so
    the size is restored after the transformer before it. SD1.5/SDXL (two per down stage,
    pooling after the first): 1, the published ``i == 1``.
    """
    return n_down - 1 - pool_after


@register_pass
class RauNetHandler(PassHandler[RauNetPass]):
    """Plans the down layer and its up partner; both act while the switching window is open."""

    type = "rau_net"
    config = RauNetPass
    rewrite = RAU_NET

    def plan(self, config: RauNetPass, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> None:
        where = f"passes[{index}] (rau_net)"
        records = selection(config, index, unet_map, plan, filter_fn).records
        convs = [r for r in records if isinstance(r, ConvRecord)]
        attns = [r for r in records if isinstance(r, AttentionRecord)]
        if convs and attns:
            raise SelectionError(f"{where}: select either one downsampler conv or attention ops, not both")
        if convs:
            if len(convs) != 1:
                raise SelectionError(f"{where}: the downsampler form takes one conv, got {[c.path for c in convs]}")
            down = convs[0]
            if (down.op, down.spatial_kernel, down.spatial_stride, down.stage) != ("conv2d", (3, 3), (2, 2), "down"):
                raise SelectionError(f"{where}: {down.path} is not a stride-2 3x3 conv2d of the down stage")
            assert down.level is not None
            level = down.level
            up = upsampler_conv(unet_map, level)
            pair: list[tuple[str, ConvRecord | None, str]] = [(down.path, down, "down"), (up.path, up, "up")]
        else:
            levels = {r.level for r in attns}
            if not attns or not all(_spatial_self(r) and r.stage == "down" for r in attns) or len(levels) != 1:
                raise SelectionError(
                    f"{where}: the pooling form selects spatial self-attention of one level's down stage"
                )
            only = levels.pop()
            assert only is not None
            level = only
            downs = transformers(attns)
            ups = transformers([a for a in unet_map.attentions if _spatial_self(a) and a.stage == "up" and a.level == level])
            restore = restore_point(len(downs), config.pool_after) if config.pool_after < len(downs) else -1
            if restore < 0 or restore >= len(ups) or config.restore_after not in (None, restore):
                raise SelectionError(
                    f"{where}: level {level} has {len(downs)} down and {len(ups)} up transformers; "
                    f"pool_after={config.pool_after}, restore_after={config.restore_after} do not fit "
                    f"(the up stage takes its first unpooled skip after transformer {restore})"
                )
            pair = [(downs[config.pool_after], None, "down"), (ups[restore], None, "up")]
        deepest = max((r.level for r in unet_map.convs if r.level is not None), default=0)
        min_latent = 2 ** (deepest + 1)
        for path, rec, side in pair:
            self._add(plan, path, rec, RauEntry(config, side, index, min_latent), index)
        # Size roles: the samplers of every level whose size derives from the reduced one.
        first = level + 1 if convs else level
        for kept in range(first, deepest):
            down_conv = downsampler_conv(unet_map, kept)
            if down_conv is None:
                continue
            up_conv = upsampler_conv(unet_map, kept)
            for rec, side in ((down_conv, "down"), (up_conv, "up")):
                self._add(plan, rec.path, rec, RauEntry(config, side, index, min_latent, kept), index)

    def _add(self, plan: Plan, path: str, rec: ConvRecord | None, role: RauEntry, index: int) -> None:
        layer = plan.layers.get(path)
        prior = layer.entry(self.type) if layer is not None else None
        plan.add(path, rec, self, (prior or RauLayer(())).with_role(role), index)

    def describe(self, entry: RauLayer) -> str:
        rows = []
        for role in entry.roles:
            c = role.config
            what = role.side if role.level is None else f"{role.side} sampler keeping level {role.level}'s size"
            rows.append(f"{what}, steps [{c.start:g}, {c.switch:g}) of the trajectory")
        return "; ".join(rows)

    def setting(self, patch: Any, entry: RauLayer, branch: str, call: UNetCall | None, current: Any) -> RauSetting | None:
        for role in entry.roles:
            if not step_window_open(patch, role.config, call) or not room_to_shrink(role, call):
                continue
            if role.level is None:
                return RauSetting(side=role.side, link=_link(patch, role.index))  # type: ignore[arg-type]
            return RauSetting(side=role.side, link=_size_link(patch, role.level), reduce=False)  # type: ignore[arg-type]
        return current

    def no_effect_reasons(self, config: RauNetPass, index: int, recipe: Recipe, plan: Plan | None) -> list[str]:
        if config.switch <= config.start:
            return [f"switch {config.switch:g} <= start {config.start:g}: the window is empty"]
        return []
