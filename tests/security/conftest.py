"""Fixtures shared with the generate tests: the tiny SD1.5 pipeline folder."""

from tests.generate.conftest import sd15_folder  # noqa: F401 (a fixture, used by name)
