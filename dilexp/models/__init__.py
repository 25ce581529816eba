"""The language model, built around any attention variant (plain torch)."""

from dilexp.models.gpt import GPT, GPTConfig, masked_cross_entropy

__all__ = ["GPT", "GPTConfig", "masked_cross_entropy"]
