"""Factor schedules: published rules, step/timestep equivalence, validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_surgery.errors import TransformError
from unet_surgery.ops.schedules import FactorSchedule, progressive_factor, step_index

FAST = settings(max_examples=40, deadline=None)


def _ddim_timesteps(n: int, spacing: str, t_train: int = 1000) -> list[int]:
    """diffusers DDIMScheduler.set_timesteps for SD (steps_offset=1 with 'leading')."""
    if spacing == "leading":
        ratio = t_train // n
        return [i * ratio + 1 for i in range(n)][::-1]
    ratio = t_train / n
    return [round(t_train - i * ratio) - 1 for i in range(n)]


def test_constant_schedule_is_on_everywhere():
    s = FactorSchedule.constant(2.5)
    assert [s.factor_at_step(i, 50) for i in range(50)] == [2.5] * 50
    assert FactorSchedule().factor_at_step(0) == 1.0  # default factor 1 = off


@FAST
@given(f=st.sampled_from([1.5, 2, 2.5, 3, 4]), tau=st.integers(0, 50), i=st.integers(0, 49))
def test_window_cut_off(f, tau, i):
    s = FactorSchedule.freescale(f, tau)
    assert s.factor_at_step(i, 50) == (float(f) if i < tau else 1.0)


def test_freescale_defaults_to_35_of_50():
    s = FactorSchedule.freescale(2)
    assert [s.factor_at_step(i) for i in (0, 34, 35, 49)] == [2.0, 2.0, 1.0, 1.0]


@FAST
@given(f=st.sampled_from([2, 2.5, 3, 4]), tau=st.integers(1, 50), i=st.integers(0, 49))
def test_progressive_rule_matches_published_formula(f, tau, i):
    s = FactorSchedule.scalecrafter(f, tau, progressive=True)
    expected = max(math.ceil(f * (tau - i) / tau), 2) if i < tau else 1
    assert s.factor_at_step(i, 50) == expected


def test_progressive_sequence_sd15_2048():
    s = FactorSchedule.scalecrafter(4, 35, progressive=True)
    seq = [s.factor_at_step(i, 50) for i in range(50)]
    assert seq[:9] == [4] * 9 and seq[9:18] == [3] * 9 and seq[18:35] == [2] * 17
    assert seq[35:] == [1] * 15
    assert seq == sorted(seq, reverse=True)


def test_progressive_rule_below_two_is_kept_faithful():
    # Published rule: max(ceil(1.5 * (tau - i) / tau), 2) == 2 -- more than the 1.5 asked for.
    assert progressive_factor(1.5, 35, 0) == 2.0
    assert FactorSchedule.scalecrafter(1.5, 35, progressive=True).factor_at_step(10) == 2.0
    assert FactorSchedule.scalecrafter(1, 35, progressive=True).factor_at_step(10) == 1.0


@FAST
@given(tau=st.integers(0, 50), n=st.integers(1, 100), data=st.data())
def test_window_rescales_with_step_count(tau, n, data):
    i = data.draw(st.integers(0, n - 1))
    s = FactorSchedule.freescale(2, tau)
    assert s.factor_at_step(i, n) == (2.0 if i < tau * n / 50 else 1.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("progressive", [False, True])
def test_timestep_only_path_agrees_with_step_index_for_ddim(spacing, progressive):
    s = FactorSchedule.scalecrafter(4, 35, progressive=progressive)
    ts = _ddim_timesteps(50, spacing)
    for i, t in enumerate(ts):
        expected = s.factor_at_step(i, 50)
        assert s.factor_at_timestep(t) == expected, (i, t)
        assert s.factor_at_timestep(t, timesteps=ts) == expected
        assert s.factor_at_timestep(torch.tensor([t, t]), timesteps=torch.tensor(ts)) == expected


@FAST
@given(n=st.integers(1, 60), data=st.data())
def test_step_index_finds_the_timestep(n, data):
    ts = torch.linspace(999, 0, n).round()  # distinct for n <= 60 (spacing > 16)
    assert bool((ts[1:] != ts[:-1]).all())
    i = data.draw(st.integers(0, n - 1))
    assert step_index(ts[i], ts) == i
    assert step_index(float(ts[i]) + 0.3, ts.tolist()) == i  # nearest entry
    s = FactorSchedule.freescale(3, 35)
    assert s.factor_at_timestep(ts[i], timesteps=ts) == s.factor_at_step(i, n)


def test_timestep_extremes_are_clamped():
    s = FactorSchedule.freescale(2, 35)
    assert s.factor_at_timestep(1000) == 2.0
    assert s.factor_at_timestep(0) == 1.0
    assert s.factor_at_timestep(-5) == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"factor": 0},
        {"factor": -1},
        {"factor": float("nan")},
        {"factor": True},
        {"factor": 2, "tau": -1},
        {"factor": 2, "tau": float("inf")},
        {"factor": 2, "steps": 0},
        {"factor": 2, "steps": 2.5},
    ],
)
def test_invalid_schedules_raise(kwargs):
    with pytest.raises(TransformError):
        FactorSchedule(**kwargs)


def test_invalid_queries_raise():
    s = FactorSchedule.freescale(2)
    with pytest.raises(TransformError):
        s.factor_at_step(50, 50)
    with pytest.raises(TransformError):
        s.factor_at_step(-1, 50)
    with pytest.raises(TransformError):
        s.factor_at_step(0, 0)
    with pytest.raises(TransformError):
        step_index(10, [])
    with pytest.raises(TransformError, match="mixes"):
        s.factor_at_timestep(torch.tensor([10, 20]))
    with pytest.raises(TransformError):
        s.factor_at_timestep(10, num_train_timesteps=0)


def test_schedule_is_frozen_and_hashable():
    s = FactorSchedule.scalecrafter(2, 35, progressive=True)
    with pytest.raises(AttributeError):
        s.factor = 3  # type: ignore[misc]
    assert {s: 1}[FactorSchedule(factor=2, tau=35, steps=50, progressive=True)] == 1
