"""Ember: a fast LLM inference engine and agent stack in Python."""

__version__ = "0.1.0"
