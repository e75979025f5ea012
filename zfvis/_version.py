"""The version of zfvis (one place; ``zfvis.__version__`` re-exports it)."""

__version__ = "0.1.0"
