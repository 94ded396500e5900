"""wlbtrain prepare (files, directories, JSONL, tokenizers) and the embedded stdlib corpus."""

import argparse
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from wlbtrain.data import prepare as prepare_mod
from wlbtrain.data.prepare import (add_arguments, open_stdlib, prepare_inputs, run,
                                   stdlib_files, stdlib_store_path)
from wlbtrain.data.store import StoreError, TokenStore, open_source
from wlbtrain.data.tokenizer import ByteTokenizer, load_tokenizer


def texts_of(store):
    return [ByteTokenizer.decode(store.document(i)) for i in range(store.num_docs)]


def test_prepare_files_in_given_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.log"  # an explicitly named file needs no suffix
    a.write_text("first ✓")
    b.write_text("second")
    store = prepare_inputs([b, a], tmp_path / "out")
    assert texts_of(store) == ["second", "first ✓"]
    assert store.vocab_size == 256 and store.tokenizer == "byte"


def test_prepare_directory(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.md").write_text("bee")
    (root / "a.txt").write_text("ay")
    (root / "sub" / "c.py").write_text("see = 1")
    (root / "sub" / "deeper" / "d.txt").write_text("dee")
    (root / "sub" / "lines.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2", "id": 7}\n')
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".hidden.txt").write_text("hidden")
    (root / ".git" / "config.txt").write_text("git")
    store, stats = prepare_mod._prepare([root], tmp_path / "out", "byte")
    assert texts_of(store) == ["ay", "bee", "see = 1", "dee", "j1", "j2"]
    assert (stats.documents, stats.skipped_empty, stats.skipped_not_text) == (6, 1, 2)


def test_prepare_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"text": "one"}, {"text": "dos ñ", "meta": 1}, {"text": ""}, {"text": "three"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    store = prepare_inputs([path], tmp_path / "out")
    assert texts_of(store) == ["one", "dos ñ", "three"]


@pytest.mark.parametrize("line,fragment", [
    ('{"txt": "x"}', 'no string "text" field'),
    ('{"text": 3}', 'no string "text" field'),
    ('["text"]', 'no string "text" field'),
    ('{"text": "x"', "not valid JSON"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(StoreError, match=fragment) as e:
        prepare_inputs([path], tmp_path / "out")
    assert f"{path}:2:" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_prepare_input_errors(tmp_path):
    with pytest.raises(StoreError, match="no such file or directory"):
        prepare_inputs([tmp_path / "missing.txt"], tmp_path / "out")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(StoreError, match="blob.bin: not UTF-8 text"):
        prepare_inputs([binary], tmp_path / "out")
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    (empty_dir / "e.txt").write_text("")
    with pytest.raises(StoreError, match="no documents found .*skipped 1 empty"):
        prepare_inputs([empty_dir], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_run_prints_summary(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "a.txt"), "--out", str(tmp_path / "out")])
    assert run(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("prepared 1 documents, 5 tokens (vocab 256, tokenizer byte)")
    assert str(tmp_path / "out") in line
    bad = parser.parse_args([str(tmp_path / "nope"), "--out", str(tmp_path / "out2")])
    with pytest.raises(StoreError):
        run(bad)


# -- Hugging Face tokenizers -------------------------------------------------------------------

def test_missing_tokenizers_package_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(StoreError, match="pip install tokenizers"):
        load_tokenizer(str(path))
    with pytest.raises(StoreError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "absent.json"))


def test_hf_tokenizer_path_through_a_stand_in(tmp_path, monkeypatch):
    """The HF code path, with a stand-in for the optional package (splits on spaces)."""

    class FakeTokenizer:
        @classmethod
        def from_file(cls, path):
            return cls()

        def get_vocab_size(self, with_added_tokens=True):
            return 70000

        def encode_batch(self, texts, add_special_tokens=True):
            return [types.SimpleNamespace(ids=[69999 - len(w) for w in t.split()]) for t in texts]

    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=FakeTokenizer))
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    (tmp_path / "a.txt").write_text("ab c def")
    store = prepare_inputs([tmp_path / "a.txt"], tmp_path / "out", str(path))
    assert store.vocab_size == 70000 and store.dtype == np.dtype("<u4")
    assert store.tokenizer == str(path.resolve())
    np.testing.assert_array_equal(store.document(0), [69997, 69998, 69996])


# -- the stdlib corpus --------------------------------------------------------------------------

def test_stdlib_files():
    files = stdlib_files()
    assert len(files) > 500
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "dist-packages" in f.parts for f in files)
    assert files == sorted(files, key=lambda p: p.as_posix())


def test_stdlib_prepared_concurrently_once_then_reused(tmp_path, monkeypatch):
    """Two processes (like torchrun ranks) prepare at once; later opens reuse the cache."""
    cache = tmp_path / "cache"
    code = ("from wlbtrain.data.store import open_source; s = open_source('stdlib'); "
            "print(s.path, s.num_docs, s.num_tokens)")
    env = {**os.environ, "WLBTRAIN_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert len(os.listdir(cache)) == 1  # one store, no temporary directories left behind

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached stdlib store should have been reused")

    monkeypatch.setattr(prepare_mod, "build_temp_store", no_rebuild)
    store = open_source("stdlib", cache_dir=str(cache))
    assert str(store.path) == outputs[0][0].split()[0]
    assert store.path == stdlib_store_path(load_tokenizer("byte"), cache)
    assert store.num_docs > 500 and store.tokenizer == "byte"
    lengths = store.doc_lengths
    assert lengths.min() >= 1
    assert lengths.max() > 20 * np.median(lengths)  # a long tail, as the packers need

    # A damaged cache entry is rebuilt rather than failing the run.
    monkeypatch.undo()
    with open(store.path / "tokens.bin", "r+b") as f:
        f.truncate(10)
    rebuilt = open_stdlib("byte", cache)
    assert rebuilt.num_tokens == store.num_tokens
    assert len(os.listdir(cache)) == 1


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("WLBTRAIN_CACHE", str(tmp_path / "c"))
    assert prepare_mod.cache_root() == tmp_path / "c"
    assert prepare_mod.cache_root(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("WLBTRAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert prepare_mod.cache_root() == tmp_path / "x" / "wlbtrain"


def test_tokenstore_of_prepared_dir_reopens(tmp_path):
    (tmp_path / "a.txt").write_text("xyz")
    out = tmp_path / "out"
    prepare_inputs([tmp_path / "a.txt"], out)
    assert TokenStore(out).num_tokens == 3
