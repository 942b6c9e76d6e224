"""Small model forwards written for the notebooks (no transformers / hub dependency)."""

from helpers.models.decoder import Decoder, DecoderConfig, GenerationOutput
from helpers.models.minilm import MiniLM, load_minilm

__all__ = ["Decoder", "DecoderConfig", "GenerationOutput", "MiniLM", "load_minilm"]
