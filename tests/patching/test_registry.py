"""The pass registry: a new pass is one config + one handler; no-effect passes are reported."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import preset_map
from unet_surgery import apply
from unet_surgery.cli import main
from unet_surgery.ops import rewrite
from unet_surgery.passes.base import (
    FilterFn,
    LayerRewrite,
    PassHandler,
    Plan,
    active_now,
    no_effect_reasons,
    register_pass,
    selection,
    unregister_pass,
)
from unet_surgery.patching.patch import NoEffectWarning
from unet_surgery.presets import example_inputs
from unet_surgery.recipes import parse_recipe
from unet_surgery.recipes.schema import PassConfig, ScheduleSpec, Selector, doc

# ----------------------------------------------------------------------------- a pass in one file
# (the worked example of docs/architecture.md: scale the output of whole blocks while active)


class _ScaledOutput(rewrite.Rewritten):
    _rewrite_prefix = "Scaled"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._rewrite_base.forward(self, *args, **kwargs)
        scale = rewrite.read_setting(self)  # type: ignore[arg-type]
        return out if scale == 1.0 else out * scale


BLOCK_OUTPUT = LayerRewrite(
    name="block",
    group="blocks",
    off=1.0,
    install=lambda module, source, extras: rewrite.install(
        module, rewrite.swapped_class(_ScaledOutput, type(module)), source
    ),
    restore=rewrite.restore,
    summary=lambda scale: None if scale == 1.0 else {"scale": scale},
)


@dataclass(frozen=True)
class ScaleOutputPass(PassConfig):
    """Scale the output of the blocks holding the selected layers (a FreeU-like toy)."""

    type: ClassVar[str] = "scale_output"
    select: Selector = doc("layers whose parent block is scaled")
    scale: float = doc("output multiplier", default=1.1)
    schedule: ScheduleSpec = doc("when the pass is active", default_factory=ScheduleSpec)


class ScaleOutputHandler(PassHandler[ScaleOutputPass]):
    type = "scale_output"
    config = ScaleOutputPass
    rewrite = BLOCK_OUTPUT

    def plan(self, config: ScaleOutputPass, index: int, unet_map: Any, plan: Plan, filter_fn: FilterFn | None) -> None:
        for rec in selection(config, index, unet_map, plan, filter_fn).records:
            plan.add(rec.path.rsplit(".", 1)[0], None, self, config, index)  # the parent block

    def setting(self, patch: Any, entry: ScaleOutputPass, branch: str, call: Any, current: float) -> float:
        return current * entry.scale if active_now(patch, entry.schedule, call) else current

    def no_effect_reasons(self, config: ScaleOutputPass, index: int, recipe: Any, plan: Any) -> list[str]:
        return ["scale is 1"] if config.scale == 1.0 else []


@pytest.fixture
def scale_output_pass():
    register_pass(ScaleOutputHandler)
    yield
    unregister_pass("scale_output")


def _recipe(scale: float = 1.5, **extra: Any) -> dict:
    return {
        "name": "scale-output",
        "base_resolution": [64, 64],
        "target_resolutions": [[128, 128]],
        "passes": [{"type": "scale_output", "select": {"paths": ["down_blocks.1.resnets.0.conv1"]},
                    "scale": scale, **extra}],
    }


def test_a_pass_in_one_file_plans_installs_runs_and_restores(scale_output_pass, tiny_sd15) -> None:
    from unet_surgery.export.phases import enumerate_phases

    inputs = example_inputs(tiny_sd15, height=128, width=128)
    block = tiny_sd15.get_submodule("down_blocks.1.resnets.0")
    with torch.no_grad():
        base = tiny_sd15(**inputs).sample
        block_in: dict[str, Any] = {}
        handle = block.register_forward_hook(lambda m, a, o: block_in.setdefault("o", o))
        tiny_sd15(**inputs)
        handle.remove()
    patch = apply(tiny_sd15, _recipe(1.5, schedule={"tau": 10}), unet_map=preset_map("sd15", "tiny"))
    assert type(block).__name__ == "ScaledResnetBlock2D"
    assert {"path": "down_blocks.1.resnets.0", "op": "block", "change": "scale_output", "setting": ""} in patch.plan.rows()
    seen: dict[str, Any] = {}
    handle = block.register_forward_hook(lambda m, a, o: seen.setdefault("o", o))
    with torch.no_grad():
        patched = tiny_sd15(**inputs).sample  # t=999: step 0, inside the window
    handle.remove()
    torch.testing.assert_close(seen["o"], block_in["o"] * 1.5, rtol=0, atol=0)
    assert not torch.equal(patched, base)
    phases, table = enumerate_phases(patch, [999 - 20 * i for i in range(50)], (16, 16))
    assert [p.summary(patch) for p in phases] == [[{"path": "down_blocks.1.resnets.0", "scale": 1.5}], []]
    assert table == [0] * 10 + [1] * 40
    patch.remove()
    assert type(block).__name__ == "ResnetBlock2D"
    with torch.no_grad():
        assert torch.equal(tiny_sd15(**inputs).sample, base)


def test_registered_pass_is_parsed_and_documented(scale_output_pass) -> None:
    from unet_surgery.recipes.reference import schema_reference

    recipe = parse_recipe(_recipe())
    assert type(recipe.passes[0]) is ScaleOutputPass
    assert "## Pass: scale_output {#scaleoutputpass}" in schema_reference()


# ----------------------------------------------------------------------------- no effect


def _sd15_recipe(*passes: dict) -> dict:
    return {"name": "t", "base_resolution": [64, 64], "target_resolutions": [[128, 128]], "passes": list(passes)}


REDILATE = {"type": "redilate", "select": {"kernel": 3, "level": "1.."}, "factor": 2, "schedule": {"tau": 30}}


@pytest.mark.parametrize(
    ("passes", "reason"),
    [
        # noise-damped branch identical to the main branch: ordinary CFG
        ([REDILATE, {**REDILATE, "type": "noise_damped_cfg"}], "ordinary classifier-free guidance"),
        # a factor of 1 everywhere
        ([{**REDILATE, "factor": 1}], "factor 1"),
        # an empty step window
        ([{**REDILATE, "schedule": {"tau": 0}}], "no step is inside the window"),
        ([REDILATE, {"type": "disperse", "select": {"kernel": 3, "level": "2.."}, "schedule": {"tau": 0}}],
         "never used"),
    ],
)
def test_passes_that_cannot_act_are_warned_about(passes, reason, tiny_sd15) -> None:
    doc_ = _sd15_recipe(*passes)
    with pytest.warns(NoEffectWarning, match=reason):
        patch = apply(tiny_sd15, doc_, unet_map=preset_map("sd15", "tiny"))
    patch.remove()


def test_a_real_noise_damped_recipe_is_not_warned_about(tiny_sd15) -> None:
    """The shipped recipe's damped table differs from its main one (published: the damped
    branch re-dilates fewer layers), so nothing is reported and no warning is raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoEffectWarning)
        patch = apply(tiny_sd15, "scalecrafter-sd15-2048x2048", unet_map=preset_map("sd15", "tiny"), force=True)
    try:
        damped, main = patch.plan.entries("noise_damped_cfg"), patch.plan.entries("redilate")
        assert damped and main and {p: e.factor for p, e in damped.items()} != {p: e.factor for p, e in main.items()}
        assert no_effect_reasons(patch.recipe, patch.plan) == []
    finally:
        patch.remove()


