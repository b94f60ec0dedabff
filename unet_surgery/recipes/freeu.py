"""FreeU's recipe builder, kept at its old import path: it lives in :mod:`unet_surgery.passes.freeu.builder`."""

from unet_surgery.passes.freeu.builder import SETTINGS, V2_SETTINGS, freeu_pass, freeu_recipe

__all__ = ["SETTINGS", "V2_SETTINGS", "freeu_pass", "freeu_recipe"]
