"""Data: synthetic long-context recall (default) and tokenized text files."""

from dilexp.data.module import DataModule, build_datamodule
from dilexp.data.recall import RecallDataset
from dilexp.data.text import TextTokens, TokenWindows

__all__ = ["DataModule", "RecallDataset", "TextTokens", "TokenWindows", "build_datamodule"]
