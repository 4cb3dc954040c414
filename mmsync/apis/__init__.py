"""High-level entry points on top of the engine: a trained model in one
call."""
from .inference import init_model

__all__ = ['init_model']
