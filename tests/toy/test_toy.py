"""The shipped toy model: offline loading, data generator, object metric, and real 1x quality."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from unet_surgery.toy import (
    NUM_CLASSES,
    SHAPES,
    TOY_NAMES,
    analyse_image,
    analyse_images,
    ddim_timesteps,
    load_toy,
    load_toy_config,
    make_batch,
    sample,
    summarise,
)
from unet_surgery.toy.data import SIZE_RANGE

pytest.importorskip("diffusers")

QUALITY_SEEDS = list(range(24))


@pytest.fixture(scope="module", params=TOY_NAMES)
def toy(request):
    # One thread: this small model is faster single-threaded on a shared CPU; restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_toy(request.param)
    torch.set_num_threads(threads)


def test_unknown_toy_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown toy 'toy9'; shipped toys: toy, toy4, toy-detail, toy-eps"):
        load_toy("toy9")


@pytest.mark.parametrize("name", TOY_NAMES)
def test_load_toy_needs_no_network(monkeypatch, name):
    def refuse(*args, **kwargs):
        raise AssertionError("load_toy touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model = load_toy(name)
    assert not model.training and model.name == name
    config = load_toy_config(name)
    assert config["name"] == name
    assert config["num_classes"] == NUM_CLASSES == model.num_classes
    assert config["class_names"] == list(SHAPES)
    for key, value in config["unet"].items():
        got = model.unet.config[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert config["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert model.class_embedding.num_embeddings == NUM_CLASSES + 1
    assert model.encode(torch.tensor([0, NUM_CLASSES])).shape == (
        2,
        1,
        config["unet"]["cross_attention_dim"],
    )
    assert model.scheduler_config == config["scheduler"]


def test_epsilon_toy_states_stable_diffusions_schedule():
    # SD 1.5 / 2.1-base / XL scheduler_config.json: epsilon, scaled_linear 0.00085..0.012, 1000 steps
    scheduler = load_toy_config("toy-eps")["scheduler"]
    assert scheduler["prediction_type"] == "epsilon"
    assert scheduler["beta_schedule"] == "scaled_linear"
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.00085, 0.012)
    assert scheduler["num_train_timesteps"] == 1000
    unet = load_toy_config("toy-eps")["unet"]
    # an SD1.5-like layout unlike toy's and toy4's: cross-attention at the middle levels only
    assert unet["down_block_types"] == [
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    for name in ("toy", "toy4"):
        assert load_toy_config(name)["unet"]["down_block_types"] != unet["down_block_types"]


@pytest.mark.parametrize(("name", "period"), [("toy-detail", 4.0), ("toy-eps", 4.0), ("toy", None), ("toy4", None)])
def test_texture_period_is_stated_in_the_config(name, period):
    assert load_toy_config(name).get("texture_period") == period


def test_textured_toys_draw_their_texture_period_at_training_resolution():
    from unet_surgery.toy.detail import analyse_detail

    for name in ("toy-detail", "toy-eps"):
        model = load_toy(name)
        period = load_toy_config(name)["texture_period"]
        labels = [i % NUM_CLASSES for i in QUALITY_SEEDS]
        images = sample(model, labels, seeds=QUALITY_SEEDS, steps=25)
        periods = [analyse_detail(im, period).period for im in images]
        within = [p is not None and abs(p - period) <= 0.2 * period for p in periods]
        # 24 fixed seeds, at most two misses: on 48 held-out seeds each textured toy reproduces
        # the period in 45 (docs/toy.md), a little under the 95 % the issue asked for
        assert sum(within) >= 22, (name, periods)


def test_make_batch_is_reproducible():
    a, la = make_batch(16, torch.Generator().manual_seed(3))
    b, lb = make_batch(16, torch.Generator().manual_seed(3))
    c, _ = make_batch(16, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    assert la.dtype == torch.long and set(la.tolist()) <= set(range(NUM_CLASSES))
    assert a.min() >= -1 and a.max() <= 1


def test_training_images_hold_exactly_one_object_of_the_right_size():
    images, _ = make_batch(400, torch.Generator().manual_seed(0))
    stats = analyse_images(images)
    summary = summarise(stats)
    assert summary["frac_one"] >= 0.99
    extents = np.array([s.extent for s in stats if s.num_objects == 1])
    # Bounding-box side within the generator's range, up to one pixel of rasterisation.
    assert extents.min() >= SIZE_RANGE[0] - 1 / 32
    assert extents.max() <= SIZE_RANGE[1] + 1 / 32


def test_metric_counts_pasted_objects_and_blank_images():
    blank = torch.full((3, 32, 32), 0.1)
    assert analyse_image(blank).num_objects == 0
    two = blank.clone()
    two[:, 4:12, 4:12] = torch.tensor([0.95, -0.8, -0.8]).view(3, 1, 1)
    two[:, 18:28, 16:26] = torch.tensor([-0.75, -0.6, 0.95]).view(3, 1, 1)
    stats = analyse_image(two)
    assert stats.num_objects == 2
    assert stats.areas == (100, 64)
    # A speck below the minimum area is not an object.
    speck = blank.clone()
    speck[:, 10, 10] = 0.95
    assert analyse_image(speck).num_objects == 0


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_model_draws_one_object_of_the_requested_class_at_training_resolution(toy, steps):
    labels = [i % NUM_CLASSES for i in QUALITY_SEEDS]
    images = sample(toy, labels, seeds=QUALITY_SEEDS, steps=steps)
    assert images.shape == (len(QUALITY_SEEDS), 3, 32, 32)
    summary = summarise(analyse_images(images), labels=labels)
    # 24 fixed seeds: at most one failure (the 64-seed figures are in benchmarks/toy_policy)
    assert summary["frac_one"] >= 23 / 24, summary
    assert summary["frac_class_kept"] >= 23 / 24, summary
    assert SIZE_RANGE[0] * 0.6 <= summary["mean_size"] <= SIZE_RANGE[1], summary


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_is_per_seed_deterministic(toy, eta):
    alone = sample(toy, [1], seeds=[7], steps=4, eta=eta)
    batch = sample(toy, [0, 1, 2], seeds=[3, 7, 11], steps=4, eta=eta)
    # float32 batched kernels round differently per batch size; 1e-4 of a [-1, 1] image. An
    # epsilon model's x0 divides by sqrt(alpha_bar(999)) = 0.068 on SD's schedule: 15x that.
    epsilon = toy.scheduler_config["prediction_type"] == "epsilon"
    torch.testing.assert_close(batch[1:2], alone, atol=1.5e-3 if epsilon else 1e-4, rtol=0)
    assert not torch.allclose(batch[0], batch[1])
    torch.testing.assert_close(sample(toy, [1], seeds=[7], steps=4, eta=eta), alone, atol=0, rtol=0)


def test_sample_calls_unet_once_per_step_with_uncond_then_cond(toy):
    calls = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, encoder_hidden_states):
            calls.append((x.shape, int(t), encoder_hidden_states.clone()))
            return self.inner(x, t, encoder_hidden_states=encoder_hidden_states)

    steps = 3
    out = sample(toy, [0, 2], seeds=[0, 1], height=64, width=48, steps=steps, unet=Spy(toy.unet))
    assert out.shape == (2, 3, 64, 48)
    assert [c[1] for c in calls] == ddim_timesteps(steps).tolist()
    shape, _, context = calls[0]
    assert shape == (4, 3, 64, 48)
    empty = toy.encode(torch.tensor([toy.empty_class] * 2))
    torch.testing.assert_close(context[:2], empty)
    torch.testing.assert_close(context[2:], toy.encode(torch.tensor([0, 2])))


def test_sample_rejects_sizes_the_unet_cannot_halve(toy):
    levels = len(toy.unet.config.block_out_channels)  # toy: 3 -> 4 px, toy4: 4 -> 8 px
    multiple = 2 ** (levels - 1)
    with pytest.raises(ValueError, match=f"multiples of {multiple}"):
        sample(toy, [0], seeds=[0], height=32 + multiple // 2, width=32, steps=1)


@pytest.mark.parametrize(("steps", "strength", "calls"), [(10, 0.3, 3), (10, 0.5, 5), (25, 0.7, 17), (7, 1.0, 7)])
def test_img2img_runs_the_last_steps_from_the_noised_image(toy, steps, strength, calls):
    # diffusers' img2img: int(steps * strength) steps, from the image noised to the first of them
    seen: list[int] = []
    init = torch.zeros(1, 3, 32, 32)
    sample(toy, [0], seeds=[4], steps=steps, init_image=init, strength=strength,
           callback=lambda i, t: seen.append(t))
    assert seen == ddim_timesteps(steps, toy.scheduler_config).tolist()[steps - calls:]


def test_img2img_starts_from_the_image_noised_with_the_seeds_noise(toy):
    class Seen(Exception):
        pass

    class First(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            raise Seen(x[:1].clone())

    init = make_batch(1, torch.Generator().manual_seed(1))[0]
    with pytest.raises(Seen) as caught:
        sample(toy, [0], seeds=[9], steps=10, init_image=init, strength=0.4, unet=First())
    t = ddim_timesteps(10, toy.scheduler_config)[6]
    from diffusers import DDPMScheduler  # the schedule's alpha_bar at t, from its betas

    ab = DDPMScheduler(**load_toy_config(toy.name)["scheduler"]).alphas_cumprod[int(t)]
    noise = torch.randn((3, 32, 32), generator=torch.Generator().manual_seed(9))
    expected = ab.sqrt() * init[0] + (1 - ab).sqrt() * noise
    torch.testing.assert_close(caught.value.args[0][0], expected, atol=1e-5, rtol=0)


def test_img2img_rejects_bad_strengths(toy):
    init = torch.zeros(1, 3, 32, 32)
    for strength in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="strength must be in"):
            sample(toy, [0], seeds=[0], steps=4, init_image=init, strength=strength)
    with pytest.raises(ValueError, match="leaves no step"):
        sample(toy, [0], seeds=[0], steps=4, init_image=init, strength=0.2)
    with pytest.raises(ValueError, match="needs an init_image"):
        sample(toy, [0], seeds=[0], steps=4, strength=0.5)
    with pytest.raises(ValueError, match="init_image must have shape"):
        sample(toy, [0], seeds=[0], steps=4, init_image=torch.zeros(1, 3, 16, 16), strength=0.5)
