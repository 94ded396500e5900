"""Token store: round trip, dtype choice, atomic writes, and refusal of damaged stores."""

import json
import os

import numpy as np
import pytest

from wlbtrain.data import store as store_mod
from wlbtrain.data.store import (HEADER, INDEX, SAMPLE_WINDOW_BYTES, SAMPLE_WINDOWS, TOKENS,
                                 StoreError, TokenStore, build_temp_store, open_source, publish,
                                 token_dtype, write_store)
from wlbtrain.data.tokenizer import ByteTokenizer


def random_docs(n=50, vocab=1000, seed=0):
    rng = np.random.default_rng(seed)
    # Lengths span 1 .. a few thousand so both tiny and long documents are covered.
    lengths = np.minimum(rng.pareto(1.0, n) * 20 + 1, 5000).astype(int)
    return [rng.integers(0, vocab, size=int(n_tok)) for n_tok in lengths]


@pytest.fixture
def small_store(tmp_path):
    return write_store(tmp_path / "s", random_docs(), vocab_size=1000, tokenizer="test")


def test_round_trip(tmp_path):
    docs = random_docs()
    store = write_store(tmp_path / "s", docs, vocab_size=1000, tokenizer="test")
    reopened = TokenStore(tmp_path / "s")
    for s in (store, reopened):
        assert s.num_docs == len(s) == len(docs)
        assert s.num_tokens == sum(len(d) for d in docs)
        assert s.vocab_size == 1000 and s.tokenizer == "test"
        assert s.dtype == np.dtype("<u2")
        np.testing.assert_array_equal(s.doc_lengths, [len(d) for d in docs])
        assert s.doc_lengths.dtype == np.int64
        for i, d in enumerate(docs):
            np.testing.assert_array_equal(s.document(i), d)
    reopened.verify()


def test_list_documents_and_slices(tmp_path):
    s = write_store(tmp_path / "s", [[1, 2, 3], [4], [5, 6]], vocab_size=7, tokenizer="t")
    assert s.dtype == np.dtype("u1")
    np.testing.assert_array_equal(s.tokens(0, 1, 2), [2, 3])
    np.testing.assert_array_equal(s.tokens(2, 0, 2), [5, 6])
    assert len(s.tokens(1, 1, 0)) == 0
    for bad in [(0, 2, 2), (0, -1, 1), (1, 0, 2)]:
        with pytest.raises(IndexError):
            s.tokens(*bad)
    for bad_doc in (-1, 3):
        with pytest.raises(IndexError):
            s.document(bad_doc)


def test_documents_are_read_only(small_store):
    with pytest.raises(ValueError):
        small_store.document(0)[0] = 1


@pytest.mark.parametrize("vocab,dtype", [(256, "u1"), (257, "u2"), (65536, "u2"),
                                         (65537, "u4"), (2**32, "u4")])
def test_token_dtype(vocab, dtype):
    assert token_dtype(vocab) == np.dtype("<" + dtype)


def test_byte_tokenizer_round_trips_text(tmp_path):
    texts = ["hello", "naïve façade — ünïcödé ✓", "def f():\n    return 1\n"]
    tok = ByteTokenizer()
    s = write_store(tmp_path / "s", tok.encode_batch([t.encode() for t in texts]),
                    vocab_size=tok.vocab_size, tokenizer=tok.name)
    assert s.dtype == np.dtype("u1") and s.tokenizer == "byte"
    assert [tok.decode(s.document(i)) for i in range(len(texts))] == texts


@pytest.mark.parametrize("docs,match", [
    ([[1, 2], []], "document 1: expected a non-empty"),
    ([[1, 2], [3, 300]], "document 1: token id 300 outside"),
    ([[-1]], "token id -1 outside"),
    ([[1.5]], "must be integers"),
    ([], "no documents"),
])
def test_write_refuses_bad_documents(tmp_path, docs, match):
    with pytest.raises(StoreError, match=match):
        write_store(tmp_path / "s", docs, vocab_size=256, tokenizer="t")
    assert os.listdir(tmp_path) == []  # neither the store nor its temporary directory remain


