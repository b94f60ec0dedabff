"""Read the UNet map off an exported graph: levels, stages, attention roles and skip connections.

Everything is derived from dataflow and shapes, never from layer names, so diffusers
(``down_blocks.1.resnets.0.conv1``) and LDM (``input_blocks.4.0.in_layers.2``) layouts map alike.

* level: log2(latent size / feature size), read from the symbolic height and width (or from
  concrete ones that nothing else can equal, see :func:`~unet_surgery.graph.capture.unambiguous_latent_hw`);
* stage: the up path starts at the first skip concatenation and the down path ends at the last
  feature saved for one; what lies between is the mid stage;
* self vs cross attention: whether queries and keys are projected from the same tensor;
* spatial vs temporal attention: whether the sequence length depends on height and width.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import sympy
import torch
from torch import fx, nn

from unet_surgery.errors import MappingError
from unet_surgery.graph.capture import CapturedGraph
from unet_surgery.graph.inputs import ProbeSpec
from unet_surgery.graph.records import AttentionRecord, ConvRecord, SkipRecord, Stage, UNetMap

aten = torch.ops.aten

_CONV_TARGETS = {
    aten.conv1d.default: "conv1d",
    aten.conv2d.default: "conv2d",
    aten.conv3d.default: "conv3d",
    aten.convolution.default: None,  # rank decided from the weight
}
_PROJECTIONS = {aten.linear.default, aten.addmm.default, aten.mm.default, *_CONV_TARGETS}
_SCORE_PRODUCTS = {aten.bmm.default, aten.matmul.default, aten.einsum.default, aten.baddbmm.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_CAT = {aten.cat.default}


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node: Any) -> tuple[Any, ...] | None:
    val = _val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _expr(size: Any) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def module_path(node: fx.Node) -> str | None:
    """Qualified name of the innermost module whose forward produced ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _cls = list(stack.values())[-1]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # Non-strict export already gives qualified names; strip what strict mode would add.
    for prefix in ("L['self'].", "L__self__."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)
_SYMBOL_CHECKS = {aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}


def _record_order(nodes: list[fx.Node]) -> dict[fx.Node, int]:
    """Each node's position among the nodes a static export has too.

    A symbolic export adds size arithmetic (``sym_size``, products of sizes, range checks) that
    a static export folds into constants; leaving it out makes a record's ``order`` the same
    whichever way the model was exported.
    """
    order: dict[fx.Node, int] = {}
    count = 0
    for node in nodes:
        order[node] = count
        if not (isinstance(node.meta.get("val"), _SYMBOLIC) or node.target in _SYMBOL_CHECKS):
            count += 1
    return order


class _GraphFacts:
    """Per-node facts computed once: order, sample dependency and resolution level."""

    def __init__(self, captured: CapturedGraph, spec: ProbeSpec) -> None:
        self.graph = captured.graph
        self.captured = captured
        self.exact = captured.dynamic or captured.unambiguous  # spatial sizes known as such
        self.nodes = list(self.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.order = _record_order(self.nodes)
        self.sample = self._find_sample(captured, spec)
        shape = _shape(self.sample)
        assert shape is not None
        hd, wd = spec.spatial_dims
        self.latent_h, self.latent_w = _expr(shape[hd]), _expr(shape[wd])
        self.frames = spec.frames
        self.depends: dict[fx.Node, bool] = {}
        self.level: dict[fx.Node, int | None] = {}
        for node in self.nodes:
            inputs = [i for i in _data_inputs(node) if self.depends.get(i)]
            self.depends[node] = node is self.sample or bool(inputs)
            own = self.level_of_shape(_shape(node)) if self.depends[node] else None
            if own is None and inputs:
                own = next((self.level[i] for i in inputs if self.level[i] is not None), None)
            self.level[node] = own

    @staticmethod
    def _find_sample(captured: CapturedGraph, spec: ProbeSpec) -> fx.Node:
        user_inputs = captured.program.graph_signature.user_inputs
        placeholders = {n.name: n for n in captured.graph.nodes if n.op == "placeholder"}
        for name in user_inputs:
            if name == spec.sample_key or name.endswith(spec.sample_key):
                return placeholders[name]
        raise MappingError(f"could not find the latent input {spec.sample_key!r} in the exported graph")

    def level_of_shape(self, shape: tuple[Any, ...] | None) -> int | None:
        """log2(latent / feature) when the last two dims are a feature map's height and width."""
        if shape is None or len(shape) < 4:
            return None
        h, w = _expr(shape[-2]), _expr(shape[-1])
        if self.exact and not (self.captured.is_spatial(h) and self.captured.is_spatial(w)):
            return None
        if h == 0 or w == 0:
            return None
        rh, rw = sympy.simplify(self.latent_h / h), sympy.simplify(self.latent_w / w)
        if not (rh.is_number and rw.is_number) or rh != rw:
            return None
        ratio = float(rh)
        if ratio < 1 or not math.isclose(math.log2(ratio), round(math.log2(ratio))):
            return None
        return round(math.log2(ratio))

    def spatial_seq(self, size: Any, level: int | None) -> bool | None:
        """Is a token count the number of pixels of a feature map (True) or frames (False)?"""
        expr = _expr(size)
        if self.exact:
            return self.captured.is_spatial(expr)
        if level is not None and expr == sympy.simplify(self.latent_h * self.latent_w / 4**level):
            return True
        if self.frames is not None and expr == self.frames:
            return False
        return None

    def is_ancestor(self, a: fx.Node, b: fx.Node) -> bool:
        """True if ``a`` feeds ``b`` through the data path."""
        limit = self.index[a]
        seen = {b}
        todo = [b]
        while todo:
            node = todo.pop()
            for parent in _data_inputs(node):
                if parent is a:
                    return True
                if parent not in seen and self.index[parent] > limit and self.depends.get(parent):
                    seen.add(parent)
                    todo.append(parent)
        return False


_ALIASES = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.alias.default,
    aten.detach.default,
    aten.clone.default,
    aten.contiguous.default,
}


