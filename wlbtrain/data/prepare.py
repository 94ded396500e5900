"""``wlbtrain prepare``: text files, directories and JSONL -> a token store; the stdlib corpus.

Inputs, in the order given, one document each:

- a file ending in ``.jsonl``: one document per non-blank line, from its string ``text`` field;
- any other file named explicitly: its whole content, which must be UTF-8 text;
- a directory: walked recursively in sorted path order, skipping hidden entries (``.git`` ...).
  ``.jsonl`` files are read as above; files with a suffix in ``TEXT_SUFFIXES`` are documents;
  other files are ignored; files that are not UTF-8 text (or contain NUL bytes) or cannot be
  read are skipped and counted.

Documents with no tokens (empty files, empty ``text``) are skipped and counted.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import platform
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from wlbtrain.data.store import (FORMAT_VERSION, StoreError, TokenStore, build_temp_store,
                                 publish, write_store)
from wlbtrain.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset({
    ".txt", ".md", ".rst", ".tex", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
    ".java", ".js", ".ts", ".sh", ".html", ".css", ".xml", ".yaml", ".yml", ".toml",
})
JSONL_SUFFIX = ".jsonl"
STDLIB = "stdlib"
# Documents handed to the tokenizer at once: lets a Hugging Face tokenizer work in parallel
# while bounding how much text is held in memory.
ENCODE_BATCH = 256


@dataclass
class PrepareStats:
    """What a prepare run read and skipped, for its summary line."""

    documents: int = 0
    tokens: int = 0
    skipped_empty: int = 0
    skipped_not_text: int = 0
    skipped_unreadable: int = 0

    def skipped(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.skipped_empty, "empty"),
                                               (self.skipped_not_text, "not UTF-8 text"),
                                               (self.skipped_unreadable, "unreadable")) if n]
        return f" (skipped {', '.join(parts)})" if parts else ""


# -- reading inputs -----------------------------------------------------------------------------

def iter_texts(inputs: Sequence[str | os.PathLike], stats: PrepareStats) -> Iterator[bytes]:
    """Yield each input document as UTF-8 bytes, in input order (see the module docstring)."""
    for name in inputs:
        path = Path(name).expanduser()
        if path.is_dir():
            for file in walk_text_files(path):
                yield from _file_texts(file, stats, explicit=False)
        elif path.is_file():
            yield from _file_texts(path, stats, explicit=True)
        else:
            raise StoreError(f"{name}: no such file or directory")


def walk_text_files(root: Path) -> list[Path]:
    """Files under root that prepare reads, sorted by relative path; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            suffix = os.path.splitext(f)[1].lower()
            if not f.startswith(".") and (suffix in TEXT_SUFFIXES or suffix == JSONL_SUFFIX):
                found.append(Path(dirpath, f))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _file_texts(path: Path, stats: PrepareStats, explicit: bool) -> Iterator[bytes]:
    if path.suffix.lower() == JSONL_SUFFIX:
        yield from _jsonl_texts(path)
        return
    try:
        data = path.read_bytes()
    except OSError as e:
        if explicit:
            raise StoreError(f"{path}: cannot be read ({e.strerror})") from None
        stats.skipped_unreadable += 1
        return
    if _is_text(data):
        yield data
    elif explicit:
        raise StoreError(f"{path}: not UTF-8 text; pass text files, directories or JSONL")
    else:
        stats.skipped_not_text += 1


