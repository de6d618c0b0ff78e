"""The package version, for the files mixret writes (config.json, meta.json)."""
__version__ = "0.1.0"
