"""The CLIP byte-level BPE tokenizer, as ``open_clip.tokenize`` (v2.24, ``clean='lower'``) runs it.

``ClipTokenizer()(prompts)`` → int32 ``(n, context_length)`` rows ``[SOT] + ids + [EOT]``, zero-padded.
A row longer than the context is cut to it and its last id set to EOT, with a warning.

Text cleaning: ``ftfy.fix_text``, HTML-unescape twice, collapse whitespace, strip, lowercase. The
merges file (``assets/bpe_simple_vocab_16e6.txt.gz``, MIT, see ``assets/README.md``) ships as package
data; open_clip_torch itself is not needed.
"""

from __future__ import annotations

import gzip
import html
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_BPE_PATH = Path(__file__).resolve().parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
SOT, EOT = "<start_of_text>", "<end_of_text>"
# CLIP uses the first 49152 - 256 - 2 merges, so that bytes + merges + 2 specials = 49408 ids.
NUM_MERGES = 49152 - 256 - 2
_WORD = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """Byte value → its BPE symbol, in CLIP's vocabulary order (the first 256 ids).

    Printable Latin-1 bytes stand for themselves and come first; the other bytes (controls, space, …)
    follow in byte order and take the code points from 256 up.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    for extra, byte in enumerate(b for b in range(256) if b not in symbols):
        symbols[byte] = chr(256 + extra)
    return symbols


def clean(text: str) -> str:
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    def __init__(self, bpe_path: str | Path | None = None, context_length: int = CONTEXT_LENGTH):
        import regex

        path = Path(bpe_path) if bpe_path is not None else DEFAULT_BPE_PATH
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE merges file not found: expected {path}")
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        symbols = list(byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.sot_token_id, self.eot_token_id = self.ids[SOT], self.ids[EOT]
        self.vocab_size = len(vocab)
        self.context_length = context_length
        self._pattern = regex.compile(f"{SOT}|{EOT}|{_WORD}", regex.IGNORECASE)
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """The BPE ids of ``text`` (cleaned), without SOT/EOT."""
        out = []
        for word in self._pattern.findall(clean(text)):
            out.extend(self._word_ids(word))
        return out

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = np.zeros((len(texts), self.context_length), np.int32)
        for i, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > self.context_length:
                warnings.warn(f"prompt {i} has {len(ids)} tokens, more than the context of {self.context_length}: "
                              f"truncated (the end is dropped): {text[:60]!r}…", stacklevel=2)
                ids = ids[: self.context_length - 1] + [self.eot_token_id]
            rows[i, : len(ids)] = ids
        return rows

    def _word_ids(self, word: str) -> list[int]:
        if word in (SOT, EOT):
            return [self.ids[word]]
        if word not in self._cache:
            symbols = byte_symbols()
            encoded = "".join(symbols[b] for b in word.encode("utf-8"))
            self._cache[word] = [self.ids[piece] for piece in self._merge(encoded)]
        return self._cache[word]

    def _merge(self, word: str) -> list[str]:
        """Applies the lowest-ranked merge everywhere, over and over, until none applies."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, NUM_MERGES))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts
