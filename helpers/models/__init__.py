"""Small model forwards written for the notebooks (no transformers / hub dependency)."""

from helpers.models.minilm import MiniLM, load_minilm

__all__ = ["MiniLM", "load_minilm"]
