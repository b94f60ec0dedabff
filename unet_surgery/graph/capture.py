"""Capture a UNet as a torch.fx graph with ``torch.export``.

``torch.fx.symbolic_trace`` cannot trace diffusers or LDM UNets (Python control flow on shapes),
so we export non-strictly with symbolic height and width. Export runs on fake tensors: it works
on ``meta`` models and never computes with (or changes) real weights. Symbolic spatial sizes
also make resolution levels exact: a feature map's height is ``latent_h / 2**level`` as a
symbolic expression, which nothing else in the graph can be mistaken for.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from unet_surgery.graph.inputs import ProbeSpec

# Symbolic latent sizes are this multiple of a free symbol, so up to 6 halvings stay exact.
SPATIAL_MULTIPLE = 64


@dataclass
class CapturedGraph:
    program: ExportedProgram
    dynamic: bool  # True when height and width are symbolic

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph


def _largest_multiple(size: int) -> int:
    # The free symbol's example value must be >= 2: export specialises sizes 0 and 1.
    m = SPATIAL_MULTIPLE
    while m > 1 and (size % m or size // m < 2):
        m //= 2
    return m


def _dynamic_shapes(spec: ProbeSpec) -> dict[str, Any]:
    sample = spec.kwargs[spec.sample_key]
    hd, wd = spec.spatial_dims
    shapes: dict[str, Any] = {}
    for key, value in spec.kwargs.items():
        if key == spec.sample_key:
            mh, mw = _largest_multiple(sample.shape[hd]), _largest_multiple(sample.shape[wd])
            shapes[key] = {
                hd: mh * Dim("latent_h", min=1, max=4096 // mh),
                wd: mw * Dim("latent_w", min=1, max=4096 // mw),
            }
        elif isinstance(value, dict):
            shapes[key] = {k: None for k in value}
        else:
            shapes[key] = None
    return shapes


@contextlib.contextmanager
def _quiet_export():
    """Export logs warnings for every specialisation; the mapper reports what matters itself."""
    names = ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_unet(model: nn.Module, spec: ProbeSpec, *, dynamic: bool = True) -> CapturedGraph:
    """Export ``model`` called with ``spec.kwargs``; symbolic height/width when ``dynamic``.

    Raises whatever ``torch.export`` raises; the mapper decides how to fall back.
    """
    with _quiet_export(), torch.no_grad():
        program = torch.export.export(
            model,
            args=(),
            kwargs=dict(spec.kwargs),
            dynamic_shapes=_dynamic_shapes(spec) if dynamic else None,
            strict=False,
        )
    return CapturedGraph(program=program, dynamic=dynamic)
