"""Dispersion transform: reference reproduction, least-squares optimality, symmetry, file format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from tests.conftest import reference_path
from unet_surgery.errors import TransformError
from unet_surgery.ops.dispersion import (
    TransformParams,
    disperse_kernel,
    dispersion_transform,
    load_transform,
    save_transform,
)


def _reference_path() -> Path:
    return reference_path("scalecrafter", "transforms", "R20to1_new.mat")


params_st = st.builds(
    lambda small, extra, scale, n, eta: (small, small + 2 * extra, scale, n, eta),
    small=st.sampled_from([1, 3, 5]),
    extra=st.integers(1, 2),
    scale=st.integers(1, 3),
    n=st.integers(1, 4),
    eta=st.sampled_from([0.01, 0.05, 0.3, 1.0]),
)


def test_reproduces_published_transform():
    published = scipy.io.loadmat(_reference_path())["R"]
    ours = dispersion_transform(3, 5, 2, 3, 0.05)
    assert ours.shape == published.shape == (25, 9)
    assert np.abs(ours - published).max() < 1e-10
    # The README's stated facts: DC gain about 9.75, centre tap maps only to the centre.
    assert abs(ours.sum() - 9.7523) < 1e-3
    assert ours[12, 4] == pytest.approx(1.0) and np.abs(np.delete(ours[:, 4], 12)).max() < 1e-12


def test_cached_and_read_only():
    first = dispersion_transform()
    again = dispersion_transform(3, 5, 2, 3, 0.05)
    assert np.shares_memory(first, again)  # solved once
    with pytest.raises(ValueError):
        first[0, 0] = 1.0
    with pytest.raises(ValueError):
        first.setflags(write=True)
    # int eta accepted, and the same transform as 1.0 (one cache entry)
    assert np.shares_memory(dispersion_transform(3, 5, 2, 3, 1), dispersion_transform(3, 5, 2, 3, 1.0))


def _objective(b: torch.Tensor, a: torch.Tensor, params: tuple) -> torch.Tensor:
    """||struct||² + eta²||pixel||² built from torch conv/interpolate on every basis input.

    Independent of the matrix construction in the module: each basis image e_j gives the
    coefficients of x_j in every output pixel, which are exactly the rows of the problem.
    """
    small, large, scale, n, eta = params
    m = scale * (n - 1) + 1
    eye = torch.eye(n * n, dtype=torch.float64).reshape(n * n, 1, n, n)
    if m > 1 and n > 1:
        up = F.interpolate(eye, size=(m, m), mode="bilinear", align_corners=True)
        up_a = F.interpolate(
            F.conv2d(eye, a.view(1, 1, small, small), padding=small // 2),
            size=(m, m),
            mode="bilinear",
            align_corners=True,
        )
    else:
        up, up_a = eye, F.conv2d(eye, a.view(1, 1, small, small), padding=small // 2)
    struct = F.conv2d(up, b.view(1, 1, large, large), padding=large // 2) - up_a
    pixel = F.conv2d(eye, b.view(1, 1, large, large), padding=large // 2) - F.conv2d(
        eye, a.view(1, 1, small, small), padding=small // 2
    )
    return (struct**2).sum() + eta**2 * (pixel**2).sum()


@settings(max_examples=30, deadline=None)
@given(params=params_st, seed=st.integers(0, 2**16))
def test_dispersed_kernel_is_the_least_squares_optimum(params, seed):
    small, large = params[0], params[1]
    gen = torch.Generator().manual_seed(seed)
    r = torch.from_numpy(np.array(dispersion_transform(*params)))
    a = torch.randn(small * small, generator=gen, dtype=torch.float64)
    b = (r @ a).requires_grad_(True)
    best = _objective(b, a, params)
    (grad,) = torch.autograd.grad(best, b)
    assert grad.abs().max() < 1e-9 * (1 + best.item())  # stationary point of a convex quadratic
    with torch.no_grad():
        for _ in range(5):
            direction = torch.randn(large * large, generator=gen, dtype=torch.float64)
            direction /= direction.norm()
            for eps in (1e-3, 1e-1):
                assert _objective(b + eps * direction, a, params) >= best - 1e-12


def test_optimality_check_detects_a_wrong_transform():
    """Guard: the objective above really discriminates (a perturbed R is not optimal)."""
    params = (3, 5, 2, 3, 0.05)
    r = torch.from_numpy(np.array(dispersion_transform(*params)))
    a = torch.randn(9, dtype=torch.float64)
    wrong = r.clone()
    wrong[0, 0] += 0.01
    assert _objective(wrong @ a, a, params) > _objective(r @ a, a, params)


_D4 = {
    "flip_rows": lambda k: k.flip(-2),
    "flip_cols": lambda k: k.flip(-1),
    "transpose": lambda k: k.transpose(-1, -2),
    "rot90": lambda k: torch.rot90(k, 1, (-2, -1)),
    "rot180": lambda k: torch.rot90(k, 2, (-2, -1)),
    "rot270": lambda k: torch.rot90(k, 3, (-2, -1)),
    "anti_transpose": lambda k: torch.rot90(k, 1, (-2, -1)).flip(-1),
}


@settings(max_examples=25, deadline=None)
@given(params=params_st, op=st.sampled_from(sorted(_D4)), seed=st.integers(0, 2**16))
def test_transform_is_equivariant_under_the_square_symmetries(params, op, seed):
    small, large = params[0], params[1]
    r = dispersion_transform(*params)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 3, small, small, generator=gen, dtype=torch.float64)
    t = _D4[op]
    lhs = disperse_kernel(t(a), r)
    rhs = t(disperse_kernel(a, r))
    assert lhs.shape == (2, 3, large, large)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-11)


@settings(max_examples=20, deadline=None)
@given(c=st.floats(-10, 10, allow_nan=False), large=st.sampled_from([5, 7]))
def test_constant_kernel_disperses_to_weighted_constant(c, large):
    r = dispersion_transform(3, large)
    weight = torch.full((2, 2, 3, 3), c, dtype=torch.float64)
    expected = torch.from_numpy(r @ np.ones(9) * c).reshape(large, large)
    out = disperse_kernel(weight, r)
    torch.testing.assert_close(out, expected.expand(2, 2, large, large), rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    kt=st.integers(1, 3),
)
def test_disperse_kernel_conv3d_per_tap_and_keeps_dtype(dtype, kt):
    r = dispersion_transform()
    w = torch.randn(4, 2, kt, 3, 3).to(dtype)
    out = disperse_kernel(w, r)
    assert out.dtype == dtype and out.shape == (4, 2, kt, 5, 5) and out.is_contiguous()
    rt = torch.from_numpy(np.array(r))
    for tap in range(kt):
        manual = torch.einsum("lk,oik->oil", rt, w[:, :, tap].double().reshape(4, 2, 9))
        torch.testing.assert_close(
            out[:, :, tap].double(), manual.reshape(4, 2, 5, 5).to(dtype).double()
        )
    # Row-major flattening: the (0, 0) tap of a delta kernel at a[0, 0] is R[0, 0].
    delta = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    delta[0, 0, 0, 1] = 1.0
    torch.testing.assert_close(disperse_kernel(delta, r)[0, 0].flatten(), rt[:, 1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"small": 4}, "odd"),
        ({"large": 6}, "odd"),
        ({"small": 5, "large": 5}, "bigger"),
        ({"small": 5, "large": 3}, "bigger"),
        ({"scale": 0}, "scale"),
        ({"eta": 0.0}, "eta"),
        ({"eta": -1.0}, "eta"),
        ({"eta": float("nan")}, "eta"),
        ({"input_size": 0}, "input_size"),
        ({"scale": 1.5}, "integer"),
        ({"small": True}, "integer"),
        ({"eta": "0.05"}, "eta"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(TransformError, match=match):
        dispersion_transform(**kwargs)


def test_disperse_kernel_rejects_mismatched_shapes():
    r = dispersion_transform()
    with pytest.raises(TransformError):
        disperse_kernel(torch.zeros(1, 1, 5, 5), r)
    with pytest.raises(TransformError):
        disperse_kernel(torch.zeros(1, 1, 3, 3), np.zeros((24, 9)))
    with pytest.raises(TransformError):
        disperse_kernel(torch.zeros(3, 3), r)


# --------------------------------------------------------------------------- file format


@pytest.mark.parametrize("params", [(3, 5, 2, 3, 0.05), (3, 7, 3, 4, 0.1)])
def test_save_load_round_trip_is_bit_exact(tmp_path, params):
    r = dispersion_transform(*params)
    p = TransformParams(*params)
    path = tmp_path / "sub" / "R.safetensors"
    save_transform(path, r, p)
    loaded, loaded_params = load_transform(path)
    assert loaded_params == p
    assert loaded.dtype == np.float64 and loaded.tobytes() == np.ascontiguousarray(r).tobytes()
    assert [f.name for f in path.parent.iterdir()] == ["R.safetensors"]  # no temp files left


def _write_raw(path: Path, tensor: np.ndarray, metadata: dict[str, str]) -> None:
    save_file({"R": tensor}, str(path), metadata=metadata)


def _meta(**overrides: object) -> dict[str, str]:
    base = {"small": 3, "large": 5, "scale": 2, "input_size": 3, "eta": 0.05}
    base.update(overrides)
    meta = {k: json.dumps(v) for k, v in base.items() if v is not None}
    meta["format"] = "unet-surgery/dispersion-transform"
    meta["format_version"] = "1"
    return meta


def test_load_rejects_shape_not_matching_metadata(tmp_path):
    path = tmp_path / "R.safetensors"
    _write_raw(path, np.zeros((49, 9)), _meta())
    with pytest.raises(TransformError, match="metadata implies"):
        load_transform(path)


def test_load_rejects_missing_metadata_keys(tmp_path):
    path = tmp_path / "R.safetensors"
    _write_raw(path, np.zeros((25, 9)), _meta(eta=None))
    with pytest.raises(TransformError, match="lacks eta"):
        load_transform(path)
    save_file({"R": np.zeros((25, 9))}, str(path))
    with pytest.raises(TransformError, match="metadata"):
        load_transform(path)


def test_load_rejects_invalid_metadata_values(tmp_path):
    path = tmp_path / "R.safetensors"
    _write_raw(path, np.zeros((25, 9)), _meta(large=4))
    with pytest.raises(TransformError, match="odd"):
        load_transform(path)
    meta = _meta()
    meta["eta"] = "not json"
    _write_raw(path, np.zeros((25, 9)), meta)
    with pytest.raises(TransformError, match="malformed"):
        load_transform(path)


def test_load_rejects_wrong_dtype_and_extra_tensors(tmp_path):
    path = tmp_path / "R.safetensors"
    _write_raw(path, np.zeros((25, 9), dtype=np.float32), _meta())
    with pytest.raises(TransformError, match="float64"):
        load_transform(path)
    save_file({"R": np.zeros((25, 9)), "S": np.zeros(1)}, str(path), metadata=_meta())
    with pytest.raises(TransformError, match="one tensor"):
        load_transform(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "header"])
def test_load_rejects_corrupt_bytes(tmp_path, damage):
    path = tmp_path / "R.safetensors"
    save_transform(path, dispersion_transform(), TransformParams())
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 17])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(data[:8] + b"{" * 16 + data[24:])
    with pytest.raises(TransformError):
        load_transform(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(TransformError, match="no such"):
        load_transform(tmp_path / "nope.safetensors")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    from unet_surgery.ops import dispersion as mod

    def exploding(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mod, "save_file", exploding)
    path = tmp_path / "R.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_transform(path, dispersion_transform(), TransformParams())
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_shape_not_matching_params(tmp_path):
    with pytest.raises(TransformError):
        save_transform(tmp_path / "R.safetensors", np.zeros((49, 9)), TransformParams())
    assert list(tmp_path.iterdir()) == []
