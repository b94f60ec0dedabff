"""Runtime misuse: one patched model called from two threads, and ``copy.deepcopy`` of it.

The recipe re-dilates only in the first half of a 50-step run, so a call at t=999 (step 0)
and one at t=1 (step 49) run different layers; a call that read the other thread's timestep
would give the other output. References are the same calls made one at a time.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest
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


def test_a_patched_model_refuses_pickling_in_one_line_and_pickles_once_removed() -> None:
    import io
    import pickle

    from unet_surgery.errors import SurgeryError

    model, patch = patched()
    for dump in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(SurgeryError) as info:
            dump(model)
        message = str(info.value)
        assert "\n" not in message and "cannot pickle" in message and "remove" in message
    patch.remove()
    inputs = example_inputs(model, height=64, width=64)
    assert torch.equal(run(pickle.loads(pickle.dumps(model)), inputs, TIMESTEPS[0]), run(model, inputs, TIMESTEPS[0]))


def test_remove_from_many_threads_at_once_removes_once() -> None:
    model, patch = patched()
    plain = build_unet("sd15", size="tiny", device="cpu")
    inputs = example_inputs(model, height=64, width=64)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            patch.remove()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert current_patch(model) is None and not any(rewrite.is_rewritten(m) for m in model.modules())
    assert torch.equal(run(model, inputs, TIMESTEPS[0]), run(plain, inputs, TIMESTEPS[0]))


def test_a_forward_sees_the_whole_patch_or_none_of_it_while_another_thread_removes() -> None:
    """Thread A is held inside a patched forward (in the mid block); thread B calls remove(),
    which must wait for A; thread C starts a forward while B waits: C runs plain, A finishes
    with the whole patch, and afterwards the model is plain. Ordered by events, not sleeps."""
    model, patch = patched()
    plain_model = build_unet("sd15", size="tiny", device="cpu")
    inputs = example_inputs(model, height=64, width=64)
    t = TIMESTEPS[0]
    patched_ref, plain_ref = run(model, inputs, t), run(plain_model, inputs, t)
    assert not torch.equal(patched_ref, plain_ref)
    entered, proceed = threading.Event(), threading.Event()
    holder: dict[str, Any] = {}

    def hold(module: Any, args: Any) -> None:
        if threading.current_thread() is holder.get("a"):
            entered.set()
            proceed.wait()

    handle = model.mid_block.register_forward_pre_hook(hold)
    results: dict[str, torch.Tensor] = {}
    a = threading.Thread(target=lambda: results.__setitem__("a", run(model, inputs, t)))
    holder["a"] = a
    b = threading.Thread(target=patch.remove)
    a.start()
    entered.wait()
    b.start()
    while not patch._closing:  # B has begun removing and waits for A (no timing involved)
        if not b.is_alive():
            break
        threading.Event().wait(0)
    assert b.is_alive() and patch._closing
    results["c"] = run(model, inputs, t)  # starts while the layers are still swapped
    proceed.set()
    a.join()
    b.join()
    handle.remove()
    assert torch.equal(results["a"], patched_ref)
    assert torch.equal(results["c"], plain_ref)
    assert current_patch(model) is None
    assert torch.equal(run(model, inputs, t), plain_ref)
