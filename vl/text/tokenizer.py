"""WordPiece tokenization on the Hugging Face ``tokenizers`` library, id-for-id with ``BertTokenizerFast``.

A tokenizer directory holds a BERT-style ``vocab.txt`` (one token per line, the line number is the id) and
``tokenizer_config.json`` (``do_lower_case``), so it loads in this project and in ``transformers`` alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordPiece

from vl.config import atomic_write_text
from vl.errors import UserError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class Encoding:
    """One encoded text (or pair): ids with [CLS]/[SEP], segment ids, word index per token (None for specials)."""

    ids: list[int]
    type_ids: list[int]
    word_ids: list[int | None]
    special_tokens_mask: list[int]
    tokens: list[str]


def _build_backend(vocab: dict[str, int], lowercase: bool) -> BackendTokenizer:
    """The exact pipeline ``BertTokenizerFast`` builds: BERT normaliser, BERT pre-tokenizer, WordPiece, [CLS]/[SEP]."""
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            raise UserError(f"vocabulary lacks the special token {token}")
    backend = BackendTokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def read_vocab(path: str | os.PathLike) -> dict[str, int]:
    """Read a BERT ``vocab.txt``: the token on line i has id i."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"vocabulary file not found: {path}")
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            token = line.rstrip("\n")
            if token in vocab:
                continue  # BERT's loader keeps the first id of a duplicate line as well
            vocab[token] = index
    if not vocab:
        raise UserError(f"vocabulary file {path} is empty")
    return vocab


class Tokenizer:
    """A BERT WordPiece tokenizer: train from text files, or load a ``vocab.txt``; save and load a directory."""

    def __init__(self, vocab: dict[str, int], lowercase: bool = True):
        self.vocab = dict(vocab)
        self.lowercase = lowercase
        self.backend = _build_backend(self.vocab, lowercase)
        self._id_to_token = {index: token for token, index in self.vocab.items()}

    # construction ---------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, files: Sequence[str | os.PathLike], vocab_size: int, lowercase: bool = True,
              min_frequency: int = 2) -> Tokenizer:
        """Learn a WordPiece vocabulary of at most ``vocab_size`` tokens from plain-text files."""
        if vocab_size < len(SPECIAL_TOKENS) + 1:
            raise UserError(f"--vocab-size {vocab_size} is too small (need at least {len(SPECIAL_TOKENS) + 1})")
        paths = [str(f) for f in files]
        for path in paths:
            if not Path(path).is_file():
                raise UserError(f"text file not found: {path}")
        trainer_backend = BackendTokenizer(WordPiece(unk_token="[UNK]"))
        trainer_backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        trainer_backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
            continuing_subword_prefix="##", show_progress=False,
        )
        trainer_backend.train(paths, trainer)
        vocab = trainer_backend.get_vocab()
        if len(vocab) <= len(SPECIAL_TOKENS):
            raise UserError(f"no tokens could be learned from {', '.join(paths)} (empty text?)")
        # Renumber densely in id order so that vocab.txt lines and ids agree.
        ordered = sorted(vocab.items(), key=lambda item: item[1])
        return cls({token: index for index, (token, _) in enumerate(ordered)}, lowercase)

    @classmethod
    def from_vocab(cls, vocab_file: str | os.PathLike, lowercase: bool = True) -> Tokenizer:
        """Load a BERT ``vocab.txt`` (``lowercase`` as the model was trained: uncased True, cased False)."""
        return cls(read_vocab(vocab_file), lowercase)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a directory written by ``save`` or by ``transformers`` (``vocab.txt`` + ``tokenizer_config.json``)."""
        directory = Path(directory)
        vocab_file = directory / "vocab.txt"
        if not vocab_file.is_file():
            raise UserError(f"tokenizer directory {directory} has no vocab.txt")
        lowercase = True
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            try:
                lowercase = bool(json.loads(config_file.read_text()).get("do_lower_case", True))
            except json.JSONDecodeError as err:
                raise UserError(f"{config_file} is not valid JSON: {err}") from None
        return cls.from_vocab(vocab_file, lowercase)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``vocab.txt`` and ``tokenizer_config.json`` (readable by ``BertTokenizerFast.from_pretrained``)."""
        directory = Path(directory)
        ordered = sorted(self.vocab.items(), key=lambda item: item[1])
        atomic_write_text(directory / "vocab.txt", "".join(f"{token}\n" for token, _ in ordered))
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase, "model_max_length": 512}
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return directory

    # encoding -------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1

    def token_to_id(self, token: str) -> int:
        return self.vocab.get(token, self.unk_id)

    @property
    def pad_id(self) -> int:
        return self.vocab["[PAD]"]

    @property
    def unk_id(self) -> int:
        return self.vocab["[UNK]"]

    @property
    def cls_id(self) -> int:
        return self.vocab["[CLS]"]

    @property
    def sep_id(self) -> int:
        return self.vocab["[SEP]"]

    @property
    def mask_id(self) -> int:
        return self.vocab["[MASK]"]

    @property
    def special_ids(self) -> set[int]:
        return {self.vocab[token] for token in SPECIAL_TOKENS}

    def encode(self, text: str, pair: str | None = None, max_len: int | None = None,
               add_special_tokens: bool = True) -> Encoding:
        """Encode one text or pair; with ``max_len``, truncate the longest segment first (as BERT does)."""
        return self.encode_batch([text], [pair] if pair is not None else None, max_len, add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None, max_len: int | None = None,
                     add_special_tokens: bool = True) -> list[Encoding]:
        backend = self.backend
        if max_len is not None:
            backend.enable_truncation(max_len, strategy="longest_first")
        else:
            backend.no_truncation()
        inputs: list = list(texts) if pairs is None else list(zip(texts, pairs))
        encodings = backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
        return [
            Encoding(list(e.ids), list(e.type_ids), list(e.word_ids), list(e.special_tokens_mask), list(e.tokens))
            for e in encodings
        ]

    def tokenize(self, text: str) -> list[str]:
        return self.backend.encode(text, add_special_tokens=False).tokens

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._id_to_token.get(int(i), "[UNK]") for i in ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
