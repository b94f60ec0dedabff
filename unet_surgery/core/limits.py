"""Sizes the toolkit accepts, in one place (no torch import: the CLI's checks read it too)."""

MAX_SIDE = 16384
"""Pixels a side of any image, recipe resolution or export size: SDXL at 8x its area (FreeScale's
8K setting) is 8192, so this leaves a factor of two; larger values are input errors."""
