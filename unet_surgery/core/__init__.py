"""The layer below passes and recipes: the recipe data types, layer selection, the pass registry.

Imports go one way: ``recipes -> passes -> core``; nothing here imports a pass or a recipe
builder. See ``docs/architecture.md``.
"""
