"""FouriScale's recipe builder, kept at its old import path: it lives in :mod:`unet_surgery.passes.fouriscale.builder`."""

from unet_surgery.passes.fouriscale.builder import fouriscale_layers, fouriscale_recipe

__all__ = ["fouriscale_layers", "fouriscale_recipe"]
