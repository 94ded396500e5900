"""Memory-mapped token store: documents as one flat token array plus an offset index.

On-disk format, one directory::

    header.json  {"magic": "wlbtrain-token-store", "version": 1,
                  "dtype": "uint8" | "uint16" | "uint32", "vocab_size": V,
                  "num_docs": D, "num_tokens": T, "tokenizer": "byte" | "/abs/tokenizer.json",
                  "files": {"tokens.bin": {"bytes": T * itemsize, "blake2b": hex,
                                           "sample_blake2b": hex},
                            "index.idx":  {"bytes": (D + 1) * 8, "blake2b": hex}}}
    tokens.bin   T token ids, little-endian ``dtype``, the documents back to back
    index.idx    D + 1 little-endian int64 offsets: document i is tokens[off[i]:off[i + 1]];
                 off[0] = 0, strictly increasing (no empty documents), off[D] = T

Opening checks the header, the file sizes, the index digest and its offsets, and the tokens'
digest: in full up to ``FULL_VERIFY_BYTES``, above that a digest of fixed sample windows
(``verify()`` does the full one). Digests are 16-byte BLAKE2b. A store is written into a temporary
sibling directory and renamed into place, so a half-written store never sits at the final path.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from array import array
from pathlib import Path
from typing import Iterable

import numpy as np

MAGIC = "wlbtrain-token-store"
FORMAT_VERSION = 1
HEADER = "header.json"
TOKENS = "tokens.bin"
INDEX = "index.idx"
STORE_FILES = frozenset({HEADER, TOKENS, INDEX})

# Above this the full tokens digest on every open would cost more than a second; sample instead.
FULL_VERIFY_BYTES = 64 << 20
SAMPLE_WINDOWS = 64
SAMPLE_WINDOW_BYTES = 4096
_DIGEST_BYTES = 16
_READ_BYTES = 8 << 20
_DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_REPREPARE = "re-run wlbtrain prepare to rebuild it"


class StoreError(ValueError):
    """A token store (or its input) is missing, malformed or corrupt; the message is one line."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype holding ids 0 .. vocab_size - 1."""
    if vocab_size <= 0:
        raise StoreError(f"vocab_size must be positive, got {vocab_size}")
    for name, dt in _DTYPES.items():
        if vocab_size - 1 <= np.iinfo(dt).max:
            return dt
    raise StoreError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


