"""WordPiece tokenizer: training, save/load, the CLI, and id-for-id parity with transformers.BertTokenizerFast."""

import json
import subprocess
import sys

import pytest
from transformers import BertTokenizerFast

from vl.cli import main
from vl.errors import UserError
from vl.text.tokenizer import Tokenizer

CORPUS = [
    "A red circle is left of a blue square.",
    "Two small green triangles sit above the large yellow star.",
    "Is there a purple hexagon? No, there isn't.",
    "The CAT's café — naïve résumé, 3.14 and 42 apples!",
    "Tokenizers: un-affable, unaffable, ünïcödé; 東京 and émigrés.",
    "A red circle is left of a blue square and a green cross.",
] * 20

PROBES = [
    "A red circle is left of a blue square.",
    "The CAT's café — naïve résumé, 3.14 and 42 apples!",
    "Unseenwordpieces like hexagonal circlesque squarish",
    "Tokenizers: un-affable, unaffable, ünïcödé; 東京 and émigrés.",
    "   extra   spaces\tand\ttabs   ",
    "",
    "x" * 120,  # longer than max_input_chars_per_word: [UNK]
]


def reference_tokenizer(vocab_file, lowercase):
    """transformers' fast BERT tokenizer on a vocab.txt (transformers 5 takes ``vocab``, 4 takes ``vocab_file``)."""
    try:
        return BertTokenizerFast.from_pretrained(str(vocab_file.parent), do_lower_case=lowercase)
    except (OSError, ValueError):
        return BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=lowercase)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(CORPUS) + "\n")
    return path


@pytest.mark.parametrize("lowercase", [True, False])
def test_ids_match_bert_tokenizer_fast_on_the_same_vocab(corpus_file, tmp_path, lowercase):
    ours = Tokenizer.train([corpus_file], vocab_size=120, lowercase=lowercase, min_frequency=1)
    ours.save(tmp_path)
    reference = reference_tokenizer(tmp_path / "vocab.txt", lowercase)
    for text in PROBES:
        assert ours.encode(text).ids == reference(text)["input_ids"], text
    pair = ours.encode(PROBES[0], PROBES[1])
    ref_pair = reference(PROBES[0], PROBES[1])
    assert pair.ids == ref_pair["input_ids"] and pair.type_ids == ref_pair["token_type_ids"]
    truncated = ours.encode(PROBES[0], PROBES[2], max_len=12)
    ref_truncated = reference(PROBES[0], PROBES[2], max_length=12, truncation="longest_first")
    assert truncated.ids == ref_truncated["input_ids"]
    # transformers loads the saved directory too, with the same casing.
    loaded = BertTokenizerFast.from_pretrained(str(tmp_path))
    assert loaded(PROBES[1])["input_ids"] == ours.encode(PROBES[1]).ids


def test_cased_and_uncased_differ(corpus_file):
    uncased = Tokenizer.train([corpus_file], vocab_size=120, lowercase=True, min_frequency=1)
    cased = Tokenizer.train([corpus_file], vocab_size=120, lowercase=False, min_frequency=1)
    assert "CAT" not in "".join(uncased.tokenize("The CAT"))
    assert cased.tokenize("CAT")[0].startswith("C")


def test_load_a_bert_vocab_txt(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "circle", "blu", "##e", "a", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = Tokenizer.from_vocab(tmp_path / "vocab.txt", lowercase=True)
    reference = reference_tokenizer(tmp_path / "vocab.txt", True)
    text = "A Red circle, blue green."
    assert tokenizer.encode(text).ids == reference(text)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("blue").ids) == ["[CLS]", "blu", "##e", "[SEP]"]
    assert tokenizer.vocab_size == len(vocab)
    enc = tokenizer.encode("red blue")
    assert enc.word_ids == [None, 0, 1, 1, None] and enc.special_tokens_mask == [1, 0, 0, 0, 1]


def test_save_and_load_round_trip(corpus_file, tmp_path):
    tokenizer = Tokenizer.train([corpus_file], vocab_size=100, lowercase=False, min_frequency=1)
    tokenizer.save(tmp_path / "tok")
    again = Tokenizer.from_dir(tmp_path / "tok")
    assert again.lowercase is False and again.vocab == tokenizer.vocab
    assert again.encode(PROBES[1]).ids == tokenizer.encode(PROBES[1]).ids


def test_bad_inputs_name_the_input(tmp_path):
    with pytest.raises(UserError, match="nope.txt"):
        Tokenizer.train([tmp_path / "nope.txt"], vocab_size=100)
    with pytest.raises(UserError, match="no vocab.txt"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.txt").write_text("hello\nworld\n")
    with pytest.raises(UserError, match=r"\[PAD\]"):
        Tokenizer.from_vocab(tmp_path / "vocab.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.txt"):
        Tokenizer.train([empty], vocab_size=100)


def test_cli_train_and_encode(corpus_file, tmp_path, capsys):
    assert main(["tokenizer", "train", "--text", str(corpus_file), "--vocab-size", "120", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "vocab.txt").is_file()
    lines = tmp_path / "in.txt"
    lines.write_text("a red circle\nis there a star?\n")
    capsys.readouterr()
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path), "--text", str(lines)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert rows == [tokenizer.encode("a red circle").ids, tokenizer.encode("is there a star?").ids]
    assert all(row[0] == tokenizer.cls_id and row[-1] == tokenizer.sep_id for row in rows)


def test_cli_encode_reads_stdin_and_errors_are_one_line(corpus_file, tmp_path):
    main(["tokenizer", "train", "--text", str(corpus_file), "--vocab-size", "120", "--out", str(tmp_path)])
    done = subprocess.run([sys.executable, "-m", "vl", "tokenizer", "encode", "--tokenizer", str(tmp_path)],
                          input="a red circle\n", capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip()) == Tokenizer.from_dir(tmp_path).encode("a red circle").ids
    bad = subprocess.run([sys.executable, "-m", "vl", "tokenizer", "encode", "--tokenizer", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and str(tmp_path / "x") in bad.stderr
