"""The package version, in one place (imported by every record writer)."""

__version__ = "0.1.0"
