"""Layer settings are plain values: every field that changes the forward takes part in
equality and hashing.

``Patch.resolve_settings`` shares equal settings between layers on one call (so a compiled
forward sees one object per phase). A field left out of equality (a RAU-Net pair's size
link, an MSW-MSA pass's generator) then makes two different settings one, and two layers
share state they must not share.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import pytest

import unet_surgery.ops as ops
import unet_surgery.passes as passes


def setting_classes() -> list[type]:
    """Every dataclass a rewritten layer reads as its setting: in ``unet_surgery.ops`` (shared
    maths) and in the pass folders (a pass's own maths, e.g. FreeU's)."""
    found = {}
    modules = [info.name for package in (ops, passes)
               for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")]
    for name in modules:
        module = importlib.import_module(name)
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
                    and (name.endswith("Setting") or name in ("LowPass", "BatchSplit", "SizeLink"))):
                found[f"{module.__name__}.{name}"] = obj
    return [found[k] for k in sorted(found)]


def test_the_known_settings_are_found() -> None:
    names = {c.__name__ for c in setting_classes()}
    assert {"ConvSetting", "LowPass", "BatchSplit", "FusionSetting", "FreeUSetting", "WindowSetting",
            "RauSetting", "SizeLink"} <= names


@pytest.mark.parametrize("cls", setting_classes(), ids=lambda c: c.__name__)
def test_every_field_takes_part_in_equality(cls: type) -> None:
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    if not params.eq:  # compared by identity (a mutable link): then it must hash by identity
        assert cls.__hash__ is object.__hash__, f"{cls.__name__}: eq=False but a custom hash"
        return
    assert params.frozen, f"{cls.__name__} is not frozen: it is shared between layers by equality"
    left_out = [f.name for f in dataclasses.fields(cls) if not f.compare or f.hash is False]
    assert not left_out, f"{cls.__name__}: fields {left_out} change the forward but not equality"
