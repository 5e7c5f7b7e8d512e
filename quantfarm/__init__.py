"""Quantfarm: a team-wide model quantization farm."""

__version__ = "0.1.0"