def _unalias(node: fx.Node) -> fx.Node:
    """Skip same-shape no-op nodes (``x.float()`` on fp32 and the like) to the real producer.

    Tracing re-binds a tensor to the last op that returned it, so a skip saved before such an
    op appears to come from the consumer's module.
    """
    while node.op == "call_function" and node.target in _ALIASES:
        parent = node.args[0]
        if not isinstance(parent, fx.Node) or _shape(parent) != _shape(node):
            break
        node = parent
    return node


def _projection_source(node: fx.Node, limit: int = 64) -> fx.Node | None:
    """Walk back from an attention operand to the tensor its q/k/v projection was applied to."""
    current = node
    for _ in range(limit):
        if current.op != "call_function":
            return None
        if current.target in _PROJECTIONS:
            if current.target is aten.addmm.default:
                return current.args[1]  # type: ignore[return-value]
            return current.args[0]  # type: ignore[return-value]
        inputs = [a for a in current.args if isinstance(a, fx.Node)]
        if not inputs:
            return None
        current = inputs[0]
    return None


def _score_operands(core: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(query, key) operands of an attention core: sdpa directly, softmax through q @ k^T."""
    if "scaled_dot_product" in str(core.target):
        return core.args[0], core.args[1]  # type: ignore[return-value]
    current = core.args[0]
    for _ in range(8):
        if not isinstance(current, fx.Node) or current.op != "call_function":
            return None
        if current.target in _SCORE_PRODUCTS:
            if current.target is aten.einsum.default:
                q, k = current.args[1][0], current.args[1][1]  # type: ignore[index]
            elif current.target is aten.baddbmm.default:
                q, k = current.args[1], current.args[2]
            else:
                q, k = current.args[0], current.args[1]
            return q, k  # type: ignore[return-value]
        if current.target is operator.getitem:
            current = current.args[0]
            continue
        operands = [a for a in current.args if isinstance(a, fx.Node) and a.op != "get_attr"]
        if _is_higher_order(current) and len(operands) == 2:
            # q @ k^T inside a wrapped region (e.g. LDM's autocast-disabled block).
            return operands[0], operands[1]
        current = current.args[0]
    return None


def _is_higher_order(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.HigherOrderOperator)


def _attention_cores(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    cores = []
    for node in nodes:
        if node.op != "call_function":
            continue
        if "scaled_dot_product" in str(node.target) or node.target in _SOFTMAX:
            cores.append(node)
    return cores


def _conv_record(node: fx.Node, model: nn.Module, facts: _GraphFacts, path: str) -> ConvRecord:
    weight_shape = _shape(node.args[1])
    assert weight_shape is not None
    rank = len(weight_shape) - 2
    op = _CONV_TARGETS.get(node.target) or f"conv{rank}d"  # type: ignore[call-overload]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if isinstance(module, nn.modules.conv._ConvNd):
        stride, dilation, padding = module.stride, module.dilation, module.padding
        groups = module.groups
        if isinstance(padding, str):  # 'same' / 'valid'
            padding = tuple(
                (d * (k - 1)) // 2 if padding == "same" else 0
                for k, d in zip(module.kernel_size, dilation, strict=True)
            )
    else:  # a functional conv inside a custom module: read the call's arguments
        stride, padding, dilation = node.args[3:6] if len(node.args) >= 6 else ((1,) * rank,) * 3  # type: ignore[assignment]
        groups = node.args[-1] if isinstance(node.args[-1], int) else 1
    kernel = tuple(int(k) for k in weight_shape[2:])
    if op == "conv3d":
        kt, spatial = kernel[0], kernel[1:]
        if max(spatial) == 1 and kt > 1:
            axis = "temporal"
        elif kt > 1:
            axis = "spatiotemporal"
        else:
            axis = "spatial"
    elif op == "conv1d":
        axis = "temporal"
    else:
        axis = "spatial"
    return ConvRecord(
        path=path,
        op=op,  # type: ignore[arg-type]
        kernel=kernel,
        stride=tuple(int(s) for s in stride),
        dilation=tuple(int(d) for d in dilation),
        padding=tuple(int(p) for p in padding),
        in_channels=int(weight_shape[1]) * int(groups),
        out_channels=int(weight_shape[0]),
        groups=int(groups),
        level=facts.level.get(node.args[0]),  # type: ignore[arg-type]
        out_level=facts.level.get(node),
        stage=None,
        axis=axis,  # type: ignore[arg-type]
        order=facts.order[node],
    )


def analyse_graph(captured: CapturedGraph, model: nn.Module, spec: ProbeSpec) -> UNetMap:
    """Build the :class:`UNetMap` of ``model`` from its exported graph."""
    facts = _GraphFacts(captured, spec)
    notes: list[str] = []

    # Convolutions, first call of each module.
    convs: dict[str, ConvRecord] = {}
    conv_nodes: dict[str, fx.Node] = {}
    for node in facts.nodes:
        if node.op == "call_function" and node.target in _CONV_TARGETS and facts.depends[node]:
            path = module_path(node) or f"<functional conv {node.name}>"
            if path in convs:
                notes.append(f"{path} is called more than once; the map records its first call")
                continue
            convs[path] = _conv_record(node, model, facts, path)
            conv_nodes[path] = node

    # Attention ops, one per owning module.
    attentions: dict[str, AttentionRecord] = {}
    for core in _attention_cores(facts.nodes):
        if not facts.depends[core]:
            continue
        operands = _score_operands(core)
        if operands is None:
            continue
        path = module_path(core) or f"<functional attention {core.name}>"
        if path in attentions:
            continue
        q_src, k_src = (_projection_source(o) for o in operands)
        kind = None if q_src is None or k_src is None else "self" if q_src is k_src else "cross"
        q_shape = _shape(q_src) if q_src is not None else None
        level = facts.level.get(q_src) if q_src is not None else None
        axis = None
        if q_shape is not None and len(q_shape) >= 2:
            spatial = facts.spatial_seq(q_shape[-2], level)
            axis = None if spatial is None else ("spatial" if spatial else "temporal")
        attentions[path] = AttentionRecord(
            path=path,
            op="attention",
            kind=kind,  # type: ignore[arg-type]
            axis=axis,  # type: ignore[arg-type]
            level=level,
            stage=None,
            query_dim=int(q_shape[-1]) if q_shape else None,
            order=facts.order[core],
        )

    # Skip concatenations: a channel cat of two feature maps where one operand feeds the other.
    skips: list[SkipRecord] = []
    source_positions: list[int] = []
    for node in facts.nodes:
        if node.op != "call_function" or node.target not in _CAT or not facts.depends[node]:
            continue
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
            continue
        shapes = [_shape(t) for t in tensors]
        if any(s is None or len(s) < 4 for s in shapes):
            continue
        if dim not in (1, 1 - len(shapes[0])):  # type: ignore[arg-type]
            continue
        a, b = (_unalias(t) for t in tensors)
        if facts.is_ancestor(a, b):
            skip, hidden, skip_first = a, b, True
        elif facts.is_ancestor(b, a):
            skip, hidden, skip_first = b, a, False
        else:
            continue
        skips.append(
            SkipRecord(
                path=module_path(node) or "",
                source=module_path(skip),
                level=facts.level.get(node),
                hidden_channels=int(_shape(hidden)[1]),  # type: ignore[index]
                skip_channels=int(_shape(skip)[1]),  # type: ignore[index]
                skip_first=skip_first,
                order=facts.order[node],
            )
        )
        source_positions.append(facts.order[skip])

    if not skips:
        raise MappingError(
            f"{type(model).__name__} is not a UNet: its graph has no skip-connection concatenation "
            "(a channel concat of a down-path feature into the up path)"
        )
    down_end = max(source_positions)
    up_start = min(s.order for s in skips)

    def stage_of(order: int) -> Stage:
        if order <= down_end:
            return "down"
        if order >= up_start:
            return "up"
        return "mid"

    conv_records = [
        replace(rec, stage=stage_of(rec.order)) for rec in sorted(convs.values(), key=lambda r: r.order)
    ]
    attn_records = [
        replace(rec, stage=stage_of(rec.order)) for rec in sorted(attentions.values(), key=lambda r: r.order)
    ]
    levels = [r.level for r in conv_records if r.level is not None]
    unknown = sorted(
        {f"{type(r).__name__}.{f}" for r in attn_records for f in ("kind", "axis", "level") if getattr(r, f) is None}
        | {f"ConvRecord.{f}" for r in conv_records for f in ("level",) if getattr(r, f) is None}
    )
    sample_shape = _shape(facts.sample)
    probe_latent = tuple(int(s) if not isinstance(s, torch.SymInt) else int(s.node.hint) for s in sample_shape or ())
    return UNetMap(
        model_class=type(model).__name__,
        method="export" if facts.exact else "export-static",
        convs=conv_records,
        attentions=attn_records,
        skips=skips,
        num_levels=max(levels) + 1 if levels else 0,
        probe_latent=probe_latent,
        unknown_fields=unknown,
        notes=sorted(set(notes)),
    )
