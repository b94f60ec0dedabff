"""Exception types: one base class so callers (and the CLI) can catch every failure we raise."""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class of every error unet-surgery raises on purpose."""


class MappingError(SurgeryError):
    """The model could not be mapped (not a UNet, forward fails on the probe input, ...)."""


class PresetError(SurgeryError):
    """An unknown architecture preset or a malformed preset file."""


class CheckpointError(SurgeryError):
    """A checkpoint is missing, corrupt, of an unknown layout or does not fit the model."""


class TransformError(SurgeryError):
    """A dispersion transform has invalid parameters or a malformed file."""


class RecipeError(SurgeryError):
    """A recipe document is invalid; the message names the path of the bad field."""


class SelectionError(SurgeryError):
    """A selector matched no module of the model."""
