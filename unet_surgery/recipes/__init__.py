"""Declarative recipes: the parser, the recipe builders and the shipped library.

Above :mod:`unet_surgery.passes` (the pass configs, ``RedilatePass``..., are defined beside
their handlers there and re-exported here) and :mod:`unet_surgery.core` (the data types).
"""

from unet_surgery.core.selectors import Selection, select
from unet_surgery.passes import DispersePass, NoiseDampedCFGPass, RedilatePass, ScaleFusionPass
from unet_surgery.recipes.library import list_recipes, load_recipe, recipes_dir
from unet_surgery.recipes.schema import (
    LevelRange,
    PassConfig,
    Recipe,
    SamplingSpec,
    ScheduleSpec,
    Selector,
    TransformSpec,
    parse_recipe,
    to_data,
)

__all__ = [
    "DispersePass",
    "LevelRange",
    "NoiseDampedCFGPass",
    "PassConfig",
    "Recipe",
    "RedilatePass",
    "SamplingSpec",
    "ScaleFusionPass",
    "ScheduleSpec",
    "Selection",
    "Selector",
    "TransformSpec",
    "list_recipes",
    "load_recipe",
    "parse_recipe",
    "recipes_dir",
    "select",
    "to_data",
]

