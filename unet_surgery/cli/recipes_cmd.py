"""``unet-surgery recipes list | show NAME | validate FILE``."""

from __future__ import annotations

import argparse

from unet_surgery.recipes import list_recipes, load_recipe
from unet_surgery.recipes.library import dump_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("recipes", help="list, show and validate recipes",
                                   description="List the shipped recipes, show one, or validate a recipe file.")
    sub = parser.add_subparsers(dest="recipes_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="names and descriptions of the shipped recipes").set_defaults(func=run_list)
    show = sub.add_parser("show", help="print a recipe as YAML")
    show.add_argument("name", help="shipped recipe name or recipe file")
    show.set_defaults(func=run_show)
    validate = sub.add_parser("validate", help="check a recipe file against the schema")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(func=run_validate)


def run_list(args: argparse.Namespace) -> int:
    names = list_recipes()
    width = max(map(len, names), default=0)
    for name in names:
        recipe = load_recipe(name)
        first = recipe.description.split(". ")[0].rstrip(".")
        print(f"{name:<{width}}  {first}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    print(dump_recipe(load_recipe(args.name)), end="")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    for file in args.files:
        recipe = load_recipe(file)
        print(f"{file}: ok ({recipe.name}, {len(recipe.passes)} pass(es))")
    return 0
