"""Runtime misuse: one patched model called from two threads, and ``copy.deepcopy`` of it.

The recipe re-dilates only in the first half of a 50-step run, so a call at t=999 (step 0)
and one at t=1 (step 49) run different layers; a call that read the other thread's timestep
would give the other output. References are the same calls made one at a time.
"""

from __future__ import annotations

import copy
import threading

import torch

from tests.conftest import preset_map
from unet_surgery import apply
from unet_surgery.ops import rewrite
from unet_surgery.patching.patch import current_patch
from unet_surgery.presets import build_unet, example_inputs

RECIPE = {
    "name": "half-run",
    "base_resolution": [64, 64],
    "target_resolutions": [[128, 128]],
    "passes": [{"type": "redilate", "select": {"op": "conv2d", "kernel": 3, "stage": ["mid", "up"]}, "factor": 2,
                "schedule": {"tau": 25, "steps": 50}}],
}
TIMESTEPS = [999.0 - i * 998.0 / 49 for i in range(50)]


def patched():
    model = build_unet("sd15", size="tiny", device="cpu")
    patch = apply(model, RECIPE, unet_map=preset_map("sd15", "tiny"))
    patch.set_timesteps(TIMESTEPS)
    return model, patch


def run(model, inputs, t):
    with torch.no_grad():
        return model(**{**inputs, "timestep": torch.tensor([t])}).sample


def wrong_in_two_threads(model, inputs, expected: dict[float, torch.Tensor]) -> list[float]:
    """Timesteps whose output differed from ``expected`` when each ran 6 times in its own thread."""
    wrong: list[float] = []
    barrier = threading.Barrier(2)

    def worker(t: float) -> None:
        barrier.wait()
        for _ in range(6):
            if not torch.equal(run(model, inputs, t), expected[t]):
                wrong.append(t)

    threads = [threading.Thread(target=worker, args=(t,)) for t in expected]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return wrong


def test_two_threads_get_their_own_timestep() -> None:
    model, _ = patched()
    inputs = example_inputs(model, height=64, width=64)
    early, late = TIMESTEPS[0], TIMESTEPS[-1]
    expected = {early: run(model, inputs, early), late: run(model, inputs, late)}
    assert not torch.equal(expected[early], expected[late])  # the two steps really differ
    assert wrong_in_two_threads(model, inputs, expected) == []


def test_deepcopy_of_a_patched_model_carries_a_working_patch_of_its_own() -> None:
    model, patch = patched()
    inputs = example_inputs(model, height=64, width=64)
    expected = {t: run(model, inputs, t) for t in (TIMESTEPS[0], TIMESTEPS[-1])}
    twin = copy.deepcopy(model)
    twin_patch = current_patch(twin)
    assert twin_patch is not None and twin_patch is not patch and twin_patch.model is twin
    for module in twin.modules():  # every rewritten layer reads the copy's patch, none the original's
        if rewrite.is_rewritten(module):
            assert rewrite.source(module).patch is twin_patch
    patch.remove()  # the original going away does not touch the copy
    for t, out in expected.items():
        assert torch.equal(run(twin, inputs, t), out)
    twin_patch.remove()
    base = build_unet("sd15", size="tiny", device="cpu")
    assert torch.equal(run(twin, inputs, TIMESTEPS[0]), run(base, inputs, TIMESTEPS[0]))


def test_two_threads_under_noise_damped_guidance_get_their_own_batch_split() -> None:
    """Guidance splits each [uncond, cond] call into three branches between its pre and post
    hooks; with two threads in flight, each must combine its own rows at its own timestep."""
    model = build_unet("sd15", size="tiny", device="cpu")
    damped = {**RECIPE, "passes": [*RECIPE["passes"], {
        "type": "noise_damped_cfg", "select": {"op": "conv2d", "kernel": 3, "stage": ["down"]}, "factor": 3,
        "schedule": {"tau": 25, "steps": 50}}]}
    patch = apply(model, damped, unet_map=preset_map("sd15", "tiny"))
    patch.set_timesteps(TIMESTEPS)
    patch.enable_noise_damped_cfg()
    inputs = example_inputs(model, batch=2, height=64, width=64)
    early, late = TIMESTEPS[0], TIMESTEPS[-1]
    expected = {early: run(model, inputs, early), late: run(model, inputs, late)}
    assert not torch.equal(expected[early], expected[late])
    assert wrong_in_two_threads(model, inputs, expected) == []
