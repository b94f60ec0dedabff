"""torch.compile of a patched UNet: one compilation per distinct phase of the schedule, never per step.

The expected phase counts come from the published window rule (a pass is active at step ``i``
of an ``n``-step sampler while ``i < tau * n / 50``), evaluated here by hand; the compiled
outputs are compared with the same patched model run eagerly.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from tests.conftest import preset_map
from unet_surgery import apply
from unet_surgery.graph import map_unet
from unet_surgery.presets import build_unet, example_inputs
from unet_surgery.toy.model import load_toy

STEPS = 10
TIMESTEPS = [999 - 111 * i for i in range(STEPS)]  # any decreasing list; the tracker is told it


def _active(tau: float, i: int) -> bool:
    return i < tau * STEPS / 50


def _recipe(passes: list[dict]) -> dict:
    return {"name": "compile-test", "base_resolution": [64, 64], "target_resolutions": [[128, 128]], "passes": passes}


REDILATE = {"type": "redilate", "select": {"kernel": 3, "level": "1.."}, "factor": 2, "schedule": {"tau": 25}}
DISPERSE = {"type": "disperse", "select": {"kernel": 3, "level": "1.."}, "schedule": {"tau": 15}}
DAMPED = {"type": "noise_damped_cfg", "select": {"kernel": 3, "level": "2.."}, "factor": 3, "schedule": {"tau": 20}}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def toy_unet_and_map():
    unet = load_toy("toy").unet.eval()  # the trained toy: a small diffusers UNet, quick to trace
    return unet, map_unet(unet, cache=True)


def _run(call, inputs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return [call(**inputs, timestep=torch.tensor(float(t))).sample for t in TIMESTEPS]


def _inputs(unet, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 1, unet.config.cross_attention_dim, generator=g)
    return {"sample": torch.randn(1, 3, 64, 64, generator=g).repeat(batch, 1, 1, 1),
            "encoder_hidden_states": torch.cat([torch.zeros_like(ctx), ctx][:batch])}


def test_two_phase_schedule_compiles_twice_with_fullgraph(toy_unet_and_map) -> None:
    model, unet_map = toy_unet_and_map
    inputs = _inputs(model, 1)
    patch = apply(model, _recipe([REDILATE]), unet_map=unet_map, force=True)
    patch.set_timesteps(TIMESTEPS)
    eager = _run(model, inputs)
    compiled = _run(torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False), inputs)
    phases = {_active(25, i) for i in range(STEPS)}
    assert counters["stats"]["unique_graphs"] == len(phases) == 2
    assert not counters["graph_break"]
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    patch.remove()
    plain = _run(model, inputs)
    assert not torch.allclose(plain[0], compiled[0], atol=1e-3)  # the compiled graph is the patched one


def test_inductor_compiles_a_patched_diffusers_unet_with_fullgraph() -> None:
    """The default backend generates code for the re-dilated convs (one phase: constant factor)."""
    model = build_unet("sd15", size="tiny", device="cpu").eval()
    inputs = example_inputs(model, height=128, width=128)
    constant = {**REDILATE, "schedule": {"tau": None}}
    patch = apply(model, _recipe([constant]), unet_map=preset_map("sd15", "tiny"))
    with torch.no_grad():
        eager = model(**inputs).sample
        compiled = torch.compile(model, fullgraph=True, dynamic=False)(**inputs).sample
    patch.remove()
    with torch.no_grad():
        plain = model(**inputs).sample
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, eager, atol=1e-3)


def test_dispersion_and_noise_damped_guidance_compile_once_per_phase(toy_unet_and_map) -> None:
    model, unet_map = toy_unet_and_map
    inputs = _inputs(model, 2)  # [uncond, cond] as a pipeline batches it under CFG
    patch = apply(model, _recipe([REDILATE, DISPERSE, DAMPED]), unet_map=unet_map, force=True)
    patch.set_timesteps(TIMESTEPS)
    patch.enable_noise_damped_cfg()
    eager = _run(model, inputs)
    compiled = _run(torch.compile(model, backend="eager", fullgraph=True, dynamic=False), inputs)
    phases = {(_active(25, i), _active(15, i), _active(20, i)) for i in range(STEPS)}
    assert len(phases) == 4
    assert counters["stats"]["unique_graphs"] == len(phases)
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    patch.remove()


def test_eager_layers_see_the_settings_resolved_before_the_forward(toy_unet_and_map) -> None:
    """A layer called after the step changed still runs the call's setting: the forward never
    reads the schedule, so a graph cannot depend on the step."""
    model, unet_map = toy_unet_and_map
    inputs = _inputs(model, 1)
    conv_path = "down_blocks.1.resnets.0.conv1"
    factors = []
    patch = apply(model, _recipe([REDILATE]), unet_map=unet_map, force=True)
    patch.set_timesteps(TIMESTEPS)

    def spy(module, args):
        factors.append(patch.current_setting(patch.plan.layers[conv_path]).factor)
        patch.tracker.current.step = STEPS - 1  # a late step: the live schedule would say 1

    handle = model.get_submodule(conv_path).register_forward_pre_hook(spy)
    with torch.no_grad():
        model(**inputs, timestep=torch.tensor(float(TIMESTEPS[0])))
    handle.remove()
    patch.remove()
    assert factors == [2.0]
