"""The launcher's version (setup.py reads it from here; the run report records it)."""

__version__ = "0.1.0"
