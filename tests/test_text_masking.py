"""MLM masking (rates, 80/10/10, whole words, spans, phrases), sentence pairs (NSP/SOP) and corpus packing."""

import collections
import io
import random
import tarfile

import pytest
import torch

from vl.text.corpus import expand_text_inputs, pack_documents, read_documents
from vl.text.masking import (
    MaskingConfig,
    PhraseMatcher,
    TextMasker,
    clipped_geometric_pmf,
    sample_span_lengths,
)
from vl.text.pairs import build_sentence_pairs
from vl.errors import UserError

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = (PAD, UNK, CLS, SEP, MASK)
VOCAB = 400
CONTINUATION = range(300, 400)  # ids 300..399 are "##" pieces


def token_batch(batch: int, seq: int, generator: torch.Generator, continuation: bool = False) -> tuple:
    """[CLS] ids [SEP] [PAD]...: random lengths, ids from the non-special range."""
    high = VOCAB if continuation else 300
    ids = torch.randint(5, high, (batch, seq), generator=generator)
    if continuation:
        ids[:, 1] = 5  # a word start after [CLS]
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=generator)
    attention = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[attention == 0] = PAD
    return ids, attention


def masker(**kwargs) -> TextMasker:
    return TextMasker(MaskingConfig(**kwargs), VOCAB, MASK, SPECIAL, CONTINUATION)


def test_token_masking_rate_and_80_10_10_over_many_draws():
    generator = torch.Generator().manual_seed(0)
    m = masker()
    selected = maskable_total = 0
    kinds = collections.Counter()
    for _ in range(40):
        ids, attention = token_batch(32, 64, generator)
        out = m(ids, generator, attention)
        chosen = out.labels != -100
        maskable = (ids > MASK) & attention.bool()
        assert not (chosen & ~maskable).any(), "a special token or padding was selected"
        assert torch.equal(out.labels[chosen], ids[chosen])
        assert torch.equal(out.input_ids[~chosen], ids[~chosen])  # nothing else changes
        selected += int(chosen.sum())
        maskable_total += int(maskable.sum())
        kinds.update(out.kinds[chosen].tolist())
        assert (out.input_ids[out.kinds == 1] == MASK).all()
        assert (out.input_ids[out.kinds == 2] > MASK).all(), "a random replacement was a special token"
        assert torch.equal(out.input_ids[out.kinds == 3], ids[out.kinds == 3])
    assert selected / maskable_total == pytest.approx(0.15, abs=0.005)
    assert kinds[1] / selected == pytest.approx(0.8, abs=0.015)
    assert kinds[2] / selected == pytest.approx(0.1, abs=0.01)
    assert kinds[3] / selected == pytest.approx(0.1, abs=0.01)


def test_expected_rate_holds_for_short_sequences():
    generator = torch.Generator().manual_seed(1)
    m = masker(rate=0.15)
    ids = torch.randint(5, 300, (2000, 6), generator=generator)
    ids[:, 0], ids[:, -1] = CLS, SEP
    out = m(ids, generator)
    assert (out.labels != -100).float().sum().item() / (2000 * 4) == pytest.approx(0.15, abs=0.01)


def test_masking_is_dynamic_and_reproducible():
    ids, attention = token_batch(8, 64, torch.Generator().manual_seed(2))
    m = masker()
    generator = torch.Generator().manual_seed(5)
    first, second = m(ids, generator, attention), m(ids, generator, attention)
    assert not torch.equal(first.labels, second.labels)  # a fresh mask each time the sequence is seen
    again = m(ids, torch.Generator().manual_seed(5), attention)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.labels, again.labels)


def test_whole_word_masking_takes_whole_words():
    generator = torch.Generator().manual_seed(3)
    m = masker(unit="word")
    selected = maskable_total = 0
    for _ in range(20):
        ids, attention = token_batch(16, 64, generator, continuation=True)
        out = m(ids, generator, attention)
        chosen = out.labels != -100
        maskable = (ids > MASK) & attention.bool()
        assert not (chosen & ~maskable).any()
        words = m.word_ids(ids, maskable)
        for row in range(ids.shape[0]):
            for word in words[row].unique().tolist():
                if word < 0:
                    continue
                in_word = chosen[row][words[row] == word]
                assert in_word.all() or not in_word.any(), "a word was masked only in part"
        selected += int(chosen.sum())
        maskable_total += int(maskable.sum())
    assert selected / maskable_total == pytest.approx(0.15, abs=0.01)


def test_span_lengths_follow_the_clipped_geometric_distribution():
    lengths = sample_span_lengths(200_000, 0.2, 10, torch.Generator().manual_seed(4))
    assert lengths.min() >= 1 and lengths.max() <= 10
    observed = torch.bincount(lengths, minlength=11)[1:].double() / len(lengths)
    assert torch.allclose(observed, clipped_geometric_pmf(0.2, 10), atol=0.004)


