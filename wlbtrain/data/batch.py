"""Micro-batch materialisation: a packer's pieces → the tensors one forward pass needs.

A micro-batch is one packed sequence without padding: the pieces' tokens back to back, each
piece its own attention segment (``cu_seqlens``), positions restarting at 0 in every piece so
rotary embeddings see each document from its start. Labels are the next token of the same
document; a piece that ends inside its document still predicts the document's next token (read
from the store), and the last token of a document has no target (``IGNORE``).

Sequence and context parallelism need a token count divisible by ``tp`` (``2·cp·tp``):
``pad_micro_batch`` appends one padding segment at the tail, with no labels. Real and padded
counts are kept apart: ``num_tokens`` counts real tokens only, ``num_padded_tokens`` all rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .stream import Piece

IGNORE = -100  # label of a position with no target: cross_entropy's default ignore_index


@dataclass
class MicroBatch:
    """One packed micro-batch of T rows: the pieces' tokens, then ``num_padding`` padding rows
    (a segment of their own, no labels) when padded."""

    tokens: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64, IGNORE where there is no target
    positions: torch.Tensor  # [T] int64, 0 at the start of every segment
    cu_seqlens: torch.Tensor  # [num_segments + 1] int32, prefix sums of segment lengths
    max_seqlen: int
    pieces: list[Piece]
    num_padding: int = 0

    @property
    def num_tokens(self) -> int:
        """Real tokens (the pieces'), never padding."""
        return int(self.tokens.numel()) - self.num_padding

    @property
    def num_padded_tokens(self) -> int:
        return int(self.tokens.numel())

    def to(self, device) -> "MicroBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(self.tokens), move(self.labels), move(self.positions),
                          move(self.cu_seqlens), self.max_seqlen, self.pieces, self.num_padding)


def pad_micro_batch(batch: MicroBatch, multiple: int) -> MicroBatch:
    """``batch`` with a padding segment appended so that its rows are a multiple of
    ``multiple``; the same batch when they already are. Padding rows attend only to each other
    and carry no label, so they change neither the loss nor any real token's output."""
    if batch.num_padding:
        raise ValueError("micro-batch is already padded")
    padding = -batch.num_tokens % multiple
    if padding == 0:
        return batch
    zeros = batch.tokens.new_zeros(padding)
    end = batch.cu_seqlens[-1:] + padding
    return MicroBatch(torch.cat([batch.tokens, zeros]),
                      torch.cat([batch.labels, torch.full_like(zeros, IGNORE)]),
                      torch.cat([batch.positions, torch.arange(padding, dtype=batch.positions.dtype)]),
                      torch.cat([batch.cu_seqlens, end]), max(batch.max_seqlen, padding),
                      batch.pieces, padding)


def num_targets(pieces: list[Piece], doc_lengths: np.ndarray) -> int:
    """Target tokens of some pieces: one per token, except each document's last token."""
    return sum(length - int(start + length == doc_lengths[doc_id])
               for doc_id, start, length in pieces)


def build_micro_batch(store, pieces: list[Piece]) -> MicroBatch:
    """Gather ``pieces`` of the token store ``store`` into one packed micro-batch."""
    tokens, labels, positions = [], [], []
    for doc_id, start, length in pieces:
        doc_len = int(store.doc_lengths[doc_id])
        if length <= 0 or start < 0 or start + length > doc_len:
            raise ValueError(f"piece {(doc_id, start, length)} outside document {doc_id} "
                             f"of {doc_len} tokens")
        # One token past the piece when the document goes on: the last position's target.
        span = np.asarray(store.tokens(doc_id, start, min(length + 1, doc_len - start)),
                          dtype=np.int64)
        tokens.append(span[:length])
        target = np.full(length, IGNORE, dtype=np.int64)
        target[: len(span) - 1] = span[1:]
        labels.append(target)
        positions.append(np.arange(length, dtype=np.int64))
    lengths = [p[2] for p in pieces]
    cu = np.zeros(len(pieces) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    cat = lambda parts: torch.from_numpy(np.concatenate(parts) if parts else  # noqa: E731
                                         np.zeros(0, dtype=np.int64))
    return MicroBatch(cat(tokens), cat(labels), cat(positions), torch.from_numpy(cu),
                      max(lengths, default=0), list(pieces))
