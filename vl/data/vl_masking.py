"""Collator-side preparation of VL pretraining batches: ITM negatives, then MLM / MRM masking.

Everything here runs on CPU tensors (in the data loader) and is deterministic given a CPU ``torch.Generator``,
so a data position plus the generator state reproduces a batch exactly. The objectives in ``vl/objectives`` are
then pure functions of (model output, batch).

Input batch keys (a dict of tensors, B samples, T tokens, R regions):

- ``input_ids (B, T)`` long, ``attention_mask (B, T)`` (1 at real tokens), ``token_type_ids (B, T)``;
- ``region_feats (B, R, D)`` float, ``region_boxes (B, R, G)``, ``region_mask (B, R)`` (1 at real regions);
- optional ``region_class_probs (B, R, C)``: the detector's class distribution per region (MRC / MRC-kl targets);
- optional ``image_ids (B,)`` long: two samples with the same image id are a matched pair even when swapped;
- any other ``region_*`` key (B, R, ...) travels with the regions when they are swapped for an ITM negative.

Keys added by ``prepare_vl_batch`` (only those its ``VLBatchPlan`` asks for):

- ``itm_labels (B,)`` long: 1 = matched pair, 0 = mismatched (negative);
- ``mlm_labels (B, T)`` long: the original token id at masked positions, -100 elsewhere; ``input_ids`` is masked
  (80% [MASK], 10% a random non-special token, 10% unchanged);
- ``mrm_mask (B, R)`` bool: masked regions, whose ``region_feats`` rows are zeroed (boxes are kept) and whose
  object tags are hidden (``region_tag_weights`` zeroed; the originals in ``mrm_tag_weights``);
  ``mrm_feat_targets (B, R, D)``: the original features;
  ``mrm_class_targets (B, R)`` long: detector argmax at masked regions, -100 elsewhere (needs ``region_class_probs``);
  ``mrm_class_probs (B, R, C)``: the detector distribution (needs ``region_class_probs``).

Rules: masking is never applied to a mismatched pair (its ``mlm_labels`` are all -100 and its ``mrm_mask`` all
False), and with ``conditional_masking`` (UNITER) each matched sample has only one modality masked: text or
regions, never both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vl.errors import UserError

IGNORE_INDEX = -100
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
REQUIRED_KEYS = TEXT_KEYS + ("region_feats", "region_boxes", "region_mask")
MASKING_TARGET_KEYS = ("mlm_labels", "mrm_mask", "mrm_class_targets")
TAG_WEIGHTS = "region_tag_weights"  # object tags (vl.data.tags): a masked region's tag is hidden with it


@dataclass(frozen=True)
class VLMaskingConfig:
    """How a VL pretraining batch is masked and how ITM negatives are made (YAML section ``masking``)."""

    mlm_probability: float = 0.15  # fraction of real, non-special text tokens selected for MLM
    # Selection probability of caption tokens that name one of the detector's classes or attributes (the store's
    # class_names / attribute_names): Bitton et al. 2021's object masking. MLM with uniform masking learns to
    # predict from the caption and barely reads the image; these are the words only the image can recover.
    # None: such tokens are selected like any other.
    grounded_probability: float | None = None
    mask_token_fraction: float = 0.8  # of the selected tokens: replaced by [MASK]
    random_token_fraction: float = 0.1  # of the selected tokens: replaced by a random non-special token
    mrm_probability: float = 0.15  # fraction of real regions selected for masked region modelling
    ensure_one_masked: bool = True  # a sample chosen for masking gets at least one masked token / region
    conditional_masking: bool = True  # UNITER: a sample has its text or its regions masked, never both
    text_masking_fraction: float = 0.5  # with conditional masking and both modalities asked: P(text is masked)
    itm_negative_ratio: float = 0.5  # fraction of the batch turned into mismatched pairs
    itm_negative_swap: str = "regions"  # what a negative takes from another sample: regions | text | either

    def __post_init__(self):
        if self.grounded_probability is not None and not 0.0 <= self.grounded_probability <= 1.0:
            raise ValueError(f"grounded_probability must be in [0, 1], got {self.grounded_probability}")
        for name in ("mlm_probability", "mask_token_fraction", "random_token_fraction", "mrm_probability",
                     "text_masking_fraction", "itm_negative_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.mask_token_fraction + self.random_token_fraction > 1.0:
            raise ValueError("mask_token_fraction + random_token_fraction must be at most 1")
        if self.itm_negative_swap not in ("regions", "text", "either"):
            raise ValueError(f"itm_negative_swap must be regions, text or either, got {self.itm_negative_swap!r}")


@dataclass(frozen=True)
class MaskingVocab:
    """The token ids text masking needs: vocabulary size, [MASK], the specials that are never masked, and the
    grounded tokens (names of detector classes and attributes, see ``grounded_token_ids``)."""

    vocab_size: int
    mask_token_id: int
    special_token_ids: tuple[int, ...]
    grounded_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> MaskingVocab:
        """From ``vl.text.tokenizer.Tokenizer`` (``vocab_size``, ``mask_id``, ``special_ids``)."""
        specials = tuple(sorted(int(i) for i in tokenizer.special_ids))
        return cls(int(tokenizer.vocab_size), int(tokenizer.mask_id), specials)


@dataclass(frozen=True)
class VLBatchPlan:
    """What a batch must carry for a set of objectives: masked text, masked regions, ITM negatives."""

    mask_text: bool = False
    mask_regions: bool = False
    itm_negatives: bool = False

    @classmethod
    def for_objectives(cls, objectives: Iterable[Any]) -> VLBatchPlan:
        """Union of the objectives' ``needs_masking`` ("text" | "regions" | None) and ``needs_negatives``."""
        objectives = list(objectives)
        return cls(
            mask_text=any(getattr(o, "needs_masking", None) == "text" for o in objectives),
            mask_regions=any(getattr(o, "needs_masking", None) == "regions" for o in objectives),
            itm_negatives=any(getattr(o, "needs_negatives", False) for o in objectives),
        )


