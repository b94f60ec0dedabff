"""``map_unet``: the one entry point that turns any UNet into a :class:`UNetMap`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from torch import nn

from unet_surgery.errors import MappingError
from unet_surgery.graph import cache as map_cache
from unet_surgery.graph.analysis import analyse_graph
from unet_surgery.graph.capture import export_unet, unambiguous_latent_hw
from unet_surgery.graph.inputs import ProbeSpec, probe_spec
from unet_surgery.graph.probe import probe_unet
from unet_surgery.graph.records import UNetMap

Method = Literal["auto", "export", "probe"]
DEFAULT_PROBE: dict[str, Any] = {"latent_hw": [128, 128], "frames": 2, "method": "auto"}
"""The probe settings of ``map_unet(model)`` as the map cache keys them."""


def map_unet(
    model: nn.Module,
    *,
    inputs: dict[str, Any] | None = None,
    sample_key: str | None = None,
    latent_hw: tuple[int, int] = (128, 128),
    frames: int = 2,
    method: Method = "auto",
    cache: bool = True,
) -> UNetMap:
    """Map the convolutions, attention ops and skip connections of a diffusion UNet.

    The model is exported with ``torch.export`` and the graph is read for levels, stages and
    attention roles. Mapping runs on fake tensors: it works on ``meta`` models and never changes
    the model. With the default inputs the export is static, at a latent size no other number
    in the graph can equal (:func:`~unet_surgery.graph.capture.unambiguous_latent_hw`), which
    reads the same map as a symbolic-size export at a fraction of its cost; where that size is
    not safe or the export fails, height and width are symbolic. With ``method="auto"`` a model
    that cannot be exported that way either is exported with fixed sizes, and failing that
    mapped by forward hooks (``method="probe"``), in which case stages and skips are reported
    unknown.

    Args:
        model: a diffusers UNet, an LDM ``UNetModel`` or any module taking ``inputs``.
        inputs: example keyword arguments; built from the model's class when omitted.
        sample_key: which of ``inputs`` is the latent (default: the first one).
        latent_hw: latent height and width of the probe input.
        frames: number of frames for video UNets.
        method: ``"auto"``, ``"export"`` or ``"probe"``.
        cache: reuse the map of an identical architecture (:mod:`unet_surgery.graph.cache`);
            only for the default probe inputs (``inputs=None``).
    """
    if not isinstance(model, nn.Module):
        raise MappingError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if cache and inputs is None:
        probe = {"latent_hw": list(latent_hw), "frames": frames, "method": method}
        return map_cache.cached_map(
            model, probe, lambda: map_unet(model, latent_hw=latent_hw, frames=frames, method=method, cache=False)
        )
    spec = _spec(model, inputs, sample_key, latent_hw, frames)
    errors: list[str] = []
    if method in ("auto", "export") and inputs is None:
        static_first = _static_first(model, spec, latent_hw, frames)
        if static_first is not None:
            return static_first
    if method in ("auto", "export"):
        for dynamic in (True, False):
            try:
                captured = export_unet(model, spec, dynamic=dynamic)
            except MappingError:
                raise
            except Exception as exc:  # export raises many types; record and fall back
                errors.append(f"torch.export ({'dynamic' if dynamic else 'static'}): {_first_line(exc)}")
                continue
            unet_map = analyse_graph(captured, model, spec)
            unet_map.notes.extend(errors)
            return unet_map
        if method == "export":
            raise MappingError("could not export the model: " + "; ".join(errors))
    try:
        unet_map = probe_unet(model, spec)
    except Exception as exc:
        reasons = "; ".join([*errors, f"forward on the probe input: {_first_line(exc)}"])
        raise MappingError(f"could not map {type(model).__name__}: {reasons}") from exc
    if not unet_map.convs:
        raise MappingError(f"{type(model).__name__} is not a UNet: it has no convolution")
    unet_map.notes.extend(errors)
    return unet_map


def _static_first(model: nn.Module, spec: ProbeSpec, latent_hw: tuple[int, int], frames: int) -> UNetMap | None:
    """The map read off a static export at an unambiguous latent size, or None.

    None when the model's sizes could collide with that latent size or the export fails;
    the mapper then exports with symbolic sizes, as it would have without this shortcut.
    """
    safe_hw = unambiguous_latent_hw(model, spec, latent_hw)
    if safe_hw is None:
        return None
    safe = probe_spec(model, latent_hw=safe_hw, frames=frames)
    try:
        captured = export_unet(model, safe, dynamic=False, unambiguous=True)
    except MappingError:
        raise
    except Exception:  # the symbolic export that follows reports why a model does not export
        return None
    unet_map = analyse_graph(captured, model, safe)
    return replace(unet_map, probe_latent=tuple(int(s) for s in spec.kwargs[spec.sample_key].shape))


def _spec(
    model: nn.Module,
    inputs: dict[str, Any] | None,
    sample_key: str | None,
    latent_hw: tuple[int, int],
    frames: int,
) -> ProbeSpec:
    if inputs is None:
        return probe_spec(model, latent_hw=latent_hw, frames=frames)
    if not inputs:
        raise MappingError("inputs= is empty: give the keyword arguments of one forward call")
    key = sample_key or next(iter(inputs))
    sample = inputs.get(key)
    if sample is None or sample.dim() < 4:
        raise MappingError(f"inputs[{key!r}] must be a latent of at least 4 dims (B, C, H, W)")
    nd = sample.dim()
    return ProbeSpec(dict(inputs), key, (nd - 2, nd - 1), int(sample.shape[0]), None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
