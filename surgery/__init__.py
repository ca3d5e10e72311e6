"""surgery: take a Hugging Face LLM and make it run on edge NPUs."""

__version__ = "0.1.0"