def grounded_token_ids(tokenizer: Any, names: Iterable[str]) -> tuple[int, ...]:
    """The vocabulary ids of the words in ``names`` (detector class and attribute names such as ``circle``,
    ``red``, ``tennis racket``) and of their plurals (``circles``, ``boxes``): each word that the tokenizer keeps as
    one token. Words split into several pieces are left out: masking one piece would leave the rest as a hint."""
    from vl.world.language import plural  # the English rule the generated world's captions use

    ids = set()
    for name in names:
        for word in str(name).lower().replace("_", " ").split():
            for form in (word, plural(word)):
                pieces = tokenizer.encode(form, add_special_tokens=False).ids
                if len(pieces) == 1 and pieces[0] not in tokenizer.special_ids:
                    ids.add(int(pieces[0]))
    return tuple(sorted(ids))


def _check_batch(batch: dict[str, torch.Tensor]) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in batch]
    if missing:
        raise UserError(f"VL batch lacks the keys {', '.join(missing)} (has: {', '.join(sorted(batch))})")


def _ensure_one(selected: torch.Tensor, candidates: torch.Tensor, rows: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
    """For each row in ``rows`` (B,) bool with nothing selected but some candidate, select one random candidate."""
    empty = rows & ~selected.any(dim=1) & candidates.any(dim=1)
    if bool(empty.any()):
        scores = torch.rand(candidates.shape, generator=generator).masked_fill(~candidates, -1.0)
        pick = scores.argmax(dim=1)  # (B,) a random candidate per row
        one = torch.zeros_like(selected)
        one[torch.arange(selected.shape[0]), pick] = True
        selected = selected | (one & empty[:, None])
    return selected


def mask_text_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vocab: MaskingVocab,
    generator: torch.Generator,
    probability: float = 0.15,
    mask_token_fraction: float = 0.8,
    random_token_fraction: float = 0.1,
    sample_mask: torch.Tensor | None = None,
    ensure_one_masked: bool = True,
    grounded_probability: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of (B, T) ``input_ids``; returns (masked ids, ``mlm_labels`` with -100 where not selected).

    Only real (``attention_mask`` 1), non-special tokens of samples where ``sample_mask`` (B,) is True are
    selected, each with ``probability``, or with ``grounded_probability`` if it is in ``vocab.grounded_token_ids``
    (None: ``probability`` too). Selected tokens become [MASK] (``mask_token_fraction``), a random non-special
    token (``random_token_fraction``) or stay as they are (the rest).
    """
    batch_size, _ = input_ids.shape
    if sample_mask is None:
        sample_mask = torch.ones(batch_size, dtype=torch.bool)
    specials = torch.tensor(vocab.special_token_ids, dtype=input_ids.dtype)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, specials) & sample_mask.bool()[:, None]
    draws = torch.rand(input_ids.shape, generator=generator)
    selected = draws < probability
    if grounded_probability is not None and vocab.grounded_token_ids:
        grounded = torch.isin(input_ids, torch.tensor(vocab.grounded_token_ids, dtype=input_ids.dtype))
        selected = torch.where(grounded, draws < grounded_probability, selected)
    selected &= candidates
    if ensure_one_masked:
        selected = _ensure_one(selected, candidates, sample_mask.bool(), generator)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    action = torch.rand(input_ids.shape, generator=generator)  # one draw decides [MASK] / random / keep
    to_mask = selected & (action < mask_token_fraction)
    to_random = selected & (action >= mask_token_fraction) & (action < mask_token_fraction + random_token_fraction)
    keep = torch.ones(vocab.vocab_size, dtype=torch.bool)
    keep[specials[(specials >= 0) & (specials < vocab.vocab_size)]] = False
    ordinary = keep.nonzero().squeeze(1)  # (V',) ids a random replacement may take
    random_ids = ordinary[torch.randint(len(ordinary), input_ids.shape, generator=generator)]
    masked = input_ids.clone()
    masked[to_mask] = vocab.mask_token_id
    masked[to_random] = random_ids[to_random].to(input_ids.dtype)
    return masked, labels


def mask_region_features(
    region_feats: torch.Tensor,
    region_mask: torch.Tensor,
    generator: torch.Generator,
    probability: float = 0.15,
    sample_mask: torch.Tensor | None = None,
    ensure_one_masked: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked region modelling input: returns (features with masked rows zeroed, ``mrm_mask`` (B, R) bool).

    Only real regions (``region_mask`` 1) of samples where ``sample_mask`` (B,) is True are selected.
    """
    batch_size, num_regions, _ = region_feats.shape
    if sample_mask is None:
        sample_mask = torch.ones(batch_size, dtype=torch.bool)
    candidates = region_mask.bool() & sample_mask.bool()[:, None]
    selected = (torch.rand((batch_size, num_regions), generator=generator) < probability) & candidates
    if ensure_one_masked:
        selected = _ensure_one(selected, candidates, sample_mask.bool(), generator)
    return region_feats.masked_fill(selected[:, :, None], 0.0), selected


def make_itm_negatives(
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    negative_ratio: float = 0.5,
    swap: str = "regions",
) -> dict[str, torch.Tensor]:
    """Turn ``round(negative_ratio * B)`` random samples into mismatched pairs; adds ``itm_labels (B,)``.

    A negative takes another sample's regions (every ``region_*`` key) or caption (``input_ids``,
    ``attention_mask``, ``token_type_ids``), per ``swap`` ("regions" | "text" | "either", a coin per sample).
    The donor is another sample of the batch; when ``image_ids`` says it shows the same image, the pair stays
    matched (label 1). Negatives are made before masking: a batch that already has masking targets is an error.
    """
    _check_batch(batch)
    masked_keys = [key for key in MASKING_TARGET_KEYS if key in batch]
    if masked_keys:
        raise UserError(f"make_itm_negatives: the batch is already masked ({', '.join(masked_keys)}); "
                        "make negatives first, or call unmask_batch")
    out = dict(batch)
    batch_size = batch["input_ids"].shape[0]
    labels = torch.ones(batch_size, dtype=torch.long)
    num_negatives = round(negative_ratio * batch_size)
    if batch_size < 2 or num_negatives == 0:
        out["itm_labels"] = labels
        return out
    negatives = torch.randperm(batch_size, generator=generator)[:num_negatives]
    offsets = torch.randint(1, batch_size, (num_negatives,), generator=generator)
    donors = (negatives + offsets) % batch_size  # never the sample itself
    swap_text = torch.zeros(num_negatives, dtype=torch.bool)
    if swap == "text":
        swap_text[:] = True
    elif swap == "either":
        swap_text = torch.rand(num_negatives, generator=generator) < 0.5
    elif swap != "regions":
        raise UserError(f"itm_negative_swap must be regions, text or either, got {swap!r}")

    region_keys = [key for key in batch if key.startswith("region_")]
    for keys, rows in ((TEXT_KEYS, swap_text), (region_keys, ~swap_text)):
        if bool(rows.any()):
            for key in keys:
                value = out[key].clone()
                value[negatives[rows]] = batch[key][donors[rows]]
                out[key] = value
    mismatched = torch.ones(num_negatives, dtype=torch.bool)
    if "image_ids" in batch:
        mismatched = batch["image_ids"][negatives] != batch["image_ids"][donors]
    labels[negatives[mismatched]] = 0
    out["itm_labels"] = labels
    return out


def unmask_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch as it was before masking: ``input_ids`` and ``region_feats`` restored, masking targets dropped."""
    out = dict(batch)
    if "mlm_labels" in out:
        labels = out.pop("mlm_labels")
        out["input_ids"] = torch.where(labels != IGNORE_INDEX, labels, out["input_ids"])
    if "mrm_mask" in out:
        mrm_mask = out.pop("mrm_mask")
        if "mrm_feat_targets" in out:
            out["region_feats"] = torch.where(mrm_mask[:, :, None], out["mrm_feat_targets"], out["region_feats"])
    if "mrm_tag_weights" in out:
        out[TAG_WEIGHTS] = out.pop("mrm_tag_weights")
    for key in ("mrm_feat_targets", "mrm_class_targets", "mrm_class_probs"):
        out.pop(key, None)
    return out


def hide_tags(batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch with the object tags of the ``hidden`` (B, R) bool regions zeroed (a copy; unchanged without
    tags): a masked region must not keep its name beside it."""
    if TAG_WEIGHTS not in batch:
        return batch
    out = dict(batch)
    out[TAG_WEIGHTS] = batch[TAG_WEIGHTS].masked_fill(hidden[:, :, None], 0.0)
    return out


def prepare_vl_batch(
    batch: dict[str, torch.Tensor],
    cfg: VLMaskingConfig,
    vocab: MaskingVocab,
    generator: torch.Generator,
    plan: VLBatchPlan,
) -> dict[str, torch.Tensor]:
    """ITM negatives (if ``plan.itm_negatives``), then masking of the matched pairs per ``plan`` and ``cfg``.

    With both modalities asked and ``cfg.conditional_masking``, each matched sample draws which one is masked
    (text with probability ``cfg.text_masking_fraction``). Matched samples are those with ``itm_labels`` 1: the
    labels made here, or ones the data stream already put in the batch (then ``plan.itm_negatives`` is False);
    without labels every sample counts as matched. Returns a new dict; the input tensors are not modified.
    """
    _check_batch(batch)
    out = dict(batch)
    batch_size = out["input_ids"].shape[0]
    if plan.itm_negatives:
        out = make_itm_negatives(out, generator, cfg.itm_negative_ratio, cfg.itm_negative_swap)
    matched = out["itm_labels"] == 1 if "itm_labels" in out else torch.ones(batch_size, dtype=torch.bool)

    text_rows = matched if plan.mask_text else torch.zeros(batch_size, dtype=torch.bool)
    region_rows = matched if plan.mask_regions else torch.zeros(batch_size, dtype=torch.bool)
    if plan.mask_text and plan.mask_regions and cfg.conditional_masking:
        choose_text = torch.rand(batch_size, generator=generator) < cfg.text_masking_fraction
        text_rows, region_rows = matched & choose_text, matched & ~choose_text

    if plan.mask_text:
        out["input_ids"], out["mlm_labels"] = mask_text_tokens(
            out["input_ids"], out["attention_mask"], vocab, generator, cfg.mlm_probability,
            cfg.mask_token_fraction, cfg.random_token_fraction, text_rows, cfg.ensure_one_masked,
            cfg.grounded_probability,
        )
    if plan.mask_regions:
        original = out["region_feats"]
        out["region_feats"], mrm_mask = mask_region_features(
            original, out["region_mask"], generator, cfg.mrm_probability, region_rows, cfg.ensure_one_masked,
        )
        out["mrm_mask"] = mrm_mask
        out["mrm_feat_targets"] = original
        if TAG_WEIGHTS in out:
            out["mrm_tag_weights"] = out[TAG_WEIGHTS]
            out = hide_tags(out, mrm_mask)
        if "region_class_probs" in out:
            probs = out["region_class_probs"]
            out["mrm_class_probs"] = probs
            out["mrm_class_targets"] = probs.argmax(dim=-1).masked_fill(~mrm_mask, IGNORE_INDEX)
    return out


def concat_batches(batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate batches along dim 0 (e.g. a batch and its mined hard negatives).

    Every batch must have the same keys and the same T and R; keys absent from some batches are an error.
    """
    if not batches:
        raise UserError("concat_batches: no batches given")
    keys = set(batches[0])
    for index, other in enumerate(batches[1:], start=1):
        if set(other) != keys:
            diff = sorted(keys.symmetric_difference(other))
            raise UserError(f"concat_batches: batch {index} differs in keys {', '.join(diff)}")
    out = {}
    for key in batches[0]:
        shapes = {tuple(b[key].shape[1:]) for b in batches}
        if len(shapes) > 1:
            raise UserError(f"concat_batches: key {key} has different trailing shapes {sorted(shapes)}")
        out[key] = torch.cat([b[key] for b in batches], dim=0)
    return out
