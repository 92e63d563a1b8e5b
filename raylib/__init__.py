"""raylib: fine-tuning, search and expert serving on Ray clusters, from one YAML job."""

__version__ = "0.1.0"

from raylib import noise as _noise  # noqa: E402

_noise.install()  # known third-party notices, filtered before any library that prints them loads