def test_crash_while_writing_leaves_nothing(tmp_path):
    def docs():
        yield [1, 2, 3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_store(tmp_path / "s", docs(), vocab_size=256, tokenizer="t")
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_store_but_not_other_directories(tmp_path):
    write_store(tmp_path / "s", [[1]], vocab_size=256, tokenizer="t")
    s = write_store(tmp_path / "s", [[2, 3]], vocab_size=256, tokenizer="t")
    np.testing.assert_array_equal(s.document(0), [2, 3])
    assert sorted(os.listdir(tmp_path)) == ["s"]
    with pytest.raises(StoreError, match="already exists"):
        write_store(tmp_path / "s", [[1]], vocab_size=256, tokenizer="t", overwrite=False)
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a token store, refusing"):
        write_store(other, [[1]], vocab_size=256, tokenizer="t")
    assert (other / "notes.txt").read_text() == "keep me"


def test_concurrent_publish_first_wins(tmp_path):
    out = tmp_path / "s"
    first = build_temp_store(out, [[1, 2]], 256, "t")
    second = build_temp_store(out, [[1, 2]], 256, "t")
    assert publish(first, out, replace=False) is True
    assert publish(second, out, replace=False) is False
    assert os.listdir(tmp_path) == ["s"]
    np.testing.assert_array_equal(TokenStore(out).document(0), [1, 2])


# -- damaged stores ---------------------------------------------------------------------------

def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def refused(path, *fragments):
    with pytest.raises(StoreError) as e:
        TokenStore(path)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_truncated_tokens(small_store):
    path = small_store.path / TOKENS
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    refused(small_store.path, str(path), "truncated", "wlbtrain prepare")


def test_extended_index(small_store):
    path = small_store.path / INDEX
    with open(path, "ab") as f:
        f.write(b"\0" * 8)
    refused(small_store.path, str(path), "longer than")


def test_corrupted_index(small_store):
    path = small_store.path / INDEX
    flip_byte(path, 8 * 3)
    refused(small_store.path, str(path), "digest", "wlbtrain prepare")


def test_index_not_increasing_even_with_matching_digest(small_store):
    path = small_store.path / INDEX
    offsets = np.fromfile(path, dtype="<i8")
    offsets[2] = offsets[1]
    path.write_bytes(offsets.tobytes())
    header = json.loads((small_store.path / HEADER).read_text())
    header["files"][INDEX]["blake2b"] = store_mod._digest(offsets.tobytes())
    (small_store.path / HEADER).write_text(json.dumps(header))
    refused(small_store.path, str(path), "strictly increasing")


def test_flipped_token_detected_on_open_for_small_stores(small_store):
    path = small_store.path / TOKENS
    flip_byte(path, path.stat().st_size // 2)
    refused(small_store.path, str(path), "corrupt", "wlbtrain prepare")


def test_flipped_token_in_big_store_found_by_verify(tmp_path, monkeypatch):
    docs = [np.arange(1 << 20, dtype=np.int64) % 256]
    s = write_store(tmp_path / "s", docs, vocab_size=256, tokenizer="t")
    path = s.path / TOKENS
    # A byte between two sample windows: opening (sampled digest) passes, verify() does not.
    span = path.stat().st_size - SAMPLE_WINDOW_BYTES
    gap = span // (SAMPLE_WINDOWS - 1)
    flip_byte(path, gap // 2 + SAMPLE_WINDOW_BYTES)
    monkeypatch.setattr(store_mod, "FULL_VERIFY_BYTES", 0)
    opened = TokenStore(s.path)
    with pytest.raises(StoreError, match="corrupt"):
        opened.verify()
    # A byte inside a sample window is caught on open.
    flip_byte(path, 0)
    refused(s.path, str(path), "sample_blake2b")


@pytest.mark.parametrize("name", [HEADER, TOKENS, INDEX])
def test_missing_file(small_store, name):
    (small_store.path / name).unlink()
    refused(small_store.path, str(small_store.path / name), "missing")


@pytest.mark.parametrize("edit,fragment", [
    (lambda h: h.update(version=99), "format version 99"),
    (lambda h: h.update(magic="other"), "not a wlbtrain token store"),
    (lambda h: h.update(num_tokens=h["num_tokens"] + 1), "counts imply"),
    (lambda h: h.update(dtype="float32"), "dtype 'float32'"),
    (lambda h: h.pop("vocab_size"), "vocab_size must be"),
])
def test_bad_header(small_store, edit, fragment):
    path = small_store.path / HEADER
    header = json.loads(path.read_text())
    edit(header)
    path.write_text(json.dumps(header))
    refused(small_store.path, str(path), fragment)


def test_header_not_json(small_store):
    path = small_store.path / HEADER
    path.write_text("{not json")
    refused(small_store.path, str(path), "not valid JSON")


def test_open_source_path_errors(tmp_path, small_store):
    assert open_source(str(small_store.path)).num_docs == small_store.num_docs
    with pytest.raises(StoreError, match="no such token store.*wlbtrain prepare"):
        open_source(str(tmp_path / "nope"))
    text = tmp_path / "a.txt"
    text.write_text("hi")
    with pytest.raises(StoreError, match="not a token store directory.*wlbtrain prepare"):
        open_source(str(text))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="header.json: missing.*wlbtrain prepare"):
        open_source(str(empty))
