"""Document stream: the order in which a data loader hands documents to the packer.

Each epoch is a fresh seeded permutation of the documents; every document of an epoch is
emitted exactly once. A document longer than ``max_piece`` tokens (the most one micro-batch can
hold) is emitted as consecutive pieces of at most ``max_piece`` tokens. The stream's whole state
is four integers, so a checkpoint taken mid-epoch resumes at the very next piece.
"""

from __future__ import annotations

import numpy as np

Piece = tuple[int, int, int]  # (doc_id, start, length): `length` tokens of `doc_id` from `start`


def epoch_order(num_docs: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of document ids for one epoch; a pure function of (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_docs)


class DocumentStream:
    """Seeded, resumable stream of document pieces.

    lengths: [num_docs] token counts. ``loop=False`` ends after one epoch (``next`` returns None);
    training loops forever, each epoch in a new order.
    """

    def __init__(self, lengths, seed: int, max_piece: int, loop: bool = True):
        if max_piece <= 0:
            raise ValueError(f"max_piece must be positive, got {max_piece}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("the document stream needs at least one document")
        if (self.lengths < 0).any():
            raise ValueError("document lengths must be non-negative")
        if not (self.lengths > 0).any():
            raise ValueError("every document is empty")
        self.seed = int(seed)
        self.max_piece = int(max_piece)
        self.loop = loop
        self.epoch = 0
        self.position = 0  # index into this epoch's order
        self.offset = 0  # tokens of the current document already emitted
        self._order = epoch_order(len(self.lengths), self.seed, self.epoch)

    def next(self) -> Piece | None:
        """The next piece, or None when a non-looping stream has finished its epoch."""
        while True:
            if self.position == len(self._order):
                if not self.loop:
                    return None
                self._start_epoch(self.epoch + 1)
            doc_id = int(self._order[self.position])
            remaining = int(self.lengths[doc_id]) - self.offset
            if remaining <= 0:  # empty document, or the last piece was already emitted
                self.position += 1
                self.offset = 0
                continue
            length = min(remaining, self.max_piece)
            piece = (doc_id, self.offset, length)
            self.offset += length
            return piece

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0
        self.offset = 0
        self._order = epoch_order(len(self.lengths), self.seed, epoch)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "offset": self.offset, "num_docs": len(self.lengths), "max_piece": self.max_piece}

    def load_state_dict(self, state: dict) -> None:
        if state["num_docs"] != len(self.lengths) or state["max_piece"] != self.max_piece:
            raise ValueError(
                f"stream state is for {state['num_docs']} documents in pieces of "
                f"{state['max_piece']}, but this stream has {len(self.lengths)} documents in "
                f"pieces of {self.max_piece}: resume with the same data and packing settings")
        self.seed = int(state["seed"])
        self._start_epoch(int(state["epoch"]))
        self.position = int(state["position"])
        self.offset = int(state["offset"])
