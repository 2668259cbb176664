"""The package's version, in a module of its own: modules inside the package read it from here (the model cache's
key records it) without importing the package's `__init__`, which imports them (an import cycle)."""

__version__ = "0.1.0"
