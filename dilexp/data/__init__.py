"""Data: synthetic long-context recall (default), tokenized text files and packed documents."""

from dilexp.data.docs import DocumentCorpus, PackedDocuments
from dilexp.data.module import DataModule, build_datamodule
from dilexp.data.recall import RecallDataset
from dilexp.data.text import TextTokens, TokenWindows

__all__ = ["DataModule", "DocumentCorpus", "PackedDocuments", "RecallDataset", "TextTokens", "TokenWindows",
           "build_datamodule"]
