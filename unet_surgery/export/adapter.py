"""The surgery adapter: a small folder that re-creates a patch on the base model it was made for.

Only what the surgery adds is stored: the recipe (``recipe.yaml``), each handler's
:meth:`~unet_surgery.passes.base.PassHandler.adapter_tensors` (``adapter.safetensors``: one
dispersion transform ``R`` per distinct transform, keyed ``dispersion_R/3-5-2-3-0.05``; no
kernels, since they are computed from the live weights), and ``adapter.json`` with the format
version, recipe name, model class, the layers patched and a
:func:`~unet_surgery.export.fingerprint.fingerprint` of the base weights. Every shipped
recipe's adapter is a few kilobytes. Loading re-applies the recipe and checks that the
tensors this library computes equal the stored ones (``R`` to float64 rounding), so a
library version that disperses differently or a corrupted file is caught, and the
fingerprint catches a different base.

Format 2 stored one dispersed kernel and one ``R`` per layer (``<path>.dispersed_weight``,
``<path>.dispersion_R``). Such adapters still load: their kernels are checked against the
ones computed from this base's weights, then ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet_surgery.errors import CheckpointError, SurgeryError
from unet_surgery.export.fingerprint import fingerprint
from unet_surgery.export.manifest import (
    check_adapter_meta,
    manifest_digest,
    read_manifest,
    sha256_file,
)
from unet_surgery.export.staging import export_files, staged_folder
from unet_surgery.graph import UNetMap
from unet_surgery.ops.redilate import dispersed_weight, dispersion_of
from unet_surgery.patching.patch import Patch, apply

ADAPTER_FORMAT = "unet-surgery-adapter"
# 2: full-weight fingerprint, required file list, manifest digest, "filtered";
# 3: no dispersed kernels, one R per distinct transform (2 is still read, see _check_v2_tensors)
ADAPTER_VERSION = 3
RECIPE_FILE, TENSORS_FILE, META_FILE = "recipe.yaml", "adapter.safetensors", "adapter.json"
SUPPORTED_ADAPTER_VERSIONS = (2, 3)
V2_KERNEL_SUFFIX, V2_TRANSFORM_SUFFIX = ".dispersed_weight", ".dispersion_R"
R_TOLERANCE = 1e-12
"""Largest |stored R - computed R| / max(1, max |R|) accepted: float64 rounding, which may
differ between LAPACK builds; a different transform differs by far more."""


def _weights_dtype(model: nn.Module) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def adapter_tensors(patch: Patch) -> dict[str, torch.Tensor]:
    """What the surgery adds to the model, from every pass's handler (e.g. dispersion transforms ``R``)."""
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in patch.plan.layers.items():
        module = patch.model.get_submodule(path)
        for part in layer.parts:
            tensors.update(part.handler.adapter_tensors(path, module, part.entry))
    return tensors


def sort_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place and at the same length.

    safetensors writes its maps (tensor names, ``__metadata__``) in an order that changes from
    run to run, so two exports of one patch would differ in bytes; sorted, they are identical,
    and an export that is already there is recognised as the same (``staging.may_replace``).
    """
    with path.open("r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        text = json.dumps(json.loads(f.read(size)), sort_keys=True, separators=(",", ":")).encode()
        if len(text) <= size:  # the same tokens in another order: never longer
            f.seek(8)
            f.write(text.ljust(size, b" "))


def write_adapter_files(patch: Patch, folder: Path) -> dict[str, Any]:
    """Write the three adapter files into ``folder`` (``adapter.json`` last); return its data."""
    from safetensors.torch import save_file

    from unet_surgery._version import __version__
    from unet_surgery.recipes.library import dump_recipe

    if not patch.active:
        raise SurgeryError("the patch has been removed; apply it again before saving")
    (folder / RECIPE_FILE).write_text(dump_recipe(patch.recipe), encoding="utf-8")
    save_file(adapter_tensors(patch), str(folder / TENSORS_FILE), metadata={"format": "pt", "recipe": patch.recipe.name})
    sort_safetensors_header(folder / TENSORS_FILE)
    meta = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "recipe": patch.recipe.name,
        "model_class": type(patch.model).__name__,
        "fingerprint": fingerprint(patch.model),
        "dtype": _weights_dtype(patch.model),
        "num_train_timesteps": patch.tracker.num_train_timesteps,
        "layers": patch.plan.groups(),
        "filtered": _filtered(patch),
        "files": {name: sha256_file(folder / name) for name in (RECIPE_FILE, TENSORS_FILE)},
        "created_by": f"unet-surgery {__version__}",
        "export_files": export_files(folder, META_FILE),  # proves the folder is ours to replace
    }
    meta["manifest_sha256"] = manifest_digest(meta)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _filtered(patch: Patch) -> bool:
    """Whether the patch holds fewer layers than its recipe selects (it was applied with a filter)."""
    from unet_surgery.passes.base import make_plan

    return make_plan(patch.recipe, patch.unet_map).groups() != patch.plan.groups()


def save_patch(patch: Patch, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Save ``patch`` as an adapter folder (atomically: all files or none). Returns the folder.

    An earlier export in ``directory`` with the same files is kept; one with other content is
    replaced only with ``overwrite``; any other folder is refused.

    Args:
        patch: the applied recipe to save.
        directory: the adapter folder to write (new, empty or an earlier adapter).
        overwrite: replace an earlier export with other content.
    """
    directory = Path(directory)
    with staged_folder(directory, overwrite=overwrite) as stage:
        write_adapter_files(patch, stage)
    return directory


