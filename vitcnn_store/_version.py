"""The package version and the store format version it writes."""

__all__ = ["FORMAT_VERSION", "READABLE_FORMATS", "__version__"]

__version__ = "0.2.0"
#: Store format written by this version (docs/format.md).
FORMAT_VERSION = 2
#: Store formats this version reads: format 1 stores stay readable (without checksums).
READABLE_FORMATS = (1, 2)
