"""gguf-appliance: a streaming LLM node over llama.cpp."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