def read_adapter_meta(directory: str | Path) -> dict[str, Any]:
    """``adapter.json``, validated, with every file it lists checked against its sha256.

    Args:
        directory: an adapter folder.
    """
    directory = Path(directory)
    meta_file = directory / META_FILE
    meta = read_manifest(meta_file, missing=f"{directory} is not a surgery adapter: {META_FILE} is missing")
    check_adapter_meta(meta, meta_file, ADAPTER_FORMAT, SUPPORTED_ADAPTER_VERSIONS, (RECIPE_FILE, TENSORS_FILE))
    for name, expected in meta["files"].items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if sha256_file(file) != expected:
            raise CheckpointError(f"{file} is corrupt or truncated (its sha256 differs from {META_FILE})")
    return meta


def _same_tensor(ref: torch.Tensor, new: torch.Tensor) -> bool:
    """Equal, or (a base loaded at another precision) equal up to that precision's rounding.

    float64 tensors (the transforms ``R``, solved by least squares) may differ by float64
    rounding between LAPACK builds: :data:`R_TOLERANCE`, relative to their largest entry.
    """
    if ref.dtype == new.dtype == torch.float64:
        if not new.numel():
            return True
        scale = max(1.0, float(new.abs().max()))
        return bool(torch.isfinite(ref).all()) and float((ref - new).abs().max()) <= R_TOLERANCE * scale
    if ref.dtype == new.dtype:
        return torch.equal(ref, new)
    eps = max(torch.finfo(ref.dtype).eps, torch.finfo(new.dtype).eps)
    scale = float(ref.abs().max().float()) or 1.0
    return float((ref.float() - new.float()).abs().max()) <= 16 * eps * scale


def _check_tensors(patch: Patch, stored: dict[str, torch.Tensor], where: Path) -> None:
    """The tensors the recipe recomputes on this base must be the stored ones, in the same dtype
    (format 3 stores transforms, which do not depend on the base's precision)."""
    _compare(adapter_tensors(patch), stored, where, same_dtype=True)


def _v2_tensors(patch: Patch) -> dict[str, torch.Tensor]:
    """What a format-2 adapter of this patch held: per dispersed layer its kernel (computed now
    from the live weight) and its ``R``."""
    tensors: dict[str, torch.Tensor] = {}
    for path in patch.plan.layers:
        module = patch.model.get_submodule(path)
        kernel, transform = dispersed_weight(module), dispersion_of(module)
        if kernel is not None and transform is not None:
            tensors[path + V2_KERNEL_SUFFIX] = kernel.to("cpu")
            tensors[path + V2_TRANSFORM_SUFFIX] = transform
    return tensors


def _check_v2_tensors(patch: Patch, stored: dict[str, torch.Tensor], where: Path) -> None:
    """A format-2 adapter: its stored kernels must equal the ones computed from this base.

    The stored kernels are then ignored (the patch computes them on the fly); re-saving the
    patch writes format 3.
    """
    _compare(_v2_tensors(patch), stored, where, version=2)


