"""lmlab: train GPT-style language models from scratch and measure every step."""

__version__ = "0.1.0"
