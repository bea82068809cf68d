"""T5's sentencepiece tokenizer as CogVideoX calls it: EOS appended, truncated and padded to 226.

The model file is ``spiece.model`` in a model folder's ``tokenizer/`` (the diffusers CogVideoX
layout). Ids are the sentencepiece ids, exactly as transformers' ``T5Tokenizer`` gives them for
``padding="max_length", truncation=True, add_special_tokens=True``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

MAX_LENGTH = 226
MODEL_FILE = "spiece.model"


class T5Tokenizer:
    def __init__(self, model_file: str | Path, max_length: int = MAX_LENGTH):
        import sentencepiece

        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"T5 tokenizer: sentencepiece model {model_file} not found")
        if max_length < 1:
            raise ValueError(f"T5 tokenizer: max_length must be ≥ 1, got {max_length}")
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.max_length = max_length
        self.eos_id = self.processor.eos_id()
        self.pad_id = max(self.processor.pad_id(), 0)  # T5's spiece.model: pad 0, eos 1
        if self.eos_id < 0:
            raise ValueError(f"T5 tokenizer: {model_file} defines no end-of-sequence token")

    @classmethod
    def from_model_folder(cls, folder: str | Path, max_length: int = MAX_LENGTH) -> "T5Tokenizer":
        """Reads ``folder/tokenizer/spiece.model`` (or ``folder/spiece.model`` for a tokenizer folder)."""
        folder = Path(folder)
        expected = folder / "tokenizer" / MODEL_FILE
        for path in (expected, folder / MODEL_FILE):
            if path.is_file():
                return cls(path, max_length)
        raise FileNotFoundError(f"T5 tokenizer: expected the sentencepiece model at {expected}; it is missing")

    def encode(self, prompt: str) -> np.ndarray:
        """One prompt → ``(max_length,)`` int32 ids: pieces, EOS, then padding."""
        ids = self.processor.encode(prompt)
        if len(ids) > self.max_length - 1:
            warnings.warn(f"T5 tokenizer: prompt of {len(ids) + 1} tokens truncated to {self.max_length}: "
                          f"{prompt[:60]!r}…", stacklevel=3)
            ids = ids[:self.max_length - 1]
        ids = ids + [self.eos_id]
        return np.array(ids + [self.pad_id] * (self.max_length - len(ids)), np.int32)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts → ``(B, max_length)`` int32 ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return np.stack([self.encode(p) for p in prompts]) if prompts else np.zeros((0, self.max_length), np.int32)
