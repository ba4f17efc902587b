"""Sample ids as file names: one helper for every writer, so that distinct ids never share a file.

An id that is already a safe, canonical name is used as it is (Unicode letters, spaces and punctuation
included). Any other id — with a path separator, NUL, a control character, a character Windows refuses,
a leading dot (hidden, and skipped by the readers), a trailing dot or space, `~`, upper-case letters
(which case-insensitive file systems fold onto lower case), a non-NFC spelling (which macOS folds) or more
than MAX_NAME_BYTES bytes — gets a readable sanitised body plus `~` and a hash of the exact id.

The name depends on the id alone, never on which other ids are present, so a resumed or extended run
names every sample as before. Uniqueness: plain names contain no `~` and are their own case-folded,
canonical form, so two of them never fold together; hashed names end in `~<hash>` and differ in it.
"""

from __future__ import annotations

import hashlib
import unicodedata

MARK = "~"
HASH_CHARS = 12
MAX_NAME_BYTES = 120  # the stem; suffixes and writers' temp names stay far below the usual 255-byte limit
WINDOWS_RESERVED = frozenset('<>:"|?*')
UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})  # controls, lone surrogates, line/paragraph separators


def _unsafe(ch: str) -> bool:
    """Whether a character must not appear in a file name (separators, controls, Windows-reserved, MARK)."""
    return ch in "/\\" or ch == MARK or ch in WINDOWS_RESERVED or unicodedata.category(ch) in UNSAFE_CATEGORIES


def fold_key(name: str) -> str:
    """Canonical caseless form of a name: two names with one key are the same file on macOS or Windows."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def _is_plain(id_: str) -> bool:
    """Whether `id_` can be a file name as it is, distinct from every other id on any file system."""
    return (
        bool(id_)
        and not any(_unsafe(ch) for ch in id_)
        and not id_.startswith(".")
        and not id_.endswith((".", " "))
        and len(id_.encode("utf-8")) <= MAX_NAME_BYTES
        and unicodedata.normalize("NFC", id_) == id_
        and fold_key(id_) == unicodedata.normalize("NFD", id_)
    )


def id_hash(id_: str) -> str:
    """Short hex digest of the exact id (lone surrogates included)."""
    return hashlib.sha256(id_.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]


def file_stem(id_: str) -> str:
    """File name stem for a sample id: the id itself when safe and canonical, else a sanitised body + `~hash`."""
    if _is_plain(id_):
        return id_
    body = "".join("_" if _unsafe(ch) else ch for ch in unicodedata.normalize("NFC", id_))
    stripped = body.lstrip(".")
    body = "_" * (len(body) - len(stripped)) + stripped
    budget = MAX_NAME_BYTES - len(MARK) - HASH_CHARS
    body = body.encode("utf-8")[:budget].decode("utf-8", "ignore")  # cut at a character boundary
    return f"{body}{MARK}{id_hash(id_)}"
