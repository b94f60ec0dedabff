"""A fingerprint of a model's base weights, so an adapter refuses a base it was not made for.

Hashing every byte of a 2.5B-parameter UNet takes tens of seconds; instead the hash covers
every tensor's name and shape plus a fixed sample of its values (evenly spaced flat indices),
which changes when any layer is fine-tuned, swapped or re-initialised, and costs well under a
second for SDXL. Sampled values are rounded to float16 before hashing, so an fp32 base and
its fp16 copy share a fingerprint (the precision is recorded separately). The weights must be
real: a ``meta`` model has no values to sample.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from unet_surgery.errors import CheckpointError

SAMPLES_PER_TENSOR = 64
FINGERPRINT_VERSION = 1


def _sample(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return b""
    index = torch.linspace(0, n - 1, steps=min(n, SAMPLES_PER_TENSOR), dtype=torch.float64)
    values = flat[index.round().long().to(flat.device)]
    return values.to(device="cpu", dtype=torch.float16).numpy().tobytes()


def fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` over the persistent state's names, shapes and sampled values."""
    digest = hashlib.sha256(f"unet-surgery-fingerprint-v{FINGERPRINT_VERSION}\n".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_meta:
            raise CheckpointError(
                f"cannot fingerprint a model on the meta device ({name} has no values); "
                "load real weights first (unet_surgery.load_unet)"
            )
        digest.update(f"{name}:{tuple(tensor.shape)}\n".encode())
        digest.update(_sample(tensor))
    return "sha256:" + digest.hexdigest()
