"""raylib: fine-tuning, search and expert serving on Ray clusters, from one YAML job."""

__version__ = "0.1.0"
