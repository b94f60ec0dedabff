"""Capture a UNet as a torch.fx graph with ``torch.export``.

``torch.fx.symbolic_trace`` cannot trace diffusers or LDM UNets (Python control flow on shapes),
so we export non-strictly with symbolic height and width. Export runs on fake tensors: it works
on ``meta`` models and never computes with (or changes) real weights. Symbolic spatial sizes
also make resolution levels exact: a feature map's height is ``latent_h / 2**level`` as a
symbolic expression, which nothing else in the graph can be mistaken for.

A symbolic export costs about four times a static one, so the mapper first exports statically
at a latent size chosen so that concrete sizes are as unambiguous as symbolic ones
(:func:`unambiguous_latent_hw`): height and width carry distinct odd prime factors that no
parameter, buffer or other input of the model has, so a feature map's height and width (and
its token count) are the only sizes in the graph divisible by them.
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
# The static-first export's latent height and width are these odd primes times the power of two
# of the requested size: distinct (so h != w), and neither divides any SD-family width (powers of
# two times 3 and 5, 77 tokens, 2816 = 2**8 * 11 added embeddings...).
ODD_FACTORS = (13, 17)


@dataclass
class CapturedGraph:
    program: ExportedProgram
    dynamic: bool  # True when height and width are symbolic
    # True for a static export at an unambiguous_latent_hw size: a size is spatial exactly when
    # one of ODD_FACTORS divides it, as a symbolic size is exactly when it has a free symbol.
    unambiguous: bool = False

    def is_spatial(self, size: Any) -> bool | None:
        """Is ``size`` (an int or SymInt expression) derived from the latent's height or width?

        None when the export cannot tell (a static export at an arbitrary size).
        """
        if self.dynamic:
            return bool(getattr(size, "free_symbols", None))
        if self.unambiguous:
            return int(size) != 0 and any(int(size) % p == 0 for p in ODD_FACTORS)
        return None

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph


def _largest_multiple(size: int) -> int:
    # The free symbol's example value must be >= 2: export specialises sizes 0 and 1.
    m = SPATIAL_MULTIPLE
    while m > 1 and (size % m or size // m < 2):
        m //= 2
    return m


def unambiguous_latent_hw(model: nn.Module, spec: ProbeSpec, latent_hw: tuple[int, int]) -> tuple[int, int] | None:
    """A latent (height, width) whose sizes cannot be confused with any other size, or None.

    The height is ``13 * m_h`` and the width ``17 * m_w``, ``m`` the multiple a symbolic export
    would use for ``latent_hw`` (so the size lies in that export's domain). A size derived from
    them keeps the prime factor, so when no size the model is built from has it -- parameter,
    buffer and non-latent input dimensions, the frame count, every integer setting of a module
    (heads, groups, head sizes...) or of the diffusers config -- a size divisible by 13 or 17 is
    spatial: the static graph tells spatial sizes from frames, tokens, channels and heads exactly
    as symbolic sizes do. None when some size collides.
    """
    sizes: set[int] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        sizes.update(int(s) for s in tensor.shape)
    for module in model.modules():
        sizes.update(_integers(vars(module).values()))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "values"):
        sizes.update(_integers(config.values()))
    for key, value in spec.kwargs.items():
        values = value.values() if isinstance(value, dict) else [value]
        if key != spec.sample_key:
            sizes.update(int(s) for v in values if isinstance(v, torch.Tensor) for s in v.shape)
    if spec.frames is not None:
        sizes.add(spec.frames)
    if any(s % p == 0 for s in sizes if s > 1 for p in ODD_FACTORS):
        return None
    (fh, fw), (h, w) = ODD_FACTORS, latent_hw
    return fh * _largest_multiple(h), fw * _largest_multiple(w)


def _integers(values: Any) -> list[int]:
    """The integers among ``values``, one level into lists and tuples (bools excluded)."""
    out: list[int] = []
    for value in values:
        items = value if isinstance(value, (list, tuple)) else [value]
        out += [int(v) for v in items if isinstance(v, int) and not isinstance(v, bool)]
    return out


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


def export_unet(
    model: nn.Module, spec: ProbeSpec, *, dynamic: bool = True, unambiguous: bool = False
) -> CapturedGraph:
    """Export ``model`` called with ``spec.kwargs``; symbolic height/width when ``dynamic``.

    ``unambiguous``: the caller vouches that ``spec``'s latent size comes from
    :func:`unambiguous_latent_hw` for this model (read sizes as :meth:`CapturedGraph.is_spatial`).

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
    return CapturedGraph(program=program, dynamic=dynamic, unambiguous=unambiguous and not dynamic)
