"""The static-first export reads the same map as the symbolic-size export, at a fraction of the cost.

Expected side: the map of a symbolic-size export (``export_unet(..., dynamic=True)`` read by
``analyse_graph``), which is how ``map_unet`` mapped every preset before static-first; the
compared side is ``map_unet``'s default map (``preset_map``). Both are compared field by field
(``to_dict``: every record's level, stage, kind, axis, order, every skip, the levels summary,
unknown fields and notes).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from tests.conftest import _map_cache_dir, preset_map
from unet_surgery.graph import map_unet, mapper
from unet_surgery.graph.analysis import analyse_graph
from unet_surgery.graph.capture import export_unet, unambiguous_latent_hw
from unet_surgery.graph.inputs import probe_spec
from unet_surgery.graph.records import UNetMap
from unet_surgery.presets import PRESETS, build_unet

DEFAULT_HW = (128, 128)  # map_unet's default latent_hw


@functools.cache
def symbolic_map(name: str, size: str) -> UNetMap:
    """The preset's map from a symbolic height/width export (cached on disk like ``preset_map``)."""
    file = _map_cache_dir() / f"{name}-{size}-symbolic.json"
    if file.exists():
        return UNetMap.from_dict(json.loads(file.read_text()))
    model = build_unet(name, size=size, device="meta" if size == "full" else "cpu")
    spec = probe_spec(model, latent_hw=DEFAULT_HW, frames=2)
    unet_map = analyse_graph(export_unet(model, spec, dynamic=True), model, spec)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(unet_map.to_json())
    tmp.replace(file)
    return unet_map


def differences(expected: dict, actual: dict) -> list[str]:
    """Readable field-by-field differences of two ``UNetMap.to_dict()`` s."""
    out = []
    for key in sorted(set(expected) | set(actual)):
        a, b = expected.get(key), actual.get(key)
        if key in ("convs", "attentions", "skips") and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for ra, rb in zip(a, b, strict=True):
                out += [f"{key} {ra.get('path')}.{f}: {ra[f]!r} != {rb.get(f)!r}" for f in ra if ra[f] != rb.get(f)]
        elif a != b:
            out.append(f"{key}: {a!r} != {b!r}")
    return out


@pytest.mark.parametrize("size", ["tiny", pytest.param("full", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(PRESETS))
def test_default_map_equals_the_symbolic_export_map(name: str, size: str) -> None:
    expected = symbolic_map(name, size)
    actual = preset_map(name, size)
    assert expected.method == actual.method == "export"
    assert differences(expected.to_dict(), actual.to_dict()) == []


class ExportCalls:
    """Records each ``export_unet`` call's ``dynamic`` flag and latent size, then exports (or fails)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[bool, tuple[int, ...]]] = []
        self.fail = fail

    def __call__(self, model, spec, *, dynamic=True, unambiguous=False):
        self.calls.append((dynamic, tuple(spec.kwargs[spec.sample_key].shape)))
        if self.fail:
            raise RuntimeError("export refused by the test")
        return export_unet(model, spec, dynamic=dynamic, unambiguous=unambiguous)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_an_unambiguous_static_size(name: str) -> None:
    """13 and 17 divide no width of any preset, so the default map never needs a symbolic export."""
    model = build_unet(name, size="full", device="meta")
    spec = probe_spec(model, latent_hw=DEFAULT_HW, frames=2)
    assert unambiguous_latent_hw(model, spec, DEFAULT_HW) == (13 * 64, 17 * 64)
    widths = {int(s) for t in (*model.parameters(), *model.buffers()) for s in t.shape}
    assert not any(w % 13 == 0 or w % 17 == 0 for w in widths)


def test_default_map_is_one_static_export_at_the_unambiguous_size(monkeypatch) -> None:
    recorder = ExportCalls()
    monkeypatch.setattr(mapper, "export_unet", recorder)
    unet_map = map_unet(build_unet("sd15", size="tiny", device="meta"), cache=False)
    assert recorder.calls == [(False, (1, 4, 13 * 64, 17 * 64))]
    assert unet_map.method == "export"
    assert unet_map.probe_latent == (1, 4, *DEFAULT_HW)  # the requested probe, as a symbolic export reports it


def test_a_width_divisible_by_13_skips_the_static_export(monkeypatch) -> None:
    """A model size that a spatial size could equal: only the symbolic export can tell them apart."""
    model = build_unet("sd15", size="tiny", device="cpu")
    model.register_buffer("table", torch.zeros(26))
    spec = probe_spec(model, latent_hw=DEFAULT_HW, frames=2)
    assert unambiguous_latent_hw(model, spec, DEFAULT_HW) is None
    recorder = ExportCalls(fail=True)
    monkeypatch.setattr(mapper, "export_unet", recorder)
    unet_map = map_unet(model, cache=False)  # both exports refused: the hook probe maps it
    assert [dynamic for dynamic, _ in recorder.calls] == [True, False]
    assert {shape for _, shape in recorder.calls} == {(1, 4, *DEFAULT_HW)}
    assert unet_map.method == "probe"


def test_a_failed_static_export_falls_back_to_the_symbolic_one(monkeypatch) -> None:
    recorder = ExportCalls(fail=True)
    monkeypatch.setattr(mapper, "export_unet", recorder)
    unet_map = map_unet(build_unet("sd15", size="tiny", device="cpu"), cache=False)
    assert [dynamic for dynamic, _ in recorder.calls] == [False, True, False]
    assert recorder.calls[0][1] == (1, 4, 13 * 64, 17 * 64)
    assert unet_map.method == "probe"
    # the static-first attempt is an optimisation, not a fallback: only the others are noted
    assert [n.split(":")[0] for n in unet_map.notes] == ["torch.export (dynamic)", "torch.export (static)"]


def test_custom_inputs_are_exported_with_symbolic_sizes(monkeypatch) -> None:
    """Inputs given by the caller cannot be rebuilt at another size: no static-first export."""
    model = build_unet("sd15", size="tiny", device="cpu")
    spec = probe_spec(model, latent_hw=(64, 64))
    recorder = ExportCalls(fail=True)
    monkeypatch.setattr(mapper, "export_unet", recorder)
    map_unet(model, inputs=spec.kwargs, sample_key="sample", cache=False)
    assert [dynamic for dynamic, _ in recorder.calls] == [True, False]