def _compare(
    recomputed: dict[str, torch.Tensor],
    stored: dict[str, torch.Tensor],
    where: Path,
    version: int = ADAPTER_VERSION,
    same_dtype: bool = False,
) -> None:
    if set(recomputed) != set(stored):
        odd = sorted(set(recomputed) ^ set(stored))
        raise CheckpointError(
            f"{where}: stored tensors do not match the recipe's layers (format {version}; e.g. {odd[0]})"
        )
    for key in sorted(recomputed):
        new, ref = recomputed[key], stored[key]
        if ref.shape != new.shape:
            raise CheckpointError(f"{where}: stored {key} has shape {tuple(ref.shape)}, recomputed {tuple(new.shape)}")
        if same_dtype and ref.dtype != new.dtype:
            raise CheckpointError(f"{where}: stored {key} is {ref.dtype}, expected {new.dtype}")
        if not _same_tensor(ref, new):
            raise CheckpointError(
                f"{where}: {key} computed by this unet-surgery on this model differs from the stored one "
                "(the adapter was made for other weights or by a version that computes it differently); "
                "export the adapter again"
            )


def load_patch(
    model: nn.Module,
    directory: str | Path,
    *,
    unet_map: UNetMap | None = None,
    verify_fingerprint: bool = True,
    force: bool = False,
) -> Patch:
    """Re-apply the adapter in ``directory`` to ``model`` (in place) and return the :class:`Patch`.

    Refuses, with :class:`CheckpointError`, a model of another class, base weights whose
    fingerprint differs (``verify_fingerprint=False`` applies the recipe anyway), corrupt
    files, a recipe that now selects other layers, or stored transforms ``R`` other than the
    ones this library computes. A format-2 adapter (stored kernels) loads too: with
    ``verify_fingerprint`` its kernels must equal the ones computed from this base's weights.

    Args:
        model: the base UNet to patch.
        directory: an adapter folder written by :func:`save_patch` (or a patched folder).
        unet_map: the model's map, when the caller has one (skips mapping).
        verify_fingerprint: refuse base weights other than the ones the adapter was made for.
            The fingerprint is the stronger fit check: a base it accepts is the one the recipe
            was applied to when saved (forced or not), so the recipe's fit is not asked again.
        force: without ``verify_fingerprint``, apply the recipe even to a UNet of another
            structure, family or base size than the recipe's
            (:func:`~unet_surgery.recipes.fit.check_fit`).
    """
    from safetensors.torch import load_file

    from unet_surgery.recipes.library import load_recipe

    directory = Path(directory)
    meta = read_adapter_meta(directory)
    if meta.get("model_class") != type(model).__name__:
        raise CheckpointError(f"{directory}: adapter is for a {meta.get('model_class')}, not a {type(model).__name__}")
    if verify_fingerprint:
        actual = fingerprint(model)
        if actual != meta.get("fingerprint"):
            raise CheckpointError(
                f"{directory}: this model's weights are not the base the adapter was made for "
                f"(fingerprint {actual[:19]}... != {str(meta.get('fingerprint'))[:19]}...)"
            )
    recipe = load_recipe(directory / RECIPE_FILE)
    try:
        stored = load_file(str(directory / TENSORS_FILE))
    except Exception as exc:
        raise CheckpointError(f"{directory / TENSORS_FILE} is not a valid safetensors file ({exc})") from exc
    layers = meta["layers"]
    keep = {path for paths in layers.values() for path in paths}
    patch = apply(  # unfiltered unless saved so: a trimmed layers list is then a mismatch
        model,
        recipe,
        unet_map=unet_map,
        filter_fn=(lambda path, op: path in keep) if meta["filtered"] else None,
        num_train_timesteps=meta["num_train_timesteps"],
        force=force or verify_fingerprint,
    )
    try:
        groups = patch.plan.groups()
        if any(groups.get(g, []) != layers.get(g, []) for g in set(groups) | set(layers)):
            raise CheckpointError(f"{directory}: the recipe selects other layers on this model than when it was saved")
        if meta["version"] == 2:
            if verify_fingerprint:  # v2 kernels depend on the weights
                _check_v2_tensors(patch, stored, directory)
        else:
            _check_tensors(patch, stored, directory)  # R depends on the recipe alone
    except BaseException:
        patch.remove()
        raise
    return patch