def _is_text(data: bytes) -> bool:
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _jsonl_texts(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise StoreError(f"{path}:{lineno}: not valid JSON ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise StoreError(f"{path}:{lineno}: no string \"text\" field; each JSONL line "
                                 f"must be an object like {{\"text\": \"...\"}}")
            try:
                yield text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
                raise StoreError(f"{path}:{lineno}: \"text\" is not valid Unicode") from None


def encode_documents(texts: Iterable[bytes], tokenizer: Tokenizer,
                     stats: PrepareStats) -> Iterator[np.ndarray]:
    """Token arrays [doc_len] of the non-empty documents, counted into stats."""
    it = iter(texts)
    while batch := list(itertools.islice(it, ENCODE_BATCH)):
        for tokens in tokenizer.encode_batch(batch):
            if len(tokens) == 0:
                stats.skipped_empty += 1
                continue
            stats.documents += 1
            stats.tokens += len(tokens)
            yield tokens


# -- prepare ------------------------------------------------------------------------------------

def prepare_inputs(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                   tokenizer: str | Tokenizer = "byte") -> TokenStore:
    """Tokenize inputs into a token store at out_dir (replacing a store already there)."""
    return _prepare(inputs, out_dir, tokenizer)[0]


def _prepare(inputs, out_dir, tokenizer) -> tuple[TokenStore, PrepareStats]:
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    stats = PrepareStats()

    def documents() -> Iterator[np.ndarray]:
        yield from encode_documents(iter_texts(inputs, stats), tok, stats)
        # Raised here, while the store is still a temporary directory, so nothing is published.
        if stats.documents == 0:
            raise StoreError(f"no documents found in {' '.join(map(str, inputs))}"
                             f"{stats.skipped()}; pass text files, directories or JSONL")

    store = write_store(out_dir, documents(), tok.vocab_size, tok.name)
    return store, stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``wlbtrain prepare`` arguments."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="text files, directories of them (recursive), or .jsonl files with "
                             "a \"text\" field; one document per file or JSONL line")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="token store directory to write (an existing store is replaced)")
    parser.add_argument("--tokenizer", default="byte", metavar="byte|PATH",
                        help="'byte' (UTF-8 bytes, vocabulary 256) or a Hugging Face "
                             "tokenizer.json (needs the tokenizers package)")


def run(args: argparse.Namespace) -> int:
    """Run ``wlbtrain prepare``; bad input raises StoreError (the CLI prints it, exits 2)."""
    store, stats = _prepare(args.inputs, args.out, args.tokenizer)
    print(f"prepared {store.num_docs} documents, {store.num_tokens} tokens "
          f"(vocab {store.vocab_size}, tokenizer {store.tokenizer}) -> {store.path}"
          f"{stats.skipped()}")
    return 0


# -- the embedded stdlib corpus -----------------------------------------------------------------

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The running Python's standard-library ``*.py`` files, sorted; no third-party packages."""
    root = stdlib_root()
    excluded = {"site-packages", "dist-packages"}
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not excluded & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """cache_dir, else $WLBTRAIN_CACHE, else $XDG_CACHE_HOME/wlbtrain or ~/.cache/wlbtrain."""
    if cache_dir is None:
        cache_dir = os.environ.get("WLBTRAIN_CACHE") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wlbtrain"
    return Path(cache_dir).expanduser()


def stdlib_store_path(tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache entry for this interpreter's stdlib and tokenizer, e.g. stdlib-cpython3.11.7-..."""
    where = hashlib.blake2b(str(stdlib_root()).encode(), digest_size=4).hexdigest()
    version = f"{sys.implementation.name}{platform.python_version()}"
    return cache_root(cache_dir) / (f"{STDLIB}-{version}-{where}-{tokenizer.cache_key}"
                                    f"-v{FORMAT_VERSION}")


def open_stdlib(tokenizer: str | Tokenizer = "byte",
                cache_dir: str | os.PathLike | None = None) -> TokenStore:
    """The stdlib corpus store, prepared on first use and reused afterwards.

    Safe when several processes (torchrun ranks) start at once: each builds into its own
    temporary directory and the first rename into place wins; the others open the winner.
    """
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    out = stdlib_store_path(tok, cache_dir)
    stale = False
    if out.exists():
        try:
            return TokenStore(out)
        except StoreError as e:
            log.warning("rebuilding the cached stdlib corpus: %s", e)
            stale = True
    log.info("preparing the stdlib corpus into %s (first use)", out)
    stats = PrepareStats()
    texts = (text for f in stdlib_files() for text in _file_texts(f, stats, explicit=False))
    tmp = build_temp_store(out, encode_documents(texts, tok, stats), tok.vocab_size, tok.name)
    publish(tmp, out, replace=stale)
    return TokenStore(out)
