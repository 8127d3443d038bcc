"""The package version and the store format version it writes."""

__all__ = ["FORMAT_VERSION", "__version__"]

__version__ = "0.1.0"
FORMAT_VERSION = 1
