"""The language model, built around any attention variant (plain torch)."""

from dilexp.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
