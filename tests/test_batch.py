"""Packed micro-batches: every token of every document once, labels within documents,
positions and cu_seqlens in agreement."""

import numpy as np
import pytest

from wlbtrain.data.batch import IGNORE, build_micro_batch, num_targets
from wlbtrain.data.cost import CostModel
from wlbtrain.data.packing import make_packer, max_piece_for
from wlbtrain.data.store import write_store
from wlbtrain.data.stream import DocumentStream


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.pareto(1.2, size=60) * 20 + 1, 400).astype(int)
    docs = [rng.integers(0, 1000, size=n) for n in lengths]
    return write_store(tmp_path / "store", docs, vocab_size=1000, tokenizer="test"), docs


@pytest.mark.parametrize("packing", ["plain", "fixed", "wlb"])
def test_micro_batches_cover_every_token_once(store, packing):
    store, docs = store
    context, n_micro = 64, 4
    packer = make_packer(packing, context=context, max_tokens_per_micro_batch=context,
                         n_micro_batches=n_micro, cost_model=CostModel(1e-6, 1e-3))
    stream = DocumentStream(store.doc_lengths, seed=0,
                            max_piece=max_piece_for(packing, context, context), loop=False)
    seen = {d: np.zeros(len(doc), dtype=int) for d, doc in enumerate(docs)}
    while (plan := packer.pack(stream)) is not None:
        assert len(plan) == n_micro
        for pieces in plan:
            batch = build_micro_batch(store, pieces)
            check_batch(batch, docs, seen)
            assert int((batch.labels != IGNORE).sum()) == num_targets(pieces, store.doc_lengths)
            if packing != "wlb":
                assert batch.num_tokens <= context
    assert all((count == 1).all() for count in seen.values()), "a token trained twice or never"


def check_batch(batch, docs, seen):
    cu = batch.cu_seqlens.numpy()
    if not batch.pieces:  # allowed only at the end of a finite stream
        assert batch.num_tokens == 0 and batch.max_seqlen == 0 and list(cu) == [0]
        return
    assert cu[0] == 0 and cu[-1] == batch.num_tokens and (np.diff(cu) > 0).all()
    assert batch.max_seqlen == np.diff(cu).max()
    tokens, labels, positions = (t.numpy() for t in (batch.tokens, batch.labels, batch.positions))
    for (doc_id, start, length), lo, hi in zip(batch.pieces, cu[:-1], cu[1:]):
        doc = docs[doc_id]
        assert hi - lo == length
        assert (positions[lo:hi] == np.arange(length)).all()
        assert (tokens[lo:hi] == doc[start:start + length]).all()
        # the target of each position is the next token of the same document, never another's
        want = np.append(doc[start + 1:start + length + 1], [IGNORE] * 2)[:length]
        assert (labels[lo:hi] == want).all()
        seen[doc_id][start:start + length] += 1


def test_padding_is_its_own_segment_without_labels(store):
    import torch

    from wlbtrain.data.batch import pad_micro_batch

    store, _ = store
    batch = build_micro_batch(store, [(0, 0, int(store.doc_lengths[0])), (1, 0, 3)])
    padded = pad_micro_batch(batch, 8)
    assert padded.num_padded_tokens % 8 == 0 and padded.num_padded_tokens - batch.num_tokens < 8
    assert padded.num_tokens == batch.num_tokens
    pad = padded.num_padding
    if pad:
        assert padded.cu_seqlens.tolist() == batch.cu_seqlens.tolist() + [padded.num_padded_tokens]
        assert (padded.labels[-pad:] == IGNORE).all()
        assert padded.positions[-pad:].tolist() == list(range(pad))
    torch.testing.assert_close(padded.labels[:batch.num_tokens], batch.labels)
    assert pad_micro_batch(batch, 1) is batch
