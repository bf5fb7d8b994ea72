"""PolychromaticLM building blocks (the PolyGLU family)."""

from models.polyglu.ffn import PolyGLU, SwiGLU, stacked_reference

__all__ = ["PolyGLU", "SwiGLU", "stacked_reference"]
