"""Tokenizers that turn document text into token ids for the token store.

``byte`` (the default) maps a document to its UTF-8 bytes: vocabulary 256, nothing to download.
Any other spec is a path to a Hugging Face ``tokenizer.json``, used through the optional
``tokenizers`` package.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol, Sequence

import numpy as np

from wlbtrain.data.store import StoreError

BYTE = "byte"


class Tokenizer(Protocol):
    """What the store needs from a tokenizer.

    ``name`` is recorded in the store header; ``cache_key`` is short, filesystem-safe and changes
    whenever the token ids could change.
    """

    name: str
    vocab_size: int
    cache_key: str

    def encode_batch(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        """texts: UTF-8 encoded documents -> one int array [doc_len] per document."""
        ...


class ByteTokenizer:
    """Token ids are the document's UTF-8 bytes."""

    name = BYTE
    vocab_size = 256
    cache_key = BYTE

    def encode_batch(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        # frombuffer shares the bytes' memory: no Python-level loop over characters.
        return [np.frombuffer(t, dtype=np.uint8) for t in texts]

    @staticmethod
    def decode(tokens: np.ndarray) -> str:
        return np.asarray(tokens, dtype=np.uint8).tobytes().decode("utf-8")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (needs ``pip install tokenizers``)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise StoreError(
                f"{path}: reading a Hugging Face tokenizer needs the optional 'tokenizers' "
                f"package; pip install tokenizers (or use --tokenizer byte)"
            ) from None
        self.name = os.path.abspath(path)
        with open(path, "rb") as f:
            digest = hashlib.blake2b(f.read(), digest_size=8).hexdigest()
        # The content digest, not the path, decides whether cached tokens are still valid.
        self.cache_key = f"hf-{digest}"
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a plain Exception on a bad file
            raise StoreError(f"{path}: not a readable tokenizer.json ({e})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode_batch(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        # encode_batch runs in parallel on the Rust side; special tokens are the trainer's business.
        encodings = self._tok.encode_batch(
            [t.decode("utf-8") for t in texts], add_special_tokens=False
        )
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` -> ByteTokenizer; a path to ``tokenizer.json`` -> HFTokenizer."""
    if spec == BYTE:
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise StoreError(
            f"{spec}: tokenizer not found; use 'byte' or the path to a Hugging Face tokenizer.json"
        )
    return HFTokenizer(spec)

