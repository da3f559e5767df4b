"""The package's version, in a module of its own so that the store can record it without
importing the package root (which names the verbs, above the store)."""

__version__ = "0.1.0"