def test_span_masking_rate_and_span_lengths_in_masks():
    generator = torch.Generator().manual_seed(6)
    m = masker(unit="span", span_p=0.2, span_max=10)
    ids = torch.randint(5, 300, (32, 512), generator=generator)  # every token is a word
    ids[:, 0], ids[:, -1] = CLS, SEP
    runs = []
    selected = 0
    for _ in range(3):
        chosen = m.select(ids, generator)
        selected += int(chosen.sum())
        for row in chosen.tolist():
            length = 0
            for value in [*row, False]:
                if value:
                    length += 1
                elif length:
                    runs.append(length)
                    length = 0
    assert selected / (3 * 32 * 510) == pytest.approx(0.15, abs=0.005)
    assert max(runs) <= 10
    pmf = clipped_geometric_pmf(0.2, 10)
    expected_mean = float((pmf * torch.arange(1, 11)).sum())
    assert sum(runs) / len(runs) == pytest.approx(expected_mean, abs=0.35)  # the last span of a row is cut
    histogram = torch.bincount(torch.tensor(runs), minlength=11)[1:].double() / len(runs)
    assert (histogram - pmf).abs().max() < 0.03


def test_phrase_masking_masks_given_spans_whole():
    generator = torch.Generator().manual_seed(7)
    m = masker(unit="phrase")
    ids = torch.randint(5, 300, (64, 40), generator=generator)
    ids[:, 0], ids[:, -1] = CLS, SEP
    spans = [[(1, 5), (10, 13), (20, 28)] for _ in range(64)]
    hits = 0
    for _ in range(5):
        chosen = m.select(ids, generator, spans=spans)
        for row in range(64):
            for start, end in spans[row]:
                part = chosen[row, start:end]
                assert part.all() or not part.any()
                hits += int(part.all())
    assert hits > 0


def test_phrase_matcher_finds_longest_phrases():
    matcher = PhraseMatcher([[10, 11], [10, 11, 12], [20]])
    assert matcher.find([2, 10, 11, 12, 5, 10, 11, 20, 3]) == [(1, 4), (5, 7), (7, 8)]


def test_masking_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rate"):
        MaskingConfig(rate=1.5)
    with pytest.raises(ValueError, match="sum"):
        MaskingConfig(mask_prob=0.9, random_prob=0.2)
    with pytest.raises(ValueError, match="unit"):
        MaskingConfig(unit="sentence")


def _documents(count: int, sentences: int, words: int, first_id: int = 100) -> list[list[list[int]]]:
    """Documents of unique ids, so a segment's place in its document can be found."""
    next_id = first_id
    docs = []
    for _ in range(count):
        doc = []
        for _ in range(sentences):
            doc.append(list(range(next_id, next_id + words)))
            next_id += words
        docs.append(doc)
    return docs


def _contiguous(tokens: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(tokens, tokens[1:]))


def test_sop_negatives_are_swapped_positives():
    docs = _documents(40, 6, 5)
    pairs = build_sentence_pairs(docs, 20, "sop", random.Random(0))
    negatives = [pair for pair in pairs if pair.label == 1]
    assert 0.35 < len(negatives) / len(pairs) < 0.65
    for pair in pairs:
        first, second = (pair.tokens_a, pair.tokens_b) if pair.label == 0 else (pair.tokens_b, pair.tokens_a)
        # in document order, the first segment ends right where the second begins: a swap of a real pair
        assert _contiguous(list(first) + list(second))
        assert len(pair.tokens_a) + len(pair.tokens_b) <= 20


def test_nsp_negatives_come_from_another_document():
    docs = _documents(40, 6, 5)
    doc_of = {token: index for index, doc in enumerate(docs) for sentence in doc for token in sentence}
    pairs = build_sentence_pairs(docs, 20, "nsp", random.Random(0))
    labels = collections.Counter(pair.label for pair in pairs)
    assert 0.35 < labels[1] / len(pairs) < 0.65
    for pair in pairs:
        same_doc = doc_of[pair.tokens_a[0]] == doc_of[pair.tokens_b[0]]
        if pair.label == 0:
            assert _contiguous(list(pair.tokens_a) + list(pair.tokens_b))
        else:
            assert not same_doc


def test_pack_documents_fills_sequences_in_order():
    docs = _documents(10, 2, 5) + _documents(2, 9, 7, first_id=1000)  # short documents, then long ones
    packed = pack_documents(docs, 32, CLS, SEP, cross_documents=True)
    assert all(len(seq) <= 32 and seq[0] == CLS and seq[-1] == SEP for seq in packed)
    flat = [t for seq in packed for t in seq if t not in (CLS, SEP)]
    assert sorted(flat) == flat  # unique increasing ids: nothing lost, nothing reordered
    assert len(flat) == sum(len(sentence) for doc in docs for sentence in doc)
    per_doc = pack_documents(docs, 32, CLS, SEP, cross_documents=False)
    assert len(per_doc) >= len(docs) and len(packed) < len(per_doc)


def test_read_documents_from_text_files_and_shards(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("First sentence.\nSecond sentence.\n\n\nAnother document.\n")
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as archive:
        for key, caption in (("000001", "a red cube.\na blue ball."), ("000002", "a green cone.")):
            data = caption.encode()
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"{key}.json")
            info.size = 2
            archive.addfile(info, io.BytesIO(b"{}"))
    files = expand_text_inputs([str(text), str(tmp_path / "shard-{000000..000000}.tar")])
    assert read_documents(files) == [["First sentence.", "Second sentence."], ["Another document."],
                                     ["a red cube.", "a blue ball."], ["a green cone."]]
    with pytest.raises(UserError, match="not found"):
        expand_text_inputs([str(tmp_path / "missing.txt")])