class TokenStore:
    """A validated, read-only view of a token store directory.

    doc_lengths: int64 [num_docs]; offsets: int64 [num_docs + 1] (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header = self._read_header()
        self.vocab_size: int = header["vocab_size"]
        self.num_docs: int = header["num_docs"]
        self.num_tokens: int = header["num_tokens"]
        self.tokenizer: str = header["tokenizer"]
        self.dtype: np.dtype = _DTYPES[header["dtype"]]
        self._files = header["files"]
        self._check_sizes()
        self.offsets = self._read_index()
        self.doc_lengths = np.diff(self.offsets)
        tokens_bytes = self._files[TOKENS]["bytes"]
        if tokens_bytes <= FULL_VERIFY_BYTES:
            self._check_tokens_digest("blake2b", _file_digest(self.path / TOKENS))
        else:
            self._check_tokens_digest("sample_blake2b", _sample_digest(self.path / TOKENS))
        self._tokens = np.memmap(self.path / TOKENS, dtype=self.dtype, mode="r",
                                 shape=(self.num_tokens,))

    def __len__(self) -> int:
        return self.num_docs

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.path)!r}, docs={self.num_docs}, tokens={self.num_tokens}, "
                f"vocab={self.vocab_size}, tokenizer={self.tokenizer!r})")

    def document(self, doc_id: int) -> np.ndarray:
        """All tokens of one document: [doc_lengths[doc_id]] of ``dtype`` (read-only view)."""
        self._check_doc(doc_id)
        return np.asarray(self._tokens[self.offsets[doc_id]:self.offsets[doc_id + 1]])

    def tokens(self, doc_id: int, start: int, length: int) -> np.ndarray:
        """Tokens ``start .. start + length - 1`` of one document: [length] (read-only view)."""
        self._check_doc(doc_id)
        doc_len = int(self.doc_lengths[doc_id])
        if start < 0 or length < 0 or start + length > doc_len:
            raise IndexError(f"tokens [{start}, {start + length}) outside document {doc_id} "
                             f"of length {doc_len}")
        begin = int(self.offsets[doc_id]) + start
        return np.asarray(self._tokens[begin:begin + length])

    def verify(self) -> None:
        """Full check: the tokens' digest and that every id is below vocab_size (reads it all)."""
        self._check_tokens_digest("blake2b", _file_digest(self.path / TOKENS))
        step = _READ_BYTES // self.dtype.itemsize
        for begin in range(0, self.num_tokens, step):
            top = int(self._tokens[begin:begin + step].max())
            if top >= self.vocab_size:
                raise self._error(TOKENS, f"token id {top} is outside the vocabulary of "
                                          f"{self.vocab_size}")

    # -- validation -------------------------------------------------------------------------

    def _error(self, name: str, problem: str, fix: str = _REPREPARE) -> StoreError:
        return StoreError(f"{self.path / name}: {problem}; {fix}")

    def _check_doc(self, doc_id: int) -> None:
        if not 0 <= doc_id < self.num_docs:
            raise IndexError(f"document {doc_id} outside 0 .. {self.num_docs - 1} of {self.path}")

    def _read_header(self) -> dict:
        if not self.path.is_dir():
            raise StoreError(f"{self.path}: not a token store directory; create one with "
                             f"`wlbtrain prepare INPUT... --out {self.path}`")
        try:
            header = json.loads((self.path / HEADER).read_text(encoding="utf-8"))
        except FileNotFoundError:
            fix = f"create it with `wlbtrain prepare INPUT... --out {self.path}`"
            raise self._error(HEADER, "missing, so this is not a token store (or its writing "
                                      "never finished)", fix) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._error(HEADER, f"not valid JSON ({e})") from None
        if not isinstance(header, dict) or header.get("magic") != MAGIC:
            raise self._error(HEADER, f"not a wlbtrain token store header (magic != {MAGIC!r})")
        if header.get("version") != FORMAT_VERSION:
            raise self._error(HEADER, f"format version {header.get('version')!r}, this wlbtrain "
                                      f"reads version {FORMAT_VERSION}")
        self._check_header_fields(header)
        return header

    def _check_header_fields(self, header: dict) -> None:
        for key in ("vocab_size", "num_docs", "num_tokens"):
            value = header.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise self._error(HEADER, f"{key} must be a positive integer, got {value!r}")
        if header.get("dtype") not in _DTYPES:
            raise self._error(HEADER, f"dtype {header.get('dtype')!r} is not one of "
                                      f"{sorted(_DTYPES)}")
        if not isinstance(header.get("tokenizer"), str):
            raise self._error(HEADER, "tokenizer must be a string")
        files = header.get("files")
        if not isinstance(files, dict) or not all(
                isinstance(files.get(n), dict) and isinstance(files[n].get("bytes"), int)
                for n in (TOKENS, INDEX)):
            raise self._error(HEADER, f"'files' must give the byte size of {TOKENS} and {INDEX}")
        expected = {TOKENS: header["num_tokens"] * _DTYPES[header["dtype"]].itemsize,
                    INDEX: (header["num_docs"] + 1) * 8}
        for name, size in expected.items():
            if files[name]["bytes"] != size:
                raise self._error(HEADER, f"records {files[name]['bytes']} bytes for {name} "
                                          f"but its counts imply {size}")

    def _check_sizes(self) -> None:
        for name in (TOKENS, INDEX):
            expected = self._files[name]["bytes"]
            try:
                actual = (self.path / name).stat().st_size
            except FileNotFoundError:
                raise self._error(name, "missing") from None
            if actual < expected:
                raise self._error(name, f"truncated: {actual} bytes, the header says {expected}")
            if actual > expected:
                raise self._error(name, f"{actual} bytes, longer than the {expected} the header "
                                        f"says")

    def _read_index(self) -> np.ndarray:
        path = self.path / INDEX
        raw = path.read_bytes()
        if _digest(raw) != self._files[INDEX].get("blake2b"):
            raise self._error(INDEX, "corrupt: its digest does not match the header")
        offsets = np.frombuffer(raw, dtype="<i8").astype(np.int64)
        if offsets[0] != 0 or offsets[-1] != self.num_tokens:
            raise self._error(INDEX, f"corrupt: offsets run {offsets[0]} .. {offsets[-1]}, "
                                     f"expected 0 .. {self.num_tokens}")
        if not np.all(offsets[1:] > offsets[:-1]):
            raise self._error(INDEX, "corrupt: offsets are not strictly increasing")
        return offsets

    def _check_tokens_digest(self, key: str, actual: str) -> None:
        if actual != self._files[TOKENS].get(key):
            raise self._error(TOKENS, f"corrupt: its {key} digest does not match the header")


# -- digests ------------------------------------------------------------------------------------

