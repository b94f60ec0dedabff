"""The package version, importable without importing the package (no import cycle through
``unet_surgery/__init__``); ``pyproject.toml`` states the same number."""

__version__ = "0.2.0"
