"""Inference engines: chat conversations in, texts out, behind one interface."""

from genpi.engines.base import Conversation, Engine, Generation, SamplingParams

__all__ = ["Conversation", "Engine", "Generation", "SamplingParams"]
