"""Declarative recipes: the schema, selectors and the shipped library."""

from unet_surgery.recipes.library import list_recipes, load_recipe, recipes_dir
from unet_surgery.recipes.schema import (
    DispersePass,
    LevelRange,
    NoiseDampedCFGPass,
    Recipe,
    RedilatePass,
    SamplingSpec,
    ScaleFusionPass,
    ScheduleSpec,
    Selector,
    TransformSpec,
    parse_recipe,
    to_data,
)
from unet_surgery.recipes.selectors import Selection, select

__all__ = [
    "DispersePass",
    "LevelRange",
    "NoiseDampedCFGPass",
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
