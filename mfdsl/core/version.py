"""mfdsl's version: one static assignment, read by setuptools without importing mfdsl."""

__version__ = "0.1.0"
