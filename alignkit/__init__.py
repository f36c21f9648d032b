"""alignkit: align language models with human preferences, end to end."""

__version__ = "0.1.0"
