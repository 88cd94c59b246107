"""Apache Airflow provider for ByteDance JiMeng 4.0 (Seedream 4.0) image generation."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
