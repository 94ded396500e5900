"""Context-parallel sharding plans: which tokens of a packed micro-batch each CP rank holds.

Pure functions: segment lengths in, a ``ShardPlan`` out; no process group. The micro-batch is
the packer's pieces back to back (segment i = piece i), then one padding segment at the tail
that brings the total to a multiple of ``2·cp·tp``; padding tokens carry no label.

A rank's tokens are its ``Chunk``s back to back, in the order listed. Every rank holds the same
number of tokens (``padded_tokens // cp``), so sequence parallelism can split them evenly over
the tensor-parallel ranks and all-gathers need no size exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Chunk:
    """A contiguous run of one segment's tokens held by one rank."""

    segment: int  # index of the segment in the micro-batch (the padding segment is the last)
    start: int  # offset of the first token within its segment (its RoPE position)
    length: int
    global_start: int  # offset in the padded micro-batch: cu_seqlens[segment] + start


@dataclass
class RankShard:
    chunks: list[Chunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    def token_index(self) -> np.ndarray:
        """[num_tokens] int64: where each local token sits in the padded micro-batch."""
        parts = [np.arange(c.global_start, c.global_start + c.length) for c in self.chunks]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def positions(self) -> np.ndarray:
        """[num_tokens] int64: each local token's offset within its segment (for RoPE)."""
        parts = [np.arange(c.start, c.start + c.length) for c in self.chunks]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


@dataclass
class ShardPlan:
    sharding: str  # what was applied: per_sequence | per_document | hybrid
    cp: int
    segment_lengths: list[int]  # the micro-batch's segments, the padding segment last (may be 0)
    ranks: list[RankShard]
    rank_costs: list[float] = field(default_factory=list)  # estimated attention cost per rank

    @property
    def padded_tokens(self) -> int:
        return sum(self.segment_lengths)

    @property
    def padding(self) -> int:
        return self.segment_lengths[-1]

    def cu_seqlens(self) -> np.ndarray:
        cu = np.zeros(len(self.segment_lengths) + 1, dtype=np.int64)
        np.cumsum(self.segment_lengths, out=cu[1:])
        return cu
