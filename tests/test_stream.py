import numpy as np
import pytest

from wlbtrain.data.stream import DocumentStream


def drain(stream):
    pieces = []
    while (p := stream.next()) is not None:
        pieces.append(p)
    return pieces


def test_every_document_once_and_long_ones_split():
    lengths = np.array([5, 0, 17, 3, 40, 1])
    pieces = drain(DocumentStream(lengths, seed=1, max_piece=8, loop=False))
    assert all(0 < length <= 8 for _, _, length in pieces)
    covered = {d: [] for d in range(len(lengths))}
    for doc, start, length in pieces:
        covered[doc].append((start, length))
    for doc, spans in covered.items():
        # consecutive pieces tile the document exactly once, in order
        pos = 0
        for start, length in spans:
            assert start == pos
            pos += length
        assert pos == lengths[doc]


def test_epochs_reshuffle_and_seed_matters():
    lengths = np.arange(1, 50)
    s = DocumentStream(lengths, seed=3, max_piece=100)
    first = [s.next()[0] for _ in range(49)]
    second = [s.next()[0] for _ in range(49)]
    assert sorted(first) == sorted(second) == list(range(49))
    assert first != second and s.epoch == 1
    other = DocumentStream(lengths, seed=4, max_piece=100)
    assert [other.next()[0] for _ in range(49)] != first


def test_resume_mid_document_continues_identically():
    lengths = np.random.default_rng(0).integers(1, 60, size=30)
    a = DocumentStream(lengths, seed=7, max_piece=16)
    for _ in range(23):
        a.next()
    b = DocumentStream(lengths, seed=7, max_piece=16)
    b.load_state_dict(a.state_dict())
    assert [a.next() for _ in range(200)] == [b.next() for _ in range(200)]


def test_state_from_other_data_is_refused():
    a = DocumentStream(np.array([3, 4]), seed=0, max_piece=4)
    b = DocumentStream(np.array([3, 4, 5]), seed=0, max_piece=4)
    with pytest.raises(ValueError, match="same data"):
        b.load_state_dict(a.state_dict())
