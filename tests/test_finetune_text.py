"""Fine-tuning the text core: the four modes, adapter save/load, the three tasks and their commands."""

import collections
import json
import shutil

import pytest
import torch

from vl.checkpoints.hf_bert import export_hf_bert
from vl.checkpoints.io import load_state_file
from vl.checkpoints.vl_run import load_vl_run, save_vl_run
from vl.cli import main
from vl.encoders.adapters import BottleneckAdapter, ScalarMix, add_adapters
from vl.text.bert import BertPretrainingModel
from vl.encoders.text import TextEncoder, TextEncoderConfig
from vl.text.span_qa import TASK as QA
from vl.text.span_qa import f1_score, normalize_answer
from vl.text.classify import TASK as CLASSIFY
from vl.text.finetune import FinetuneConfig, load_finetuned
from vl.text.tag import TASK as TAG
from vl.text.tag import bio_chunks
from vl.text.tokenizer import Tokenizer

from support import CONFIGS

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("cube", "ball", "cone")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny base checkpoint (our run directory) with its tokenizer, and task files about colours and shapes."""
    root = tmp_path_factory.mktemp("finetune")
    sentences = [f"the {c} {s} is next to a {c2} {s2} ." for c in COLORS for s in SHAPES for c2 in COLORS
                 for s2 in SHAPES]
    (root / "corpus.txt").write_text("\n".join(sentences) + "\n")
    tokenizer = Tokenizer.train([root / "corpus.txt"], 100, min_frequency=1)
    cfg = TextEncoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=64, max_position=64)
    torch.manual_seed(0)
    base = root / "base"
    save_vl_run(BertPretrainingModel(cfg), base)
    tokenizer.save(base)
    classify = [{"text": s, "label": "red" if s.split()[1] == "red" else "other"} for s in sentences]
    (root / "classify.jsonl").write_text("".join(json.dumps(row) + "\n" for row in classify[::3]))
    tags = []
    for s in sentences[::5]:
        tokens = s.split()
        tags.append({"tokens": tokens, "tags": ["B-COL" if t in COLORS else "B-SHP" if t in SHAPES else "O"
                                                for t in tokens]})
    (root / "tag.jsonl").write_text("".join(json.dumps(row) + "\n" for row in tags))
    paragraphs = []
    for i, s in enumerate(sentences[::7]):
        answer = s.split()[1]
        paragraphs.append({"context": s, "qas": [{"id": f"q{i}", "question": "which colour comes first ?",
                                                 "answers": [{"text": answer, "answer_start": s.index(answer)}]}]})
    (root / "qa.json").write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    (root / "ft.yaml").write_text("finetune: {epochs: 0, max_len: 32}\n"
                                  "train: {steps: 4, batch_size: 8, lr: 1.0e-3, log_every: 2, save_every: 0}\n")
    return root


def finetune(data, task, mode, out, extra=()):
    files = {"classify": "classify.jsonl", "tag": "tag.jsonl", "span-qa": "qa.json"}
    path = str(data / files[task])
    return main(["finetune", task, "--init", str(data / "base"), "--train", path, "--val", path, "--out", str(out),
                 "--mode", mode, "--config", str(data / "ft.yaml"), *extra])


def encoder_state(model):
    return {k: v.clone() for k, v in model.text_encoder.state_dict().items()}


@pytest.mark.parametrize("mode", ["frozen", "scalar-mix"])
def test_frozen_encoder_is_bit_identical_after_training(data, tmp_path, mode):
    base = load_state_file(data / "base/model.safetensors")
    assert finetune(data, "classify", mode, tmp_path / mode) == 0
    trained = load_state_file(tmp_path / mode / "model.safetensors")
    encoder_keys = [k for k in trained if k.startswith("text_encoder.")]
    assert encoder_keys and all(torch.equal(trained[k], base[k]) for k in encoder_keys)
    assert any(not torch.equal(trained[k], torch.zeros_like(trained[k])) for k in trained if k.startswith("head."))
    if mode == "scalar-mix":
        assert not torch.equal(trained["scalar_mix.weights"], torch.zeros(3))  # the mix learned something


def test_adapters_train_only_adapters_norms_and_head_and_round_trip(data, tmp_path, capsys):
    base_dir = tmp_path / "base"
    shutil.copytree(data / "base", base_dir)
    run = tmp_path / "adapters"
    assert main(["finetune", "classify", "--init", str(base_dir), "--train", str(data / "classify.jsonl"),
                 "--val", str(data / "classify.jsonl"), "--out", str(run), "--mode", "adapters",
                 "--config", str(data / "ft.yaml")]) == 0
    base = load_state_file(base_dir / "model.safetensors")
    saved = load_state_file(run / "model.safetensors")
    for key in saved:  # only adapters, LayerNorms and the head are stored
        assert ".adapter." in key or ".norm." in key or key.startswith("head."), key
    assert any(".adapter." in key for key in saved)
    model, _, _ = load_finetuned(run, CLASSIFY)
    for key, value in model.state_dict().items():
        if key in saved:
            assert torch.equal(value, saved[key])
        else:
            assert torch.equal(value, base[key]), f"frozen tensor {key} changed"
    config = (run / "config.yaml").read_text()
    assert f"init: {base_dir.resolve()}" in config and "init_sha256:" in config
    assert main(["predict", "classify", "--run", str(run), "--input", str(data / "classify.jsonl"),
                 "--out", str(tmp_path / "pred.jsonl")]) == 0
    assert main(["evaluate", "classify", "--gold", str(data / "classify.jsonl"),
                 "--predictions", str(tmp_path / "pred.jsonl")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics == json.loads((run / "val_metrics.json").read_text())  # reloaded = the model as trained
    # the base checkpoint changes: the adapters no longer apply
    torch.manual_seed(2)
    save_vl_run(BertPretrainingModel(model.cfg), base_dir)
    assert main(["predict", "classify", "--run", str(run), "--input", str(data / "classify.jsonl"),
                 "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "changed since" in capsys.readouterr().err


def test_adapters_start_as_identity_and_scalar_mix_weights_layers():
    torch.manual_seed(0)
    cfg = TextEncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                            max_position=16)
    encoder = TextEncoder(cfg).eval()
    ids = torch.randint(5, 50, (2, 10))
    before = encoder(ids).hidden
    assert add_adapters(encoder, 4) == 4
    assert torch.allclose(encoder(ids).hidden, before, atol=1e-6)
    adapter = BottleneckAdapter(16, 4)
    assert torch.equal(adapter(before), before)
    mix = ScalarMix(3)
    layers = [torch.full((1, 2, 4), float(i)) for i in range(3)]
    assert torch.allclose(mix(layers), torch.full((1, 2, 4), 1.0))  # equal weights: the mean


def test_full_finetuning_from_a_hugging_face_checkpoint(data, tmp_path, capsys):
    hf = tmp_path / "hf"
    model = load_vl_run(data / "base")
    export_hf_bert(model, model.cfg, hf)
    Tokenizer.from_dir(data / "base").save(hf)
    run = tmp_path / "full"
    assert main(["finetune", "classify", "--init", str(hf), "--train", str(data / "classify.jsonl"),
                 "--val", str(data / "classify.jsonl"), "--out", str(run), "--config", str(data / "ft.yaml")]) == 0
    assert "val accuracy" in capsys.readouterr().out
    assert json.loads((run / "val_metrics.json").read_text())["count"] == 48
    trained = load_state_file(run / "model.safetensors")
    base = load_state_file(data / "base/model.safetensors")
    assert not torch.equal(trained["text_encoder.encoder.layers.0.ffn.fc_in.weight"],
                           base["text_encoder.encoder.layers.0.ffn.fc_in.weight"])


def test_tagging_labels_the_first_word_piece_and_scores_entities(data, tmp_path, capsys):
    tokenizer = Tokenizer({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "the": 5, "red": 6,
                           "##dis": 7, "##h": 8, "cube": 9})
    examples = [{"tokens": ["the", "reddish", "cube"], "tags": ["O", "B-COL", "B-SHP"]}]
    labels = ("O", "B-COL", "B-SHP")
    feature = TAG.featurize(examples, tokenizer, labels, FinetuneConfig(), training=True)[0]
    pieces = tokenizer.convert_ids_to_tokens(feature.input_ids)
    assert pieces == ["[CLS]", "the", "red", "##dis", "##h", "cube", "[SEP]"]
    starts = feature.word_starts
    assert [feature.labels[p] for p in starts] == [0, 1, 2]
    labelled = [i for i, label in enumerate(feature.labels) if label != -100]
    assert labelled == list(starts) and not pieces[starts[1]].startswith("##")
    assert bio_chunks(["B-PER", "I-PER", "O", "I-LOC", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5)}
    gold = [{"tokens": ["a", "b", "c"], "tags": ["B-X", "I-X", "O"]}]
    assert TAG.score(gold, [["B-X", "O", "O"]])["f1"] == 0.0
    assert TAG.score(gold, [["B-X", "I-X", "O"]])["f1"] == 100.0
    run = tmp_path / "tag"
    assert finetune(data, "tag", "full", run) == 0
    assert main(["predict", "tag", "--run", str(run), "--input", str(data / "tag.jsonl"),
                 "--out", str(tmp_path / "tags.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "tags.jsonl").read_text().splitlines()]
    assert all(len(row["tags"]) == len(row["tokens"]) for row in rows)
    capsys.readouterr()


def test_span_qa_windows_map_answers_and_official_metric(data, tmp_path, capsys):
    tokenizer = Tokenizer.from_dir(data / "base")
    context = " ".join(["the green cone is next to a blue ball ."] * 6) + " the red cube is last ."
    example = {"context": context, "qas": [{"id": "x", "question": "what is last ?",
                                            "answers": [{"text": "red cube", "answer_start": context.index("red")}]}]}
    path = tmp_path / "long.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [example]}]}))
    examples = QA.read(path)
    cfg = FinetuneConfig(max_len=24, doc_stride=8, max_query_len=8)
    features = QA.featurize(examples, tokenizer, (), cfg, training=True)
    assert len(features) > 3  # several overlapping windows
    with_answer = [f for f in features if f.start_position > 0]
    assert with_answer
    for feature in with_answer:
        start = feature.char_spans[feature.start_position - feature.context_offset][0]
        end = feature.char_spans[feature.end_position - feature.context_offset][1]
        assert context[start:end] == "red cube"
    flagged = collections.Counter(span for f in features for span, best in zip(f.char_spans, f.max_context) if best)
    seen = {span for f in features for span in f.char_spans}
    assert set(flagged) == seen and set(flagged.values()) == {1}  # one window of maximal context per piece
    assert normalize_answer("The  Red, cube!") == "red cube"
    assert f1_score("a red cube", "red cubes") == pytest.approx(0.5)
    run = tmp_path / "qa"
    assert finetune(data, "span-qa", "full", run) == 0
    assert main(["predict", "span-qa", "--run", str(run), "--input", str(data / "qa.json"),
                 "--out", str(tmp_path / "answers.json")]) == 0
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert set(answers) == {e.qid for e in QA.read(data / "qa.json")}
    assert all(isinstance(v, str) for v in answers.values())
    gold = QA.read(data / "qa.json")[:2]
    scores = QA.score(gold, {"q0": "The " + gold[0].answers[0] + "!", "q1": "no"})
    assert scores["exact_match"] == 50.0 and scores["f1"] == 50.0
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["finetune", "classify", "--train", "nope.jsonl"], "classification file not found: nope.jsonl"),
    (["finetune", "classify", "--init", "nowhere"], "checkpoint directory not found: nowhere"),
    (["predict", "tag", "--input", "x.jsonl"], "was fine-tuned for 'classify', not 'tag'"),
    (["evaluate", "span-qa", "--gold", "missing.json", "--predictions", "p.json"], "SQuAD file not found"),
])
def test_commands_name_the_bad_input(data, tmp_path, capsys, args, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\nnot json\n')
    run = tmp_path / "run"
    if args[0] == "predict":
        assert finetune(data, "classify", "frozen", run) == 0
        args = args + ["--run", str(run), "--out", str(tmp_path / "p.jsonl")]
    elif args[0] == "finetune":
        defaults = {"--init": str(data / "base"), "--train": str(data / "classify.jsonl"), "--out": str(run)}
        given = dict(zip(args[2::2], args[3::2]))
        args = args[:2] + [item for pair in {**defaults, **given}.items() for item in pair]
    capsys.readouterr()
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert main(["finetune", "classify", "--init", str(data / "base"), "--train", str(tmp_path / "bad.jsonl"),
                 "--out", str(run)]) == 2
    assert "bad.jsonl:2 is not valid JSON" in capsys.readouterr().err


def test_a_distilled_classifier_student_answers_as_its_teacher(data, tmp_path, capsys):
    """vl distill of a text classifier: the half-depth student starts from the teacher's layer 0 (of 2) and head,
    so its class distribution starts near the teacher's (a scratch student's distillation loss is ~1.6 here) and
    comes nearer, as do its last hidden states (distill.hidden_weight); it answers as the teacher does, and is an
    ordinary classify run."""
    from vl.train.plot import read_metrics

    rows = [json.loads(line) for line in (data / "classify.jsonl").read_text().splitlines()]
    path = tmp_path / "red.jsonl"  # does the sentence name red anywhere: learnt in 60 steps
    path.write_text("".join(json.dumps({"text": row["text"], "label": "red" if "red" in row["text"].split()
                                        else "other"}) + "\n" for row in rows))
    teacher = tmp_path / "teacher"
    assert main(["finetune", "classify", "--init", str(data / "base"), "--train", str(path), "--out", str(teacher),
                 "--config", str(data / "ft.yaml"), "--set", "train.steps=60", "--set", "train.lr=3.0e-3"]) == 0
    student = tmp_path / "student"
    capsys.readouterr()
    assert main(["distill", "--teacher", str(teacher), "--config", str(CONFIGS / "distill-text-half.yaml"),
                 "--train", str(path), "--val", str(path), "--out", str(student), "--set", "finetune.epochs=0",
                 "--set", "finetune.max_len=32", "--set", "train.steps=60", "--set", "train.batch_size=8",
                 "--set", "train.lr=1.0e-3", "--set", "train.log_every=5", "--set", "distill.soft_weight=1.0",
                 "--set", "distill.hidden_weight=1.0"]) == 0
    assert capsys.readouterr().out.startswith(f"distill classify: {student} at step 60 (layers text 2->1); val ")
    rows = [row for row in read_metrics(student / "metrics.jsonl") if "distill" in row]
    losses, hidden = [row["distill"] for row in rows], [row["hidden"] for row in rows]
    assert len(losses) == 12 and losses[0] < 0.1 and sum(losses[-3:]) < sum(losses[:3]), losses
    assert sum(hidden[-3:]) < sum(hidden[:3]), hidden  # TinyBERT's last-hidden-state MSE, toward the teacher's
    model, run, _ = load_finetuned(student, CLASSIFY)
    assert run.model.num_layers == 1 and run.labels == load_finetuned(teacher, CLASSIFY)[1].labels
    predictions = {}
    for name, run_dir in (("teacher", teacher), ("student", student)):
        out = tmp_path / f"{name}.jsonl"
        assert main(["predict", "classify", "--run", str(run_dir), "--input", str(path), "--out", str(out)]) == 0
        predictions[name] = [json.loads(line)["label"] for line in out.read_text().splitlines()]
    assert len(set(predictions["teacher"])) == 2  # the teacher has learnt the task, not the majority class
    agree = sum(a == b for a, b in zip(predictions["teacher"], predictions["student"])) / len(predictions["teacher"])
    assert agree >= 0.95, agree
    capsys.readouterr()
    assert main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "x")]) != 0
    assert "is a classify run: give --train" in capsys.readouterr().err
