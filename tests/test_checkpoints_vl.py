"""Checkpoint compatibility: tiny random Hugging Face LXMERT / VisualBERT models load into ours with matching
hidden states and head logits, export back and load into transformers again; BERT initialises text streams;
``vl convert`` round-trips."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForPreTraining,
    LxmertConfig,
    LxmertForPreTraining,
    LxmertModel,
    VisualBertConfig,
    VisualBertForPreTraining,
    VisualBertModel,
)

from vl.checkpoints.hf_vl import export_hf_vl, init_text_from_hf_bert, load_hf_vl_model  # noqa: E402
from vl.checkpoints.io import detect_checkpoint_kind  # noqa: E402
from vl.checkpoints.vl_run import load_vl_checkpoint, load_vl_run  # noqa: E402
from vl.cli import main as vl_main  # noqa: E402
from vl.errors import UserError  # noqa: E402
from vl.fusion import load_fusion_config  # noqa: E402
from vl.fusion.pretraining import HeadsConfig, build_pretraining_model  # noqa: E402

from support import CONFIGS  # noqa: E402

ATOL = 1e-4
B, T, R, FEAT = 2, 6, 5, 16


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Random non-trivial weights everywhere (HF initialises LayerNorms to 1/0 and biases to 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def inputs(padded: bool, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    region_mask = torch.ones(B, R, dtype=torch.long)
    if padded:
        attention_mask[1, 4:] = 0
        region_mask[0, 3:] = 0
    return {
        "input_ids": torch.randint(1, vocab, (B, T), generator=generator) * attention_mask,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros(B, T, dtype=torch.long),
        "region_feats": torch.randn(B, R, FEAT, generator=generator),
        "region_boxes": torch.rand(B, R, 4, generator=generator),
        "region_mask": region_mask,
    }


def close(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    if mask is not None:
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def lxmert_config(**overrides) -> LxmertConfig:
    args = dict(vocab_size=99, hidden_size=32, num_attention_heads=4, intermediate_size=37, l_layers=2, x_layers=2,
                r_layers=1, visual_feat_dim=FEAT, visual_pos_dim=4, num_qa_labels=5, num_object_labels=7,
                num_attr_labels=3)
    args.update(overrides)
    return LxmertConfig(**args)


def visualbert_config(**overrides) -> VisualBertConfig:
    args = dict(vocab_size=99, hidden_size=32, num_attention_heads=4, intermediate_size=37, num_hidden_layers=2,
                visual_embedding_dim=FEAT)
    args.update(overrides)
    return VisualBertConfig(**args)


def run_lxmert(hf, batch):
    with torch.no_grad():
        out = hf(input_ids=batch["input_ids"], visual_feats=batch["region_feats"], visual_pos=batch["region_boxes"],
                 attention_mask=batch["attention_mask"], visual_attention_mask=batch["region_mask"],
                 token_type_ids=batch["token_type_ids"], output_hidden_states=True)
    return out


def run_visualbert(hf, batch):
    with torch.no_grad():
        return hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  token_type_ids=batch["token_type_ids"], visual_embeds=batch["region_feats"],
                  visual_attention_mask=batch["region_mask"], output_hidden_states=True)


def check_lxmert(ours, hf, batch) -> None:
    theirs = run_lxmert(hf, batch)
    with torch.no_grad():
        out = ours(batch)
        text_mask, region_mask = batch["attention_mask"], batch["region_mask"]
        close(out.text_hidden, theirs.language_hidden_states[-1], text_mask)
        close(out.region_hidden, theirs.vision_hidden_states[-1], region_mask)
        close(ours.heads.mlm(out.text_hidden), theirs.prediction_logits, text_mask)
        close(ours.heads.itm(out.pooled), theirs.cross_relationship_score)
        close(ours.heads.answer(out.pooled), theirs.question_answering_score)
        region_logits = ours.heads.region(out.region_hidden)
        hf_region = hf.obj_predict_head(theirs.vision_hidden_states[-1])
        assert set(region_logits) == {"obj", "attr", "feat"}
        for name in region_logits:
            close(region_logits[name], hf_region[name], region_mask)


def check_visualbert(ours, hf, batch) -> None:
    theirs = run_visualbert(hf, batch)
    hidden = theirs.hidden_states[-1]
    with torch.no_grad():
        out = ours(batch)
        close(out.text_hidden, hidden[:, :T], batch["attention_mask"])
        close(out.region_hidden, hidden[:, T:], batch["region_mask"])
        close(ours.heads.mlm(out.text_hidden), theirs.prediction_logits[:, :T], batch["attention_mask"])
        # VisualBERT scores row 0 = matched; ours row 1 = matched: the rows are swapped on load.
        close(ours.heads.itm(out.pooled), theirs.seq_relationship_logits.flip(-1))


@pytest.fixture(scope="module")
def lxmert_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = LxmertForPreTraining(lxmert_config()).eval()
    perturb(hf, 1)
    path = tmp_path_factory.mktemp("hf_lxmert")
    hf.save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def visualbert_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = VisualBertForPreTraining(visualbert_config()).eval()
    perturb(hf, 2)
    path = tmp_path_factory.mktemp("hf_visualbert")
    hf.save_pretrained(path)
    return path, hf


@pytest.mark.parametrize("padded", [False, True])
def test_lxmert_parity_and_export(lxmert_dir, tmp_path, padded):
    path, hf = lxmert_dir
    assert detect_checkpoint_kind(path) == "hf-lxmert"
    ours, checkpoint = load_hf_vl_model(path)
    ours.eval()
    assert checkpoint.cfg.fusion == "dual_stream" and checkpoint.cfg.cross.kind == "lxmert"
    batch = inputs(padded, 99)
    check_lxmert(ours, hf, batch)
    export_hf_vl(ours, tmp_path / "export")
    reloaded, info = LxmertForPreTraining.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    check_lxmert(ours, reloaded.eval(), batch)


@pytest.mark.parametrize("padded", [False, True])
def test_visualbert_parity_and_export(visualbert_dir, tmp_path, padded):
    path, hf = visualbert_dir
    assert detect_checkpoint_kind(path) == "hf-visualbert"
    ours, checkpoint = load_hf_vl_model(path)
    ours.eval()
    assert checkpoint.cfg.fusion == "single_stream" and checkpoint.cfg.region.geometry == "none"
    batch = inputs(padded, 99)
    check_visualbert(ours, hf, batch)
    export_hf_vl(ours, tmp_path / "export")
    reloaded, info = VisualBertForPreTraining.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    check_visualbert(ours, reloaded.eval(), batch)


def test_lxmert_variants_subset_heads_and_5d_boxes(tmp_path):
    torch.manual_seed(0)
    config = lxmert_config(visual_pos_dim=5, visual_attr_loss=False, task_qa=False, hidden_act="gelu_new")
    hf = LxmertForPreTraining(config).eval()
    perturb(hf, 3)
    hf.save_pretrained(tmp_path / "hf")
    ours, checkpoint = load_hf_vl_model(tmp_path / "hf")
    assert checkpoint.cfg.region.geometry == "vilbert5"
    assert set(checkpoint.heads.region_outputs) == {"obj", "feat"} and checkpoint.heads.num_answers == 0
    batch = inputs(True, 99)
    from vl.encoders.regions import box_geometry

    theirs = hf(input_ids=batch["input_ids"], visual_feats=batch["region_feats"],
                visual_pos=box_geometry(batch["region_boxes"], "vilbert5"), attention_mask=batch["attention_mask"],
                visual_attention_mask=batch["region_mask"])
    with torch.no_grad():
        out = ours.eval()(batch)  # 4-d boxes in the batch are expanded to the model's 5-d geometry
        close(ours.heads.mlm(out.text_hidden), theirs.prediction_logits.detach(), batch["attention_mask"])
    export_hf_vl(ours, tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["visual_pos_dim"] == 5 and not exported["visual_attr_loss"] and not exported["task_qa"]


@pytest.mark.parametrize("family", ["lxmert", "visualbert"])
def test_base_model_files_load_without_heads(tmp_path, family):
    torch.manual_seed(0)
    hf = (LxmertModel(lxmert_config()) if family == "lxmert" else VisualBertModel(visualbert_config())).eval()
    perturb(hf, 4)
    hf.save_pretrained(tmp_path / "hf")
    ours, checkpoint = load_hf_vl_model(tmp_path / "hf")
    assert ours.heads.mlm is None and ours.heads.itm is None and ours.heads.region is None
    batch = inputs(True, 99)
    with torch.no_grad():
        out = ours.eval()(batch)
        if family == "lxmert":
            theirs = hf(input_ids=batch["input_ids"], visual_feats=batch["region_feats"],
                        visual_pos=batch["region_boxes"], attention_mask=batch["attention_mask"],
                        visual_attention_mask=batch["region_mask"])
            close(out.pooled, theirs.pooled_output)
        else:
            theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        visual_embeds=batch["region_feats"], visual_attention_mask=batch["region_mask"])
            close(out.pooled, theirs.pooler_output)
    export_hf_vl(ours, tmp_path / "export")
    cls = LxmertModel if family == "lxmert" else VisualBertModel
    _, info = cls.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_unknown_and_missing_tensors_are_named(lxmert_dir, tmp_path):
    path, _ = lxmert_dir
    tensors = safetensors.torch.load_file(str(path / "model.safetensors"))
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "config.json").write_text((path / "config.json").read_text())
    safetensors.torch.save_file({**tensors, "vqa_head.weight": torch.zeros(3)},
                                str(tmp_path / "extra" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="'vqa_head.weight'"):
        load_hf_vl_model(tmp_path / "extra")
    load_hf_vl_model(tmp_path / "extra", ignore_unknown=True)
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "config.json").write_text((path / "config.json").read_text())
    del tensors["lxmert.encoder.x_layers.1.visual_attention.att.key.weight"]
    safetensors.torch.save_file(tensors, str(tmp_path / "missing" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="x_layers.1.visual_attention.att.key.weight"):
        load_hf_vl_model(tmp_path / "missing")


def test_architectures_without_hf_format_refuse_export(tmp_path):
    for name in ("vilbert-tiny.yaml", "uniter-tiny.yaml"):
        model = build_pretraining_model(load_fusion_config(CONFIGS / name))
        with pytest.raises(UserError, match="cannot export"):
            export_hf_vl(model, tmp_path / name)
        assert not (tmp_path / name / "model.safetensors").exists()
    for name in ("lxmert-tiny.yaml", "visualbert-tiny.yaml"):  # exportable, but not with object tags
        model = build_pretraining_model(load_fusion_config(CONFIGS / name, ["model.tags.placement=text"]))
        with pytest.raises(UserError, match=r"cannot export a model with object tags \(model.tags\)"):
            export_hf_vl(model, tmp_path / f"tagged-{name}")
    model = build_pretraining_model(load_fusion_config(CONFIGS / "lxmert-tiny.yaml", ["model.region.box_norm=false"]))
    with pytest.raises(UserError, match=r"the region embeddings are not LXMERT's"):  # LXMERT has box_layer_norm
        export_hf_vl(model, tmp_path / "lxmert-no-box-norm")
    assert not (tmp_path / "lxmert-no-box-norm" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    hf = BertForPreTraining(config).eval()
    perturb(hf, 5)
    path = tmp_path_factory.mktemp("hf_bert")
    hf.save_pretrained(path)
    return path, {key: value.clone() for key, value in hf.state_dict().items()}


@pytest.mark.parametrize("name", ["visualbert-tiny.yaml", "uniter-tiny.yaml", "lxmert-tiny.yaml",
                                  "vilbert-tiny.yaml"])
def test_bert_initialises_the_text_stream(bert_dir, name):
    path, bert = bert_dir
    cfg = load_fusion_config(CONFIGS / name)
    model = build_pretraining_model(cfg)
    region_before = {k: v.clone() for k, v in model.state_dict().items() if "region_embeddings.feature" in k}
    init_text_from_hf_bert(model, path)
    state = model.state_dict()
    torch.testing.assert_close(state["fusion.text_embeddings.word_embeddings.weight"],
                               bert["bert.embeddings.word_embeddings.weight"])
    torch.testing.assert_close(state["fusion.text_embeddings.norm.weight"], bert["bert.embeddings.LayerNorm.weight"])
    layers = "fusion.encoder.layers" if cfg.fusion == "single_stream" else "fusion.text_layers"
    for i in range(cfg.text.num_layers):
        torch.testing.assert_close(state[f"{layers}.{i}.ffn.fc_in.weight"],
                                   bert[f"bert.encoder.layer.{i}.intermediate.dense.weight"])
        torch.testing.assert_close(state[f"{layers}.{i}.attention.query.bias"],
                                   bert[f"bert.encoder.layer.{i}.attention.self.query.bias"])
    torch.testing.assert_close(state["heads.mlm.transform.dense.weight"],
                               bert["cls.predictions.transform.dense.weight"])
    if name.startswith("lxmert"):  # x-layers' language halves from BERT layers 2, 3
        for j in range(cfg.cross.num_layers):
            torch.testing.assert_close(state[f"fusion.cross_layers.{j}.text_layer.attention.out.weight"],
                                       bert[f"bert.encoder.layer.{2 + j}.attention.output.dense.weight"])
    if name.startswith("visualbert"):  # VisualBERT's visual tables start as BERT's
        torch.testing.assert_close(state["fusion.region_embeddings.type_embeddings.weight"],
                                   bert["bert.embeddings.token_type_embeddings.weight"])
    for key, value in region_before.items():
        assert torch.equal(state[key], value)
    out = model.eval()({"input_ids": torch.tensor([[2, 7, 9]]), "region_feats": torch.randn(1, 2, 16),
                        "region_boxes": torch.rand(1, 2, 4)})
    assert torch.isfinite(out.pooled).all()


def test_bert_text_stream_mismatch_is_named(bert_dir):
    path, _ = bert_dir
    cfg = load_fusion_config(CONFIGS / "uniter-tiny.yaml", ["model.text.intermediate_size=48"])
    with pytest.raises(UserError, match="intermediate_size"):
        init_text_from_hf_bert(build_pretraining_model(cfg), path)
    cfg = load_fusion_config(CONFIGS / "uniter-tiny.yaml", ["model.text.num_layers=6"])
    with pytest.raises(UserError, match="has 4 layers"):
        init_text_from_hf_bert(build_pretraining_model(cfg), path)


def test_convert_cli_round_trips(lxmert_dir, visualbert_dir, bert_dir, tmp_path, capsys):
    for label, (path, hf) in (("lxmert", lxmert_dir), ("visualbert", visualbert_dir)):
        run = tmp_path / f"run_{label}"
        assert vl_main(["convert", "--from-hf", str(path), "--out", str(run)]) == 0
        assert (run / "config.yaml").is_file() and (run / "model.safetensors").is_file()
        assert detect_checkpoint_kind(run) == "vl-run"
        model = load_vl_checkpoint(run).eval()
        batch = inputs(True, 99)
        (check_lxmert if label == "lxmert" else check_visualbert)(model, hf, batch)
        assert vl_main(["convert", "--from-hf", str(path), "--out", str(run)]) == 2  # refuses to overwrite
        assert "--force" in capsys.readouterr().err
        out = tmp_path / f"hf_{label}"
        assert vl_main(["convert", str(run), "--to-hf", str(out)]) == 0
        cls = LxmertForPreTraining if label == "lxmert" else VisualBertForPreTraining
        (check_lxmert if label == "lxmert" else check_visualbert)(model, cls.from_pretrained(out).eval(), batch)
    path, bert = bert_dir
    assert vl_main(["convert", "--from-hf", str(path), "--out", str(tmp_path / "run_bert")]) == 0
    text_model = load_vl_run(tmp_path / "run_bert")
    torch.testing.assert_close(text_model.state_dict()["text_encoder.encoder.layers.3.ffn.fc_out.weight"],
                               bert["bert.encoder.layer.3.output.dense.weight"])
    assert vl_main(["convert", str(tmp_path / "run_bert"), "--to-hf", str(tmp_path / "hf_bert")]) == 0
    assert json.loads((tmp_path / "hf_bert" / "config.json").read_text())["model_type"] == "bert"
    with pytest.raises(UserError, match="text-only"):
        load_vl_checkpoint(tmp_path / "run_bert")


def test_convert_carries_the_tokenizer_both_ways(lxmert_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from vl.text.tokenizer import Tokenizer

    path, _ = lxmert_dir
    source = tmp_path / "hf_with_vocab"
    shutil.copytree(path, source)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s", "?"]
    (source / "vocab.txt").write_text("".join(f"{w}\n" for w in words))
    run, back = tmp_path / "run", tmp_path / "hf_back"
    assert vl_main(["convert", "--from-hf", str(source), "--out", str(run)]) == 0
    assert "and the tokenizer" in capsys.readouterr().out
    text = "a red circles?"
    assert Tokenizer.from_dir(run).encode(text).ids == Tokenizer.from_dir(source).encode(text).ids
    assert vl_main(["convert", str(run), "--to-hf", str(back)]) == 0
    hf_tokenizer = AutoTokenizer.from_pretrained(str(back))
    assert hf_tokenizer("a red circles?")["input_ids"] == [2, 5, 6, 7, 8, 9, 3]
    # without a vocabulary the summary says so, and the conversion still succeeds
    assert vl_main(["convert", "--from-hf", str(path), "--out", str(tmp_path / "bare")]) == 0
    assert "no tokenizer was carried" in capsys.readouterr().out


def test_convert_cli_errors(tmp_path, capsys):
    assert vl_main(["convert", "--from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "gpt2"}')
    assert vl_main(["convert", "--from-hf", str(tmp_path / "odd"), "--out", str(tmp_path / "run")]) == 2
    assert "gpt2" in capsys.readouterr().err
    assert vl_main(["convert", "--from-hf", str(tmp_path / "odd")]) == 2
    assert "--out" in capsys.readouterr().err
    model = build_pretraining_model(load_fusion_config(CONFIGS / "vilbert-tiny.yaml"),
                                   HeadsConfig(region_outputs={"obj": 12, "feat": 16}))
    assert set(model.heads.cfg.region_outputs) == {"obj", "feat"}
    from vl.checkpoints.vl_run import save_vl_run

    save_vl_run(model, tmp_path / "vilbert_run")
    assert vl_main(["convert", str(tmp_path / "vilbert_run"), "--to-hf", str(tmp_path / "hf")]) == 2
    assert "cannot export" in capsys.readouterr().err
    reloaded = load_vl_run(tmp_path / "vilbert_run")
    assert reloaded.heads.region is not None and reloaded.cfg == model.cfg


def test_text_core_starts_from_a_vision_language_checkpoint(lxmert_dir, visualbert_dir, tmp_path):
    """vl pretrain-text / finetune --init take LXMERT and VisualBERT checkpoints (HF or ours): their language part."""
    from vl.checkpoints.text_init import init_from_checkpoint, load_text_checkpoint
    from vl.text.bert import BertPretrainingModel

    ids = torch.tensor([[2, 17, 33, 41, 3]])
    # VisualBERT (single-stream): the whole transformer reads text alone exactly as Hugging Face's model does
    path, hf = visualbert_dir
    checkpoint = load_text_checkpoint(path)
    assert checkpoint.kind == "hf-visualbert" and checkpoint.cfg.num_layers == hf.config.num_hidden_layers
    ours = BertPretrainingModel(checkpoint.cfg).eval()
    init_from_checkpoint(ours, checkpoint)
    with torch.no_grad():
        expected = hf.visual_bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        torch.testing.assert_close(ours.text_encoder(ids, torch.ones_like(ids)).hidden, expected, atol=1e-5, rtol=1e-5)
    # LXMERT (dual-stream): the language layers, not the cross-modality ones; the same from our run directory
    path, hf = lxmert_dir
    run = tmp_path / "lxmert_run"
    assert vl_main(["convert", "--from-hf", str(path), "--out", str(run)]) == 0
    for source in (path, run):
        checkpoint = load_text_checkpoint(source)
        assert checkpoint.cfg.num_layers == hf.config.l_layers
        ours = BertPretrainingModel(checkpoint.cfg)
        missing = init_from_checkpoint(ours, checkpoint)
        assert all(not key.startswith("text_encoder.encoder.") for key in missing)
        for layer in range(hf.config.l_layers):
            torch.testing.assert_close(ours.state_dict()[f"text_encoder.encoder.layers.{layer}.ffn.fc_out.weight"],
                                       hf.lxmert.encoder.layer[layer].output.dense.weight)
        torch.testing.assert_close(ours.state_dict()["text_encoder.embeddings.word_embeddings.weight"],
                                   hf.lxmert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("padded", [False, True])
def test_an_hf_lxmert_vqa_checkpoint_converts_to_a_vqa_run_with_its_answers(world, tmp_path, capsys, padded):
    """vl convert --from-hf of LxmertForQuestionAnswering with --answers writes a VQA run of ours whose answer
    logits are transformers' on the same inputs, and whose answers are the list's, in logit order."""
    from transformers import LxmertForQuestionAnswering

    from vl.tasks.runs import load_any_task_run
    from vl.tasks.vqa.model import predicted_answers

    torch.manual_seed(0)
    hf = LxmertForQuestionAnswering(lxmert_config()).eval()
    perturb(hf, 3)
    hf.save_pretrained(tmp_path / "hf")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "it", "red", "?"]  # a published one has its vocab
    (tmp_path / "hf" / "vocab.txt").write_text("".join(f"{w}\n" for w in words))
    answers = ["yes", "no", "2", "red", "circle"]  # num_qa_labels=5
    (tmp_path / "label2ans.json").write_text(json.dumps(answers))
    assert vl_main(["convert", "--from-hf", str(tmp_path / "hf"), "--answers", str(tmp_path / "label2ans.json"),
                    "--out", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote the VQA run {tmp_path / 'run'} (5 answers and the tokenizer")
    model, run, _ = load_any_task_run(tmp_path / "run")
    assert run.task == "vqa" and list(run.answers) == answers
    batch = inputs(padded, 99, seed=7)
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], visual_feats=batch["region_feats"],
                    visual_pos=batch["region_boxes"], attention_mask=batch["attention_mask"],
                    visual_attention_mask=batch["region_mask"],
                    token_type_ids=batch["token_type_ids"]).question_answering_score
        ours = model.eval().logits(batch)
    close(ours, theirs)
    assert predicted_answers(ours, answers) == [answers[i] for i in theirs.argmax(-1).tolist()]
    if padded:  # vl predict vqa writes the official results with the converted run, on 16-d world features
        from vl.world.features import write_world_features

        store = write_world_features(world, tmp_path / "store")
        assert vl_main(["predict", "vqa", "--run", str(tmp_path / "run"), "--questions",
                        str(world.vqa_questions("val")), "--features", str(store),
                        "--out", str(tmp_path / "results.json")]) == 0
        results = json.loads((tmp_path / "results.json").read_text())
        assert len(results) == len(json.loads(world.vqa_questions("val").read_text())["questions"])
        assert {row["answer"] for row in results} <= set(answers)
    for argv, message in (
        (["--answers", str(tmp_path / "label2ans.json")], "--answers goes with --from-hf"),
        (["--from-hf", str(tmp_path / "hf"), "--answers", str(tmp_path / "few.json"), "--out", str(tmp_path / "a")],
         "lists 2 answers but"),
        (["--from-hf", str(tmp_path / "hf"), "--answers", str(tmp_path / "nope.json"), "--out", str(tmp_path / "b")],
         "cannot read it as JSON"),
    ):
        (tmp_path / "few.json").write_text(json.dumps(["yes", "no"]))
        capsys.readouterr()
        assert vl_main(["convert", *argv]) != 0
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
