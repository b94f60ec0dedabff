"""Passes: one folder per pass type (``passes/<pass>/``: config + handler, its own maths and builder).

Importing this package registers the built-in passes (in this order, which is the order
error messages list them in). See :mod:`unet_surgery.passes.base` and ``docs/architecture.md``.
"""

from unet_surgery.passes.base import (
    LayerRewrite,
    PassHandler,
    Plan,
    handler_for,
    make_plan,
    no_effect_reasons,
    pass_types,
    register_pass,
)

from unet_surgery.passes.redilate import RedilatePass  # isort: skip
from unet_surgery.passes.disperse import DispersePass  # isort: skip
from unet_surgery.passes.noise_damped_cfg import NoiseDampedCFGPass  # isort: skip
from unet_surgery.passes.scale_fusion import ScaleFusionPass  # isort: skip
from unet_surgery.passes.freeu import FreeUPass  # isort: skip
from unet_surgery.passes.fouriscale import FouriScalePass  # isort: skip
from unet_surgery.passes.fouriscale.guidance import FouriScaleGuidancePass  # isort: skip
from unet_surgery.passes.rau_net import RauNetPass  # isort: skip
from unet_surgery.passes.msw_msa import MswMsaPass  # isort: skip

__all__ = [
    "DispersePass",
    "FouriScaleGuidancePass",
    "FouriScalePass",
    "FreeUPass",
    "LayerRewrite",
    "MswMsaPass",
    "NoiseDampedCFGPass",
    "PassHandler",
    "Plan",
    "RauNetPass",
    "RedilatePass",
    "ScaleFusionPass",
    "handler_for",
    "make_plan",
    "no_effect_reasons",
    "pass_types",
    "register_pass",
]
