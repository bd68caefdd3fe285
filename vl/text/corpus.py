"""Text corpora for text-only pretraining: reading documents, tokenizing them, packing them into sequences.

Inputs (``vl pretrain-text --text ...``):

- plain-text files: one sentence per line, a blank line between documents;
- webdataset shards (``.tar``): every ``KEY.txt`` member is one document (its lines are its sentences);
- brace patterns and globs of either, and directories (their ``*.txt`` and ``*.tar`` files).

A tokenized document is a list of sentences, each a list of word-piece ids without special tokens.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from braceexpand import braceexpand
from vl.progress import progress_bar

from vl.errors import UserError

Document = list[str]
TokenizedDocument = list[list[int]]
SHARD_SUFFIXES = (".tar",)


def expand_text_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by ``--text`` arguments: files, brace patterns, globs and directories, in order."""
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".txt", *SHARD_SUFFIXES) and p.is_file())
            if not found:
                raise UserError(f"--text directory {text} holds no .txt or .tar files")
            files.extend(found)
            continue
        if "{" in text and "}" in text:
            names = list(braceexpand(text))
        elif any(ch in text for ch in "*?["):
            names = sorted(glob.glob(text))
            if not names:
                raise UserError(f"--text pattern {text} matches no files")
        else:
            names = [text]
        for name in names:
            if not Path(name).is_file():
                raise UserError(f"--text file not found: {name}")
            files.append(Path(name))
    if not files:
        raise UserError("--text names no files")
    return files


def split_documents(text: str) -> list[Document]:
    """Sentences (non-empty stripped lines) grouped into documents at blank lines."""
    documents: list[Document] = []
    current: Document = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            documents.append(current)
            current = []
    if current:
        documents.append(current)
    return documents


def read_shard_documents(path: str | os.PathLike) -> list[Document]:
    """The documents of a webdataset shard: one per ``KEY.txt`` member, in tar order."""
    documents: list[Document] = []
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                name = Path(member.name).name
                if "." not in name or name.split(".", 1)[1] != "txt":
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                sentences = [s for doc in split_documents(handle.read().decode("utf-8", errors="replace")) for s in doc]
                if sentences:
                    documents.append(sentences)
    except (tarfile.TarError, EOFError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else "corrupt tar"
        raise UserError(f"cannot read shard {path}: {reason}") from None
    return documents


def read_documents(files: Sequence[str | os.PathLike]) -> list[Document]:
    """Every document of plain-text files and ``.tar`` shards (see the module docstring)."""
    documents: list[Document] = []
    for path in files:
        path = Path(path)
        if path.suffix in SHARD_SUFFIXES:
            found = read_shard_documents(path)
        else:
            try:
                found = split_documents(path.read_text(encoding="utf-8", errors="replace"))
            except OSError as err:
                raise UserError(f"cannot read --text file {path}: {err.strerror or err}") from None
        if not found:
            raise UserError(f"--text file {path} holds no text")
        documents.extend(found)
    return documents


def tokenize_documents(documents: Sequence[Document], tokenizer, batch_size: int = 4096,
                       progress: bool = True) -> list[TokenizedDocument]:
    """Word-piece ids per sentence (no special tokens); empty sentences are dropped, empty documents too."""
    flat = [sentence for document in documents for sentence in document]
    ids: list[list[int]] = []
    for start in progress_bar(range(0, len(flat), batch_size), desc="tokenize", show=None if progress else False,
                      leave=False):
        encodings = tokenizer.backend.encode_batch(flat[start:start + batch_size], add_special_tokens=False)
        ids.extend(list(encoding.ids) for encoding in encodings)
    tokenized: list[TokenizedDocument] = []
    position = 0
    for document in documents:
        sentences = [s for s in ids[position:position + len(document)] if s]
        position += len(document)
        if sentences:
            tokenized.append(sentences)
    return tokenized


def pack_documents(documents: Sequence[TokenizedDocument], max_len: int, cls_id: int, sep_id: int,
                   cross_documents: bool = True) -> list[list[int]]:
    """Pack whole sentences into ``[CLS] ... [SEP]`` sequences of at most ``max_len`` ids (RoBERTa's packing).

    A sentence longer than a sequence is cut into pieces. With ``cross_documents`` a sequence continues into the
    next document after a [SEP]; otherwise every document starts a new sequence.
    """
    if max_len < 3:
        raise UserError(f"max_len {max_len} is too short for [CLS] x [SEP]")
    capacity = max_len - 2
    sequences: list[list[int]] = []
    current: list[int] = []

    def flush() -> None:
        while current and current[-1] == sep_id:
            current.pop()
        if current:
            sequences.append([cls_id, *current, sep_id])
        current.clear()

    for document in documents:
        for sentence in document:
            for start in range(0, len(sentence), capacity):
                piece = sentence[start:start + capacity]
                if current and len(current) + len(piece) > capacity:
                    flush()
                current.extend(piece)
        if not cross_documents or len(current) >= capacity:
            flush()
        elif current:
            current.append(sep_id)  # document boundary inside a packed sequence
    flush()
    return sequences