def test_the_damped_table_equal_to_the_main_one_only_on_the_model_is_found_with_a_plan(tiny_sd15) -> None:
    # Written differently (a default factor vs a table) but the same on every selected layer.
    table = {r.path: 2.0 for r in preset_map("sd15", "tiny").convs
             if r.spatial_kernel == (3, 3) and r.level is not None and r.level >= 1 and r.axis == "spatial"}
    ndcfg = {"type": "noise_damped_cfg", "select": {"kernel": 3, "level": "1.."}, "factors": table,
             "schedule": {"tau": 30}}
    with pytest.warns(NoEffectWarning, match="ordinary classifier-free guidance"):
        apply(tiny_sd15, _sd15_recipe(REDILATE, ndcfg), unet_map=preset_map("sd15", "tiny")).remove()


def test_recipes_validate_prints_the_warnings(tmp_path, capsys) -> None:
    import yaml

    file = tmp_path / "r.yaml"
    file.write_text(yaml.safe_dump(_sd15_recipe(REDILATE, {**REDILATE, "type": "noise_damped_cfg"})))
    assert main(["recipes", "validate", str(file)]) == 0
    out, err = capsys.readouterr()
    assert f"{file}: ok" in out
    assert "passes[1] (noise_damped_cfg):" in err and "ordinary classifier-free guidance" in err
    good = tmp_path / "g.yaml"
    good.write_text(yaml.safe_dump(_sd15_recipe(REDILATE)))
    assert main(["recipes", "validate", str(good)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_modules_with_an_instance_forward_are_refused_by_apply(tiny_sd15) -> None:
    from unet_surgery.errors import TransformError

    conv: nn.Module = tiny_sd15.get_submodule("down_blocks.1.resnets.0.conv1")
    conv.forward = conv.forward  # e.g. an offload hook's wrapper
    with pytest.raises(TransformError, match="instance-level forward"):
        apply(tiny_sd15, _sd15_recipe(REDILATE), unet_map=preset_map("sd15", "tiny"))
    assert not any(rewrite.is_rewritten(m) for m in tiny_sd15.modules())  # nothing left behind


# ----------------------------------------------------------------------------- factors


def _dilation_it_ran_with(conv: nn.Conv2d, x: torch.Tensor, out: torch.Tensor) -> int | None:
    """The dilation a 3x3 stride-1 conv ran with: its output is torch's conv with that dilation
    and padding (None when none of 1-4 gives it)."""
    ran = [d for d in (1, 2, 3, 4) if torch.equal(out, F.conv2d(x, conv.weight, conv.bias, 1, padding=d, dilation=d))]
    return ran[0] if len(ran) == 1 else None


def test_a_layer_in_the_factors_table_runs_with_its_entry_and_the_others_with_the_default(tiny_sd15) -> None:
    listed, other = "down_blocks.1.resnets.0.conv1", "down_blocks.1.resnets.0.conv2"
    doc = _sd15_recipe({"type": "redilate", "select": {"paths": [listed, other]}, "factor": 2, "factors": {listed: 3}})
    ran: dict[str, int | None] = {}
    with apply(tiny_sd15, doc, unet_map=preset_map("sd15", "tiny")):
        handles = [tiny_sd15.get_submodule(p).register_forward_hook(
            lambda m, a, o, p=p: ran.update({p: _dilation_it_ran_with(m, a[0], o)})) for p in (listed, other)]
        with torch.no_grad():
            tiny_sd15(**example_inputs(tiny_sd15, height=128, width=128))  # t=999: step 0, no schedule
        for h in handles:
            h.remove()
    assert ran == {listed: 3, other: 2}


def test_a_damped_branch_with_the_main_factors_but_another_window_is_not_ordinary_cfg(tiny_sd15) -> None:
    """Same layers and factors, windows of 30 and 20 steps: from step 20 to 29 the damped branch
    runs the plain conv while the main branch is re-dilated, so guidance is noise-damped there."""
    ndcfg = {**REDILATE, "type": "noise_damped_cfg", "schedule": {"tau": 20}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoEffectWarning)
        patch = apply(tiny_sd15, _sd15_recipe(REDILATE, ndcfg), unet_map=preset_map("sd15", "tiny"))
    try:
        assert no_effect_reasons(patch.recipe, patch.plan) == []
    finally:
        patch.remove()
