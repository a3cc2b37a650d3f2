"""EDC dataset condensation as a cached, versioned DVC pipeline."""

__version__ = "0.1.0"