def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=_DIGEST_BYTES).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _sample_digest(path: Path) -> str:
    """Digest of SAMPLE_WINDOWS evenly spaced windows (first and last included) and the size."""
    size = path.stat().st_size
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=_DIGEST_BYTES)
    span = max(size - SAMPLE_WINDOW_BYTES, 0)
    with open(path, "rb") as f:
        for k in range(SAMPLE_WINDOWS):
            f.seek(span * k // (SAMPLE_WINDOWS - 1))
            h.update(f.read(SAMPLE_WINDOW_BYTES))
    return h.hexdigest()


# -- writing ------------------------------------------------------------------------------------

def write_store(out_dir: str | os.PathLike, documents: Iterable[np.ndarray | list[int]],
                vocab_size: int, tokenizer: str, *, overwrite: bool = True) -> TokenStore:
    """Write documents (each a non-empty 1-D sequence of ids < vocab_size) as a store at out_dir.

    The store is built in a temporary sibling and renamed into place. With ``overwrite`` an
    existing store (a directory holding only store files, or an empty one) is replaced; any
    other existing path is refused, so a mistyped --out never deletes unrelated files.
    """
    out = Path(out_dir).expanduser()
    if out.exists():
        if not overwrite:
            raise StoreError(f"{out}: already exists; choose another output directory")
        _check_replaceable(out)
    tmp = build_temp_store(out, documents, vocab_size, tokenizer)
    publish(tmp, out, replace=overwrite)
    return TokenStore(out)


def build_temp_store(out: Path, documents: Iterable[np.ndarray | list[int]], vocab_size: int,
                     tokenizer: str) -> Path:
    """Write a complete store into a fresh temporary sibling of ``out`` and return its path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_files(tmp, documents, vocab_size, tokenizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def publish(tmp: Path, out: Path, *, replace: bool) -> bool:
    """Rename the finished store ``tmp`` to ``out``.

    Without ``replace``, an ``out`` that appeared meanwhile (another process won the race) is
    kept and ``tmp`` discarded: returns False. With it, the old store is moved aside first.
    """
    if replace and out.exists():
        _check_replaceable(out)
        trash = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(out, trash)
        except FileNotFoundError:  # someone else removed it first
            trash = None
        _rename_or_discard(tmp, out)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return True
    return _rename_or_discard(tmp, out)


def _rename_or_discard(tmp: Path, out: Path) -> bool:
    try:
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Lost a race: a complete store is already at ``out`` (rename is all-or-nothing).
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    fsync_dir(out.parent)
    return True


def _check_replaceable(out: Path) -> None:
    if not out.is_dir() or not set(os.listdir(out)) <= STORE_FILES:
        raise StoreError(f"{out}: exists and is not a token store, refusing to replace it; "
                         f"choose another output directory or remove it")


def _write_files(tmp: Path, documents: Iterable[np.ndarray | list[int]], vocab_size: int,
                 tokenizer: str) -> None:
    dtype = token_dtype(vocab_size)
    offsets = array("q", [0])
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    with open(tmp / TOKENS, "wb") as f:
        for i, doc in enumerate(documents):
            data = _as_token_bytes(i, doc, vocab_size, dtype)
            f.write(data)
            h.update(data)
            offsets.append(offsets[-1] + len(data) // dtype.itemsize)
        _fsync(f)
    num_docs = len(offsets) - 1
    if num_docs == 0:
        raise StoreError("no documents to write")
    index = np.asarray(offsets, dtype="<i8").tobytes()
    with open(tmp / INDEX, "wb") as f:
        f.write(index)
        _fsync(f)
    header = {
        "magic": MAGIC, "version": FORMAT_VERSION, "dtype": dtype.name,
        "vocab_size": int(vocab_size), "num_docs": num_docs, "num_tokens": offsets[-1],
        "tokenizer": tokenizer,
        "files": {
            TOKENS: {"bytes": offsets[-1] * dtype.itemsize, "blake2b": h.hexdigest(),
                     "sample_blake2b": _sample_digest(tmp / TOKENS)},
            INDEX: {"bytes": len(index), "blake2b": _digest(index)},
        },
    }
    with open(tmp / HEADER, "w", encoding="utf-8") as f:
        json.dump(header, f, indent=1)
        f.write("\n")
        _fsync(f)
    fsync_dir(tmp)


def _as_token_bytes(i: int, doc: np.ndarray | list[int], vocab_size: int,
                    dtype: np.dtype) -> bytes:
    arr = np.asarray(doc)
    if arr.ndim != 1 or arr.size == 0:
        raise StoreError(f"document {i}: expected a non-empty 1-D token sequence, "
                         f"got shape {arr.shape}")
    if arr.dtype.kind not in "ui":
        raise StoreError(f"document {i}: token ids must be integers, got {arr.dtype}")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise StoreError(f"document {i}: token id {bad} outside the vocabulary 0 .. "
                         f"{vocab_size - 1}")
    return arr.astype(dtype, copy=False).tobytes()


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable; some filesystems refuse a directory fsync (harmless)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- sources ------------------------------------------------------------------------------------

def open_source(source: str, tokenizer: str = "byte",
                cache_dir: str | os.PathLike | None = None) -> TokenStore:
    """Open the store a recipe's ``data.source`` names.

    ``"stdlib"``: the running Python's standard-library sources, prepared with ``tokenizer`` on
    first use into ``cache_dir`` (default $WLBTRAIN_CACHE, else ~/.cache/wlbtrain) and reused.
    Otherwise ``source`` is a store directory; its own recorded tokenizer applies and
    ``tokenizer`` is ignored.
    """
    if source == "stdlib":
        from wlbtrain.data.prepare import open_stdlib  # prepare imports this module

        return open_stdlib(tokenizer, cache_dir)
    path = Path(source).expanduser()
    if not path.exists():
        raise StoreError(f"{source}: no such token store; create it with `wlbtrain prepare "
                         f"INPUT... --out {source}` or use data.source: stdlib")
    if not path.is_dir():
        raise StoreError(f"{source}: a file, not a token store directory; turn text into a "
                         f"store with `wlbtrain prepare {source} --out DIR`")
    return TokenStore(path)
