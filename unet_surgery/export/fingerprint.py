"""A fingerprint of a model's base weights, so an adapter refuses a base it was not made for.

The hash covers every tensor of the persistent state: its name, its shape and *all* of its
values (version 1 sampled 64 values per tensor, so an edit elsewhere went unnoticed). Values
are rounded to float16 before hashing, so an fp32 base and its fp16 copy share a fingerprint
(the precision is recorded separately); they are hashed in chunks, so the copy made for the
rounding stays small. Measured on a randomly initialised full-size SD1.5 UNet (860M
parameters) on a CPU: see ``docs/security.md``. The weights must be real: a ``meta`` model
has no values to hash.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from unet_surgery.errors import CheckpointError

FINGERPRINT_VERSION = 2
_CHUNK = 1 << 24  # values per hashed chunk (32 MiB as float16)


def _update(digest: hashlib._Hash, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK].to(device="cpu", dtype=torch.float16)
        digest.update(chunk.numpy().tobytes())


def fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` over the persistent state's names, shapes and every value (as float16).

    Args:
        model: the module whose state to hash.
    """
    digest = hashlib.sha256(f"unet-surgery-fingerprint-v{FINGERPRINT_VERSION}\n".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_meta:
            raise CheckpointError(
                f"cannot fingerprint a model on the meta device ({name} has no values); "
                "load real weights first (unet_surgery.load_unet)"
            )
        digest.update(f"{name}:{tuple(tensor.shape)}\n".encode())
        _update(digest, tensor)
    return "sha256:" + digest.hexdigest()
