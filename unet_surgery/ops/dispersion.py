"""ScaleCrafter's dispersed convolution: a least-squares map from a small kernel to a large one.

A 3x3 kernel ``a`` is turned into a 5x5 kernel ``b = R a`` chosen so that ``b`` applied to a
bilinearly upsampled input behaves like ``a`` applied to the original input and then upsampled
("structure" rows), while ``b`` on the original input still behaves like ``a`` ("pixel" rows,
weighted by ``eta``).  ``R`` depends only on the sizes, the scale and ``eta``, never on the
weights, so it is solved once per distinct parameter tuple and cached.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from unet_surgery.errors import TransformError
from unet_surgery.io import atomic_path

__all__ = [
    "TransformParams",
    "apply_transform",
    "check_transform_fits",
    "disperse_kernel",
    "dispersion_transform",
    "load_transform",
    "save_transform",
    "transform_key",
    "transform_tensor",
]

_TENSOR_KEY = "R"
_FORMAT = "unet-surgery/dispersion-transform"
_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class TransformParams:
    """Parameters of the dispersion least-squares problem; they fully determine ``R`` (see the
    dispersion page). Also the ``transform`` section of a ``disperse`` recipe pass."""

    small: int = field(default=3, metadata={"doc": "small (original) kernel size"})
    large: int = field(default=5, metadata={"doc": "large (dispersed) kernel size"})
    scale: int = field(default=2, metadata={"doc": "scale s of the structure-level equations"})
    input_size: int = field(default=3, metadata={"doc": "size n of the input patch of the least-squares problem"})
    eta: float = field(default=0.05, metadata={"doc": "weight of the pixel-level equations"})

    def __post_init__(self) -> None:
        _validate(self.small, self.large, self.scale, self.input_size, self.eta)
        # Normalise so that (3, 5, 2, 3, 1) and (3, 5, 2, 3, 1.0) share one cache entry.
        for name in ("small", "large", "scale", "input_size"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "eta", float(self.eta))

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of ``R``: (large**2, small**2)."""
        return (self.large * self.large, self.small * self.small)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _validate(small: Any, large: Any, scale: Any, input_size: Any, eta: Any) -> None:
    for name, value in (
        ("small", small),
        ("large", large),
        ("scale", scale),
        ("input_size", input_size),
    ):
        if not _is_int(value):
            raise TransformError(f"{name} must be an integer, got {value!r}")
    small, large, scale, input_size = int(small), int(large), int(scale), int(input_size)
    if small < 1 or small % 2 == 0:
        raise TransformError(f"small kernel size must be a positive odd integer, got {small}")
    if large % 2 == 0:
        raise TransformError(f"large kernel size must be odd, got {large}")
    if large <= small:
        raise TransformError(f"large kernel ({large}) must be bigger than small kernel ({small})")
    if scale < 1:
        raise TransformError(f"scale must be >= 1, got {scale}")
    if input_size < 1:
        raise TransformError(f"input_size must be >= 1, got {input_size}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating)):
        raise TransformError(f"eta must be a number, got {eta!r}")
    if not math.isfinite(float(eta)) or float(eta) <= 0:
        raise TransformError(f"eta must be a finite number > 0, got {eta}")
    for name, value, limit in (("small", small, MAX_SMALL), ("large", large, MAX_LARGE), ("scale", scale, MAX_SCALE),
                               ("input_size", input_size, MAX_INPUT)):
        if value > limit:
            raise TransformError(f"{name} must be <= {limit}, got {value}")
    need = _system_bytes(small, large, scale, input_size)
    if need > MAX_SYSTEM_BYTES:
        raise TransformError(
            f"the least-squares system for these sizes needs about {need / 2**30:.1f} GiB "
            f"(limit {MAX_SYSTEM_BYTES / 2**30:.1f} GiB); use a smaller input_size, scale or large"
        )


# Size bounds: every published setting is far inside them (kernels 3 -> 5..9, scale 2..4,
# input 3..5); beyond them the system takes gigabytes and the solution is numerically noise.
MAX_SMALL, MAX_LARGE, MAX_SCALE, MAX_INPUT = 15, 31, 8, 32
MAX_SYSTEM_BYTES = 1 << 29
MAX_ENTRY = 1e3  # |R| entries of a sound solution are ~1; far above is a rank-deficient blow-up


def _system_bytes(small: int, large: int, scale: int, input_size: int) -> int:
    """float64 bytes of the dense bases and stacked rows :func:`_linear_system` builds."""
    m = scale * (input_size - 1) + 1
    n2, m2 = input_size * input_size, m * m
    return 8 * (large * large * m2 * m2 + (small * small + large * large) * n2 * n2 + 2 * m2 * n2 * (large * large + small * small))


def _upsample_matrix(n: int, scale: int) -> np.ndarray:
    """Align-corners linear upsampling from ``n`` to ``scale*(n-1)+1`` samples, as a matrix."""
    m = scale * (n - 1) + 1
    up = np.zeros((m, n))
    for i in range(m):
        pos = i * (n - 1) / (m - 1) if m > 1 else 0.0
        lo = min(math.floor(pos), n - 1)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        up[i, lo] += 1.0 - frac
        up[i, hi] += frac
    return up


def _conv_basis(grid: int, k: int) -> np.ndarray:
    """``E[t]``: the (grid², grid²) matrix of zero-padded 'same' cross-correlation with delta tap t.

    A kernel ``w`` (row-major flattened) acts on a flattened ``grid x grid`` image as
    ``sum_t w[t] * E[t]``; this is what makes every equation linear in the kernel entries.
    """
    c = k // 2
    basis = np.zeros((k * k, grid * grid, grid * grid))
    for u in range(k):
        for v in range(k):
            for p in range(grid):
                i = p + u - c
                if not 0 <= i < grid:
                    continue
                for q in range(grid):
                    j = q + v - c
                    if 0 <= j < grid:
                        basis[u * k + v, p * grid + q, i * grid + j] = 1.0
    return basis


def _linear_system(params: TransformParams) -> tuple[np.ndarray, np.ndarray]:
    """The stacked system ``A b = B a`` ([structure; eta * pixel] rows, all-zero rows dropped)."""
    s, big, n, eta = params.small, params.large, params.input_size, float(params.eta)
    up1 = _upsample_matrix(n, params.scale)
    up2 = np.kron(up1, up1)  # row-major 2-D upsampling of a flattened n x n image
    m = up1.shape[0]
    big_on_up = _conv_basis(m, big)
    small_on_x = _conv_basis(n, s)
    big_on_x = _conv_basis(n, big)
    # Each row: one (output pixel, input entry) coefficient; columns: kernel taps.
    a_struct = np.stack([(e @ up2).ravel() for e in big_on_up], axis=1)
    b_struct = np.stack([(up2 @ e).ravel() for e in small_on_x], axis=1)
    a_pixel = np.stack([e.ravel() for e in big_on_x], axis=1)
    b_pixel = np.stack([e.ravel() for e in small_on_x], axis=1)
    lhs = np.vstack([a_struct, eta * a_pixel])
    rhs = np.vstack([b_struct, eta * b_pixel])
    keep = np.any(lhs != 0, axis=1) | np.any(rhs != 0, axis=1)
    return lhs[keep], rhs[keep]


@functools.lru_cache(maxsize=64)
def _solve(params: TransformParams) -> np.ndarray:
    lhs, rhs = _linear_system(params)
    # Minimum-norm least squares by SVD: identical to the normal equations when A has full
    # column rank (every published setting), and still the optimum when it does not (outer
    # taps of a kernel wider than the upsampled input never meet it and get 0).  The SVD
    # driver matters: scipy's default 'gelsd' returned a non-stationary point on
    # rank-deficient systems such as (3, 7, 2, 2, 0.3); 'gelss' does not.
    solution, _, _, _ = scipy.linalg.lstsq(lhs, rhs, lapack_driver="gelss")
    solution = np.ascontiguousarray(solution, dtype=np.float64)
    if not np.isfinite(solution).all() or float(np.abs(solution).max()) > MAX_ENTRY:
        raise TransformError(
            f"the dispersion least-squares problem is numerically unstable for {params} "
            f"(|R| reaches {float(np.abs(solution).max()):.3g}); use a smaller large kernel or a larger input_size"
        )
    solution.setflags(write=False)
    return solution


def dispersion_transform(
    small: int = 3, large: int = 5, scale: int = 2, input_size: int = 3, eta: float = 0.05
) -> np.ndarray:
    """Return ``R`` of shape (large², small²) with ``vec(b) = R @ vec(a)`` (row-major).

    Solved once per parameter tuple (cached); the array returned is a read-only view of the
    cached solution, so callers can neither corrupt the cache nor pay for a copy.
    """
    params = TransformParams(small, large, scale, input_size, eta)
    view = _solve(params).view()
    view.setflags(write=False)
    return view


@functools.lru_cache(maxsize=64)
def transform_tensor(params: TransformParams) -> torch.Tensor:
    """``R`` for ``params`` as a float64 CPU tensor: one shared object per distinct parameters.

    Every conv dispersed with the same transform holds this same object (a plain attribute,
    not a buffer), so a patched UNet carries one 25x9 matrix, not one kernel per layer.
    Treat it as read-only: it is shared.
    """
    return torch.from_numpy(np.array(_solve(params), dtype=np.float64))  # a copy of the cached array


def transform_key(params: TransformParams) -> str:
    """``small-large-scale-input_size-eta`` (e.g. ``3-5-2-3-0.05``): names ``R`` in an adapter."""
    return f"{params.small}-{params.large}-{params.scale}-{params.input_size}-{params.eta!r}"


def disperse_kernel(weight: torch.Tensor, transform: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map an (out, in, [kt,] S, S) kernel to (out, in, [kt,] L, L) with ``R``, tap by tap.

    For a Conv3d kernel every temporal tap is dispersed on its own.  The result has the
    weight's dtype and device; the product is computed in float64 on CPU and in float32 on
    accelerators for accuracy before the final cast (:func:`apply_transform`).
    """
    if isinstance(transform, np.ndarray):
        r = torch.from_numpy(np.array(transform, dtype=np.float64))  # small; copy is writable
    else:
        r = transform
    check_transform_fits(r, weight.shape)
    return apply_transform(weight.detach(), r)


def check_transform_fits(transform: torch.Tensor, weight_shape: tuple[int, ...] | torch.Size) -> None:
    """Refuse an ``R`` that is not (L*L, S*S) or a weight that does not end in an S x S kernel."""
    if transform.ndim != 2:
        raise TransformError(f"transform must be a 2-D matrix, got shape {tuple(transform.shape)}")
    big = math.isqrt(transform.shape[0])
    small = math.isqrt(transform.shape[1])
    if big * big != transform.shape[0] or small * small != transform.shape[1]:
        raise TransformError(f"transform shape {tuple(transform.shape)} is not (L*L, S*S)")
    if len(weight_shape) not in (4, 5) or tuple(weight_shape[-2:]) != (small, small):
        raise TransformError(
            f"weight of shape {tuple(weight_shape)} does not end in a {small}x{small} kernel"
        )


def apply_transform(weight: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """The dispersed kernel ``R @ w`` per (out, in[, tap]), as a chain of torch ops.

    No checks and no detach: the patched forward calls it on the live weight every time the
    dispersed kernel is used, so weight edits after apply count, gradients reach the weight,
    and nothing is cached (torch.compile and torch.export trace it as ordinary ops). Works
    in float64 on CPU and float32 elsewhere, then casts to the weight's dtype.
    """
    small = weight.shape[-1]
    big = math.isqrt(transform.shape[0])
    work = torch.float64 if weight.device.type == "cpu" else torch.float32
    # one expression, so the float64 copy of w is freed before the cast allocates the result
    out = weight.to(work).reshape(*weight.shape[:-2], small * small) @ transform.to(device=weight.device, dtype=work).T
    return out.reshape(*weight.shape[:-2], big, big).to(weight.dtype).contiguous()


def save_transform(
    path: str | os.PathLike[str], transform: np.ndarray, params: TransformParams
) -> None:
    """Write ``R`` as safetensors with its parameters in the metadata (atomically)."""
    arr = np.ascontiguousarray(transform, dtype=np.float64)
    if arr.shape != params.shape:
        raise TransformError(
            f"transform shape {arr.shape} does not match {params} ({params.shape})"
        )
    metadata = {k: json.dumps(v) for k, v in asdict(params).items()}
    metadata["format"] = _FORMAT
    metadata["format_version"] = _FORMAT_VERSION
    with atomic_path(path) as tmp:
        save_file({_TENSOR_KEY: arr}, str(tmp), metadata=metadata)


def load_transform(path: str | os.PathLike[str]) -> tuple[np.ndarray, TransformParams]:
    """Read a transform written by :func:`save_transform`; any inconsistency is a TransformError."""
    target = Path(path)
    if not target.is_file():
        raise TransformError(f"{target}: no such transform file")
    try:
        with safe_open(str(target), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(target))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TransformError(f"{target}: not a readable safetensors file ({exc})") from exc
    if metadata.get("format") != _FORMAT:
        raise TransformError(f"{target}: metadata does not mark a dispersion transform")
    fields = ("small", "large", "scale", "input_size", "eta")
    missing = [k for k in fields if k not in metadata]
    if missing:
        raise TransformError(f"{target}: metadata lacks {', '.join(missing)}")
    from unet_surgery.io import parse_bounded_json

    values = {k: parse_bounded_json(metadata[k], f"{target}: malformed metadata: {k}", TransformError) for k in fields}
    params = TransformParams(**values)
    if set(tensors) != {_TENSOR_KEY}:
        raise TransformError(
            f"{target}: expected one tensor {_TENSOR_KEY!r}, found {sorted(tensors)}"
        )
    arr = tensors[_TENSOR_KEY]
    if arr.dtype != np.float64 or arr.shape != params.shape:
        raise TransformError(
            f"{target}: tensor is {arr.dtype} {arr.shape}, metadata implies float64 {params.shape}"
        )
    return arr, params
