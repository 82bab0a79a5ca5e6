"""Parley: a self-hosted voice agent service speaking OpenAI's audio APIs."""

__version__ = "0.1.0"
