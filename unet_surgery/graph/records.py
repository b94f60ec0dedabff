"""The UNet map: one record per convolution, attention op and skip concatenation.

Records are plain frozen dataclasses so a map prints, serialises to JSON and compares cheaply.
A field whose value could not be determined is ``None`` and is listed in
``UNetMap.unknown_fields``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Stage = Literal["down", "mid", "up"]
Axis = Literal["spatial", "temporal", "spatiotemporal"]


@dataclass(frozen=True)
class ConvRecord:
    """A convolution as the graph calls it. ``level`` is that of its input feature map."""

    path: str
    op: Literal["conv1d", "conv2d", "conv3d"]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]
    in_channels: int
    out_channels: int
    groups: int
    level: int | None
    out_level: int | None
    stage: Stage | None
    axis: Axis
    order: int  # position of the first call in execution order

    @property
    def spatial_kernel(self) -> tuple[int, ...]:
        return self.kernel[-2:]

    @property
    def spatial_stride(self) -> tuple[int, ...]:
        return self.stride[-2:]


@dataclass(frozen=True)
class AttentionRecord:
    """An attention op, identified by the module that owns it (``attn1``, ``attn2``, ...)."""

    path: str
    op: Literal["attention"]
    kind: Literal["self", "cross"] | None
    axis: Literal["spatial", "temporal"] | None
    level: int | None
    stage: Stage | None
    query_dim: int | None
    order: int


@dataclass(frozen=True)
class SkipRecord:
    """A channel concatenation of the up path with a feature saved on the down path."""

    path: str  # module whose forward performs the concatenation
    source: str | None  # module that produced the saved (skip) feature
    level: int | None
    hidden_channels: int  # channels coming up from below
    skip_channels: int  # channels of the saved down-path feature
    skip_first: bool  # True if the skip operand comes first in the concatenation
    order: int


@dataclass
class UNetMap:
    """Everything the rest of unet-surgery knows about a UNet's structure."""

    model_class: str
    method: Literal["export", "export-static", "probe"]
    convs: list[ConvRecord]
    attentions: list[AttentionRecord]
    skips: list[SkipRecord]
    num_levels: int
    probe_latent: tuple[int, ...]
    unknown_fields: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # --- lookups -------------------------------------------------------------------------
    def conv(self, path: str) -> ConvRecord:
        for rec in self.convs:
            if rec.path == path:
                return rec
        raise KeyError(path)

    def attention(self, path: str) -> AttentionRecord:
        for rec in self.attentions:
            if rec.path == path:
                return rec
        raise KeyError(path)

    @property
    def records(self) -> list[ConvRecord | AttentionRecord]:
        return sorted([*self.convs, *self.attentions], key=lambda r: r.order)

    def paths(self) -> list[str]:
        return [r.path for r in self.records]

    # --- summaries -----------------------------------------------------------------------
    def level_summary(self) -> list[dict[str, Any]]:
        """Per level: spatial 3x3-class convs by stage, and attention counts by kind."""
        rows = []
        for level in range(self.num_levels):
            convs = [c for c in self.convs if c.level == level]
            spatial_k = [c for c in convs if c.axis != "temporal" and max(c.spatial_kernel) > 1]
            attns = [a for a in self.attentions if a.level == level]
            rows.append(
                {
                    "level": level,
                    "convs": len(convs),
                    "spatial_kxk": dict(Counter(c.stage for c in spatial_k)),
                    "temporal_convs": sum(c.axis == "temporal" for c in convs),
                    "self_attention": sum(a.kind == "self" and a.axis == "spatial" for a in attns),
                    "cross_attention": sum(a.kind == "cross" for a in attns),
                    "temporal_attention": sum(a.axis == "temporal" for a in attns),
                    "skips_in": sum(s.level == level for s in self.skips),
                }
            )
        return rows

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model_class": self.model_class,
            "method": self.method,
            "num_levels": self.num_levels,
            "probe_latent": list(self.probe_latent),
            "unknown_fields": list(self.unknown_fields),
            "notes": list(self.notes),
            "levels": self.level_summary(),
            "convs": [asdict(c) for c in self.convs],
            "attentions": [asdict(a) for a in self.attentions],
            "skips": [asdict(s) for s in self.skips],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetMap:
        def build(rec_cls: type, row: dict[str, Any]) -> Any:
            kwargs = {}
            for f in fields(rec_cls):
                value = row[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
            return rec_cls(**kwargs)

        return cls(
            model_class=data["model_class"],
            method=data["method"],
            convs=[build(ConvRecord, r) for r in data["convs"]],
            attentions=[build(AttentionRecord, r) for r in data["attentions"]],
            skips=[build(SkipRecord, r) for r in data["skips"]],
            num_levels=data["num_levels"],
            probe_latent=tuple(data["probe_latent"]),
            unknown_fields=list(data["unknown_fields"]),
            notes=list(data["notes"]),
        )

    # --- display -------------------------------------------------------------------------
    def table(self, *, layers: bool = False) -> str:
        """A plain-text report: header, per-level summary and optionally every layer."""
        lines = [
            f"{self.model_class}  (mapped by {self.method}, probe latent {tuple(self.probe_latent)})",
            f"levels: {self.num_levels}   convs: {len(self.convs)}   attention ops: {len(self.attentions)}"
            f"   skip concatenations: {len(self.skips)}",
        ]
        if self.unknown_fields:
            lines.append(f"unknown fields: {', '.join(self.unknown_fields)} (shown as ?)")
        lines.extend(f"note: {n}" for n in self.notes)
        unknown = set(self.unknown_fields)
        # A count over a field the mapper could not fill is unknown, not 0.
        stages_known = "ConvRecord.stage" not in unknown
        axes_known = "AttentionRecord.axis" not in unknown
        skips_known = "skips" not in unknown

        def count(value: int, known: bool) -> str:
            return str(value) if known else "?"

        if not skips_known:
            lines[1] = lines[1].rsplit("skip concatenations:", 1)[0] + "skip concatenations: ?"
        header = ("level", "kxk down", "kxk mid", "kxk up", "temporal conv", "self attn", "cross attn", "temporal attn", "skips")
        rows = [
            (
                str(r["level"]),
                count(r["spatial_kxk"].get("down", 0), stages_known),
                count(r["spatial_kxk"].get("mid", 0), stages_known),
                count(r["spatial_kxk"].get("up", 0), stages_known),
                str(r["temporal_convs"]),
                count(r["self_attention"], axes_known),
                str(r["cross_attention"]),
                count(r["temporal_attention"], axes_known),
                count(r["skips_in"], skips_known),
            )
            for r in self.level_summary()
        ]
        lines.append("")
        lines.extend(_format_rows(header, rows))
        if layers:
            lines.append("")
            layer_header = ("path", "op", "kernel", "stride", "level", "stage", "axis", "role")
            layer_rows: list[tuple[str, ...]] = []
            for rec in self.records:
                if isinstance(rec, ConvRecord):
                    layer_rows.append(
                        (rec.path, rec.op, "x".join(map(str, rec.kernel)), "x".join(map(str, rec.stride)),
                         _fmt(rec.level), _fmt(rec.stage), rec.axis, "")
                    )
                else:
                    layer_rows.append(
                        (rec.path, rec.op, "", "", _fmt(rec.level), _fmt(rec.stage), _fmt(rec.axis), _fmt(rec.kind))
                    )
            lines.extend(_format_rows(layer_header, layer_rows))
        return "\n".join(lines)


def _fmt(value: object) -> str:
    return "?" if value is None else str(value)


def _format_rows(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return out
