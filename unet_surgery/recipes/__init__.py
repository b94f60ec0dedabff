"""Declarative recipes: the schema, selectors and the shipped library.

The pass configs (``RedilatePass``...) are defined beside their handlers in
:mod:`unet_surgery.passes` and re-exported here on first use.
"""

from typing import Any

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
from unet_surgery.recipes.selectors import Selection, select

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


def __getattr__(name: str) -> Any:
    """The built-in pass configs, imported lazily (the passes import this package)."""
    if name in ("RedilatePass", "DispersePass", "NoiseDampedCFGPass", "ScaleFusionPass"):
        import unet_surgery.passes as passes

        return getattr(passes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
