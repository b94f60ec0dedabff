"""Shipped toy-model weights and config (package data, read via importlib.resources)."""
