"""What the tests share: the configs directory, the tiny architecture of every registered fusion, and synthetic
batches (a padded fusion batch, a pretraining batch with targets)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from vl.data.vl_masking import MaskingVocab
from vl.fusion import FUSION_REGISTRY, build_fusion, load_fusion_config
from vl.fusion.base import FusionConfig
from vl.fusion.pretraining import HeadsConfig, VLPretrainingModel

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
VOCAB = MaskingVocab(vocab_size=512, mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4))  # PAD UNK CLS SEP MASK
CLS, SEP = 2, 3
FEATURE_DIM, NUM_CLASSES, NUM_ANSWERS = 16, 12, 10  # the tiny configs' region inputs, and the test heads' sizes


def tiny_architectures() -> dict[str, str]:
    """Every architecture with a tiny model config, as ``{name: its registered fusion}``: the
    ``configs/NAME-tiny.yaml`` whose ``model:`` section names one of ``FUSION_REGISTRY``'s fusions, so that a newly
    registered architecture is tested as soon as it ships its tiny config."""
    found = {}
    for path in sorted(CONFIGS.glob("*-tiny.yaml")):
        model = (yaml.safe_load(path.read_text()) or {}).get("model")
        if isinstance(model, dict) and model.get("fusion") in FUSION_REGISTRY:
            found[path.name.removesuffix("-tiny.yaml")] = model["fusion"]
    return found


ARCHITECTURES = sorted(tiny_architectures())  # uniter, visualbert, lxmert, vilbert, ...
TINY = [f"{name}-tiny.yaml" for name in ARCHITECTURES]


def fusion_batch(cfg: FusionConfig, text_lens: list[int], region_counts: list[int], seed: int = 0) -> dict:
    """A padded batch: example i has text_lens[i] real tokens and region_counts[i] real regions."""
    generator = torch.Generator().manual_seed(seed)
    batch_size, max_text, max_regions = len(text_lens), max(text_lens), max(region_counts)
    input_ids = torch.randint(5, cfg.text.vocab_size, (batch_size, max_text), generator=generator)
    attention_mask = torch.zeros(batch_size, max_text, dtype=torch.long)
    region_mask = torch.zeros(batch_size, max_regions, dtype=torch.long)
    for i, (length, count) in enumerate(zip(text_lens, region_counts)):
        attention_mask[i, :length] = 1
        region_mask[i, :count] = 1
    input_ids = input_ids * attention_mask  # padding id 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, max_text // 2:] = 1
    corners = torch.rand(batch_size, max_regions, 2, 2, generator=generator).sort(dim=2).values  # x, y ordered
    boxes = torch.stack([corners[..., 0, 0], corners[..., 0, 1], corners[..., 1, 0], corners[..., 1, 1]], dim=-1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids * attention_mask,
        "region_feats": torch.randn(batch_size, max_regions, cfg.region.feature_dim, generator=generator),
        "region_boxes": boxes,  # (B, R, 4): expanded to the model's geometry
        "region_mask": region_mask,
    }


def take(batch: dict, index: int, text_len: int, region_count: int) -> dict:
    """Example ``index`` of ``batch`` without its padding."""
    out = {}
    for key, value in batch.items():
        value = value[index:index + 1]
        out[key] = value[:, :text_len] if key in ("input_ids", "attention_mask", "token_type_ids") \
            else value[:, :region_count]
    return out


def make_model(config_name: str, seed: int = 0, dropout: float = 0.0) -> VLPretrainingModel:
    """A tiny model from ``configs/`` with every head the objectives need (region obj/attr/feat, 10 answers)."""
    path = CONFIGS / config_name
    cfg = load_fusion_config(path, [f"model.text.dropout={dropout}", f"model.text.attn_dropout={dropout}"])
    heads = HeadsConfig(mlm=True, itm=True, region_outputs={"obj": NUM_CLASSES, "attr": 8, "feat": FEATURE_DIM},
                        num_answers=NUM_ANSWERS)
    torch.manual_seed(seed)
    return VLPretrainingModel(build_fusion(cfg), heads)


def pretraining_batch(batch_size: int = 8, text_len: int = 12, num_regions: int = 10, seed: int = 0,
               vocab_size: int = 512) -> dict[str, torch.Tensor]:
    """Captions ``[CLS] w... [SEP] [PAD]...`` and regions with padding in both modalities, detector
    distributions, image ids, and QA targets on half of the samples."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(batch_size, text_len, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, text_len, dtype=torch.long)
    region_mask = torch.zeros(batch_size, num_regions, dtype=torch.long)
    for row in range(batch_size):
        length = text_len - (row % 4)  # some captions padded
        words = torch.randint(5, vocab_size, (length - 2,), generator=gen)
        input_ids[row, :length] = torch.cat([torch.tensor([CLS]), words, torch.tensor([SEP])])
        attention_mask[row, :length] = 1
        region_mask[row, : num_regions - (row % 3)] = 1  # some region sets padded
    corners = torch.rand(batch_size, num_regions, 2, 2, generator=gen).sort(dim=2).values  # (B, R, 2 [min, max], 2)
    region_boxes = corners.permute(0, 1, 3, 2).reshape(batch_size, num_regions, 4)[..., [0, 2, 1, 3]]
    region_class_probs = torch.softmax(3 * torch.randn(batch_size, num_regions, NUM_CLASSES, generator=gen), -1)
    answer_targets = (torch.rand(batch_size, NUM_ANSWERS, generator=gen) > 0.8).float()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "region_feats": torch.randn(batch_size, num_regions, FEATURE_DIM, generator=gen),
        "region_boxes": region_boxes,
        "region_mask": region_mask,
        "region_class_probs": region_class_probs,
        "image_ids": torch.arange(batch_size),
        "answer_targets": answer_targets,
        "has_answer": torch.arange(batch_size) % 2 == 0,
    }
