"""Tests of loading checkpoints and exporting patched models."""
