"""``unet-surgery recipes list | show NAME | validate FILE``."""

from __future__ import annotations

import argparse
import sys
import warnings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("recipes", help="list, show and validate recipes",
                                   description="List the shipped recipes, show one, or validate a recipe file.")
    sub = parser.add_subparsers(dest="recipes_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="names and descriptions of the shipped recipes").set_defaults(func=run_list)
    show = sub.add_parser("show", help="print a recipe as YAML")
    show.add_argument("name", help="shipped recipe name or recipe file")
    show.set_defaults(func=run_show)
    validate = sub.add_parser(
        "validate",
        help="check a recipe file against the schema; warn about passes that cannot act",
        description="Parse each recipe and print ok, or the first error naming its field. Passes that "
        "can have no effect (a factor of 1, an empty step window, noise-damped guidance whose "
        "damped branch equals the main branch) are reported as warnings on stderr; with --model "
        "the recipe is also planned on that model, so per-layer reasons are found too.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument("--model", metavar="MODEL", default=None,
                          help="also check the recipes fit this preset, folder or checkpoint (its structure; "
                          "mapped on meta) and plan them on it")
    validate.add_argument("--force", action="store_true",
                          help="with --model: plan a recipe made for another UNet structure, family or base size instead of refusing it")
    validate.set_defaults(func=run_validate)


def run_list(args: argparse.Namespace) -> int:
    from unet_surgery.recipes.library import list_recipes, load_recipe

    names = list_recipes()
    width = max(map(len, names), default=0)
    for name in names:
        recipe = load_recipe(name)
        first = recipe.description.split(". ")[0].rstrip(".")
        print(f"{name:<{width}}  {first}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from unet_surgery.recipes.library import dump_recipe, load_recipe

    print(dump_recipe(load_recipe(args.name)), end="")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from unet_surgery.passes import make_plan, no_effect_reasons
    from unet_surgery.recipes.fit import check_fit
    from unet_surgery.recipes.library import load_recipe

    unet_map = model = None
    if args.model is not None:
        from unet_surgery.graph import map_unet
        from unet_surgery.loading import resolve_model

        model = resolve_model(args.model, device="meta").model
        unet_map = map_unet(model)
    for file in args.files:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recipe = load_recipe(file)
            if unet_map is not None:
                check_fit(recipe, unet_map, model, force=args.force)
        plan = make_plan(recipe, unet_map) if unet_map is not None else None
        print(f"{file}: ok ({recipe.name}, {len(recipe.passes)} pass(es))")
        for message in [str(w.message) for w in caught] + no_effect_reasons(recipe, plan):
            print(f"{file}: warning: {message}", file=sys.stderr)
    return 0
