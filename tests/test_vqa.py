"""VQA: answer vocabulary, soft targets (official leave-one-out scores), the model and its loss, fine-tuning,
prediction and evaluation end to end on the generated world, ``vl vqa`` on one image, and CLI errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from vl.cli import main
from vl.data.formats import VqaAnnotation, VqaAnswer, read_vqa_questions
from vl.world.features import write_world_features
from vl.errors import UserError
from vl.fusion import FUSION_REGISTRY, load_fusion_config
from vl.fusion.pretraining import HeadsConfig, build_pretraining_model
from vl.tasks.vl_finetune import load_init, prepare_init, region_batch, text_batch
from vl.tasks.vqa.answers import build_answer_vocab, count_answers, soft_targets
from vl.tasks.vqa.config import VqaConfig
from vl.tasks.vqa.data import VqaCollator, VqaExample, question_subset, shuffled_images
from vl.tasks.vqa.metric import vqa_accuracy
from vl.tasks.vqa.model import VqaModel

from support import ARCHITECTURES, CONFIGS, tiny_architectures





pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def annotation(question_id: int, answers: list[str], multiple_choice: str | None = None,
               answer_type: str = "other") -> VqaAnnotation:
    return VqaAnnotation(question_id=question_id, image_id=1,
                         answers=tuple(VqaAnswer(a, "yes", i + 1) for i, a in enumerate(answers)),
                         multiple_choice_answer=multiple_choice or answers[0], answer_type=answer_type,
                         question_type="what")


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary and targets (hand-computed)


def test_soft_targets_are_the_leave_one_out_scores():
    index = {"red": 0, "blue": 1, "green": 2, "pink": 3, "black": 4}
    answers = ["red"] * 3 + ["blue"] * 4 + ["green"] + ["black"] * 2
    targets = soft_targets(answers, index)
    # red: 3 of 10. Leaving out one of the 3 reds (3 times): 2 matches -> 2/3; leaving out another (7 times): 3 -> 1.
    # (3 * 2/3 + 7 * 1) / 10 = 0.9. blue: 4 -> every subset has >= 3 -> 1.0. green: 1 -> (9 * 1/3) / 10 = 0.3.
    # black: 2 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6. pink: not given -> absent.
    assert targets == pytest.approx({0: 0.9, 1: 1.0, 2: 0.3, 4: 0.6})
    assert 3 not in targets


def test_soft_targets_normalise_answers_and_skip_out_of_vocabulary():
    index = {"yes": 0}
    # "Yes." and "yes" normalise to "yes" for the candidate; the official metric then compares the annotator answers
    # after punctuation processing only, which keeps case: "Yes" (3 times) does not match "yes".
    answers = ["yes"] * 2 + ["Yes."] * 3 + ["maybe"] * 5
    targets = soft_targets(answers, index)
    assert targets == pytest.approx({0: vqa_accuracy("yes", answers)})
    assert targets[0] == pytest.approx(0.6)  # 2 exact matches
    assert soft_targets(["no"] * 10, index) == {}


def test_question_subset_is_seeded_and_keeps_annotations_paired():
    from vl.data.formats import VqaQuestion
    questions = [VqaQuestion(question_id=i, image_id=1, question=f"q{i}") for i in range(200)]
    annotations = [annotation(i, ["yes"] * 10) for i in range(200)]
    kept_q, kept_a = question_subset(questions, annotations, 0.1, seed=3)
    assert len(kept_q) == 20 and [q.question_id for q in kept_q] == [a.question_id for a in kept_a]
    assert [q.question_id for q in kept_q] == sorted(q.question_id for q in kept_q)  # file order kept
    again, _ = question_subset(list(reversed(questions)), annotations, 0.1, seed=3)
    assert {q.question_id for q in again} == {q.question_id for q in kept_q}  # the draw ignores file order
    other, _ = question_subset(questions, annotations, 0.1, seed=4)
    assert {q.question_id for q in other} != {q.question_id for q in kept_q}
    assert len(question_subset(questions, annotations, 0.001, seed=0)[0]) == 1  # never empty
    assert question_subset(questions, annotations, 1.0, seed=0)[0] == questions
    with pytest.raises(ValueError, match="train_fraction"):
        VqaConfig(train_fraction=0.0)


def test_answer_vocabulary_threshold_and_order():
    given = ["Yes", "yes.", "yes", "yes", "no", "no", "two", "2", "a cat"]
    annotations = [annotation(i, ["x"] * 10, answer) for i, answer in enumerate(given)]
    counts = count_answers(annotations)
    assert counts == {"yes": 4, "no": 2, "2": 2, "cat": 1}  # lower case, periods, number words, articles
    assert build_answer_vocab(annotations, 3) == ["yes"]
    assert build_answer_vocab(annotations, 2) == ["yes", "2", "no"]  # by count, then alphabetically
    assert build_answer_vocab(annotations, 1) == ["yes", "2", "no", "cat"]
    assert build_answer_vocab(annotations, 5) == []
    # counting every annotator answer instead of the multiple-choice answer
    assert build_answer_vocab(annotations, 90, counting="all") == ["x"]


# ----------------------------------------------------------------------------------------------------------------
# Model and loss


def test_every_registered_fusion_has_a_tiny_architecture():
    assert set(tiny_architectures().values()) == set(FUSION_REGISTRY)


def _batch(model_cfg, num_answers: int, size: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = text_batch([[2, 7, 9, 3], [2, 5, 3], [2, 8, 8, 8, 3]][:size], pad_id=0)
    regions = []
    for count in (4, 2, 3)[:size]:
        boxes = torch.rand(count, 2, generator=generator) * 0.5
        regions.append((torch.randn(count, model_cfg.region.feature_dim, generator=generator).numpy(),
                        torch.cat([boxes, boxes + 0.4], dim=1).numpy()))
    batch.update(region_batch(regions, model_cfg.region.feature_dim))
    targets = torch.zeros(size, num_answers)
    targets[0, 1], targets[1, 0], targets[1, 2] = 1.0, 0.3, 0.6
    batch["answer_targets"] = targets
    return batch


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_vqa_model_loss_is_bce_times_vocabulary_size(name):
    cfg = load_fusion_config(CONFIGS / f"{name}-tiny.yaml")
    torch.manual_seed(0)
    model = VqaModel(build_pretraining_model(cfg).fusion, num_answers=5).eval()
    batch = _batch(cfg, 5)
    losses = model(batch)
    logits = model.logits(batch)
    expected = F.binary_cross_entropy_with_logits(logits, batch["answer_targets"], reduction="sum") / 3
    torch.testing.assert_close(losses["vqa"], expected)
    losses["vqa"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.heads.answer.classifier.weight.grad is not None
    assert set(model.state_dict()) == set(build_pretraining_model(cfg, VqaModel.heads_config(5)).state_dict())


def test_collator_joins_questions_with_store_features(world, tmp_path):
    store_dir = write_world_features(world, tmp_path / "store", splits=("val",))
    from region_features.store import FeatureStore

    store = FeatureStore(store_dir)
    questions = read_vqa_questions(world.vqa_questions("val"))[:2]
    examples = [VqaExample(q.question_id, q.image_id, (2, 5, 3), (1,), (0.9,)) for q in questions]
    batch = VqaCollator(store, 16, max_regions=3, num_answers=4, pad_id=0)(examples)
    first = store[questions[0].image_id]
    count = min(3, len(first["features"]))
    torch.testing.assert_close(batch["region_feats"][0, :count], torch.from_numpy(first["features"][:count]).float())
    assert batch["region_mask"][0].sum() == count
    assert batch["answer_targets"].tolist()[0] == [0.0, pytest.approx(0.9), 0.0, 0.0]
    assert batch["region_boxes"].min() >= 0 and batch["region_boxes"].max() <= 1


# ----------------------------------------------------------------------------------------------------------------
# --init


def test_init_from_a_vl_run_keeps_its_weights_and_tokenizer(tmp_path):
    from vl.checkpoints.vl_run import save_vl_run
    from vl.text.tokenizer import Tokenizer

    cfg = load_fusion_config(CONFIGS / "lxmert-tiny.yaml")
    heads = HeadsConfig(region_outputs={"obj": 12, "attr": 8, "feat": 16}, num_answers=10)
    torch.manual_seed(3)
    model = build_pretraining_model(cfg, heads)
    save_vl_run(model, tmp_path / "pre")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("what color is the circle\nis there a red square\n")
    Tokenizer.train([corpus], 64, min_frequency=1).save(tmp_path / "pre")
    init, tokenizer = prepare_init(str(tmp_path / "pre"), None, None, [])
    assert init.kind == "vl-run" and tokenizer.vocab_size <= 64
    for key, value in model.fusion.state_dict().items():
        torch.testing.assert_close(init.model.fusion.state_dict()[key], value)
    torch.testing.assert_close(init.model.heads.itm.weight, model.heads.itm.weight)


def test_scratch_init_needs_a_model_config():
    from vl.errors import UserError

    with pytest.raises(UserError, match="--init scratch needs a model"):
        load_init("scratch", None)


# ----------------------------------------------------------------------------------------------------------------
# End to end on the generated world


@pytest.fixture(scope="module")
def vqa_run(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    store = write_world_features(world, root / "store")
    run = root / "run"
    code = main(["finetune", "vqa", "--init", "scratch", "--config", str(CONFIGS / "finetune-vqa-tiny.yaml"),
                 "--train-questions", str(world.vqa_questions("train")),
                 "--train-annotations", str(world.vqa_annotations("train")),
                 "--val-questions", str(world.vqa_questions("val")),
                 "--val-annotations", str(world.vqa_annotations("val")),
                 "--features", str(store), "--out", str(run), "--set", "train.steps=6", "--set", "train.batch_size=16"])
    assert code == 0
    return run, store


def test_finetune_predict_evaluate_end_to_end(world, vqa_run, tmp_path, capsys):
    run, store = vqa_run
    for name in ("config.yaml", "model.safetensors", "answers.json", "vocab.txt", "val_metrics.json"):
        assert (run / name).is_file(), name
    val_metrics = json.loads((run / "val_metrics.json").read_text())
    assert 0.0 <= val_metrics["overall"] <= 100.0
    results = tmp_path / "results.json"
    assert main(["predict", "vqa", "--run", str(run), "--questions", str(world.vqa_questions("val")),
                 "--features", str(store), "--out", str(results)]) == 0
    answers = json.loads(results.read_text())
    questions = read_vqa_questions(world.vqa_questions("val"))
    assert [item["question_id"] for item in answers] == [q.question_id for q in questions]
    vocabulary = set(json.loads((run / "answers.json").read_text())["answers"])
    assert all(set(item) == {"question_id", "answer"} and item["answer"] in vocabulary for item in answers)
    capsys.readouterr()
    assert main(["evaluate", "vqa", "--annotations", str(world.vqa_annotations("val")),
                 "--results", str(results)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"overall: {val_metrics['overall']:.2f} ({len(questions)} questions)")
    for answer_type in ("yes/no", "number", "other"):
        assert f"{answer_type}: " in printed
    # The run directory also loads as a plain VL checkpoint, with its answer head.
    from vl.checkpoints.vl_run import load_vl_run

    assert load_vl_run(run).heads.answer.classifier.out_features == len(vocabulary)


def test_shuffled_images_is_a_seeded_derangement():
    examples = [VqaExample(question_id=q, image_id=image, token_ids=(1,)) for q, image in
                enumerate([5, 5, 7, 9, 11, 11, 13])]
    shuffled = shuffled_images(examples, seed=3)
    assert [e.question_id for e in shuffled] == [e.question_id for e in examples]
    assert all(new.image_id != old.image_id for new, old in zip(shuffled, examples))  # nobody keeps its image
    mapping = {old.image_id: new.image_id for old, new in zip(examples, shuffled)}
    assert len(mapping) == 5 and sorted(mapping.values()) == sorted(mapping)  # a permutation of the images
    assert shuffled[0].image_id == shuffled[1].image_id  # questions on one image move together
    assert shuffled_images(examples, seed=3) == shuffled
    assert shuffled_images(examples, seed=4) != shuffled or len(mapping) < 3
    with pytest.raises(UserError, match="--shuffle-images needs questions on at least two images"):
        shuffled_images(examples[:2], seed=0)


def test_predict_with_shuffled_images(world, vqa_run, tmp_path):
    """The image-blind control answers the same questions, on other images' regions."""
    run, store = vqa_run
    real, blind = tmp_path / "real.json", tmp_path / "blind.json"
    common = ["predict", "vqa", "--run", str(run), "--questions", str(world.vqa_questions("val")),
              "--features", str(store)]
    assert main([*common, "--out", str(real)]) == 0
    assert main([*common, "--out", str(blind), "--shuffle-images", "0"]) == 0
    real_answers, blind_answers = json.loads(real.read_text()), json.loads(blind.read_text())
    assert [a["question_id"] for a in blind_answers] == [a["question_id"] for a in real_answers]
    # the control is exactly the model asked each question about another image: a derangement of the images
    questions = json.loads(world.vqa_questions("val").read_text())

    @dataclasses.dataclass(frozen=True)
    class Asked:
        question_id: int
        image_id: int

    moved = {q.question_id: q.image_id for q in shuffled_images(
        [Asked(q["question_id"], q["image_id"]) for q in questions["questions"]], 0)}
    assert all(moved[q["question_id"]] != q["image_id"] for q in questions["questions"])
    images = sorted({q["image_id"] for q in questions["questions"]})
    assert sorted(set(moved.values())) == images
    swapped = tmp_path / "swapped_questions.json"
    swapped.write_text(json.dumps({**questions, "questions": [{**q, "image_id": moved[q["question_id"]]}
                                                              for q in questions["questions"]]}))
    asked = tmp_path / "asked.json"
    assert main(["predict", "vqa", "--run", str(run), "--questions", str(swapped), "--features", str(store),
                 "--out", str(asked)]) == 0
    assert json.loads(asked.read_text()) == blind_answers


def test_vqa_one_image_end_to_end(world, vqa_run, tmp_path, capsys):
    """``vl vqa`` with an (untrained) tiny detector run whose region features have the model's width."""

    from region_features.detector import DetectorConfig, RegionDetector
    from region_features.pipeline import DetectorLabels, save_weights

    run, _ = vqa_run
    detector_dir = tmp_path / "detector"
    detector_dir.mkdir()
    config = {"detector": {"backbone": "resnet18", "out_indices": [2, 3, 4], "fpn_channels": 16,
                           "anchor_sizes": [16, 32, 64, 128], "aspect_ratios": [1.0], "min_size": 112,
                           "max_size": 112, "representation_size": 16, "num_classes": 3, "num_attributes": 0,
                           "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20}}
    (detector_dir / "config.yaml").write_text(yaml.safe_dump(config))
    DetectorLabels([{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]).write(detector_dir / "labels.json")
    torch.manual_seed(0)
    save_weights(RegionDetector(DetectorConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in config["detector"].items()})),
                 detector_dir / "model.safetensors")
    image = next(world.images_dir("test").iterdir())
    capsys.readouterr()
    assert main(["vqa", "--run", str(run), "--detector", str(detector_dir), "--image", str(image),
                 "--question", "What color is the circle?", "--top", "3", "--num-boxes", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    vocabulary = set(json.loads((run / "answers.json").read_text())["answers"])
    assert len(lines) == 3
    scores = []
    for line in lines:
        answer, score = line.rsplit(None, 1)
        assert answer.strip() in vocabulary
        scores.append(float(score))
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)

    bad_image = tmp_path / "broken.jpg"
    bad_image.write_bytes(b"not a jpeg")
    assert main(["vqa", "--run", str(run), "--detector", str(detector_dir), "--image", str(bad_image),
                 "--question", "what?"]) == 2
    assert "--image" in capsys.readouterr().err
    assert main(["vqa", "--run", str(tmp_path), "--detector", str(detector_dir), "--image", str(image),
                 "--question", "what?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vl vqa: error: --run") and len(err.strip().splitlines()) == 1


def test_cli_errors_name_the_input(world, vqa_run, tmp_path, capsys):
    run, store = vqa_run
    cases = [
        (["finetune", "vqa", "--init", "scratch", "--train-questions", str(world.vqa_questions("train")),
          "--train-annotations", str(world.vqa_annotations("train")), "--features", str(tmp_path / "nowhere"),
          "--out", str(tmp_path / "out")], "--features"),
        (["finetune", "vqa", "--init", str(tmp_path), "--config", str(CONFIGS / "finetune-vqa-tiny.yaml"),
          "--train-questions", str(world.vqa_questions("train")),
          "--train-annotations", str(world.vqa_annotations("val")), "--features", str(store),
          "--out", str(tmp_path / "out")], "question_id"),
        (["predict", "vqa", "--run", str(tmp_path), "--questions", str(world.vqa_questions("val")),
          "--features", str(store), "--out", str(tmp_path / "r.json")], "--run"),
        (["evaluate", "vqa", "--annotations", str(world.vqa_annotations("val")),
          "--results", str(tmp_path / "missing.json")], "missing.json"),
    ]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps([{"question_id": read_vqa_questions(world.vqa_questions("val"))[0].question_id,
                                    "answer": "yes"}]))
    cases.append((["evaluate", "vqa", "--annotations", str(world.vqa_annotations("val")), "--results",
                   str(partial)], "do not answer"))
    for argv, expected in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error:" in err and expected in err, (argv, err)
    assert not (tmp_path / "r.json").exists()


def _finetune_from(world, init, store, out, *extra):
    return main(["finetune", "vqa", "--init", str(init), "--config", str(CONFIGS / "finetune-vqa-tiny.yaml"),
                 "--train-questions", str(world.vqa_questions("train")),
                 "--train-annotations", str(world.vqa_annotations("train")),
                 "--features", str(store), "--out", str(out), "--set", "train.steps=3", "--set",
                 "train.batch_size=16", *extra])


def test_frozen_mode_leaves_the_fusion_model_bit_identical(world, vqa_run, tmp_path):
    from vl.checkpoints.io import load_state_file

    run, store = vqa_run
    assert _finetune_from(world, run, store, tmp_path / "frozen", "--mode", "frozen") == 0
    before = load_state_file(run / "model.safetensors")
    after = load_state_file(tmp_path / "frozen" / "model.safetensors")
    fusion = [key for key in before if key.startswith("fusion.")]
    assert fusion and all(torch.equal(before[key], after[key]) for key in fusion)
    assert any(key.startswith("heads.answer.") for key in after)
    assert yaml_mode(tmp_path / "frozen") == "frozen"


def test_adapters_mode_trains_only_adapters_norms_and_heads(world, vqa_run, tmp_path):
    from vl.checkpoints.io import load_state_file

    run, store = vqa_run
    out = tmp_path / "adapters"
    assert _finetune_from(world, run, store, out, "--mode", "adapters", "--set", "finetune.adapter_size=8") == 0
    before, after = load_state_file(run / "model.safetensors"), load_state_file(out / "model.safetensors")
    adapters = [key for key in after if ".adapter." in key]
    assert adapters and any(key.endswith("up.weight") and after[key].abs().sum() > 0 for key in adapters)  # trained
    fixed = [key for key in before if key.startswith("fusion.") and ".norm." not in key and "norm.weight" not in key
             and not key.endswith(("norm.bias",))]
    assert fixed and all(torch.equal(before[key], after[key]) for key in fixed)
    # the run loads back with its adapters and answers questions
    results = tmp_path / "results.json"
    assert main(["predict", "vqa", "--run", str(out), "--questions", str(world.vqa_questions("val")),
                 "--features", str(store), "--out", str(results)]) == 0
    assert json.loads(results.read_text())


@pytest.mark.parametrize("config", ["uniter-tiny.yaml", "lxmert-tiny.yaml"])
def test_scalar_mix_mode_reads_every_layer_and_trains_only_the_mix_and_heads(world, tmp_path, config):
    from vl.checkpoints.io import load_state_file

    store = write_world_features(world, tmp_path / "store")
    base = tmp_path / "base"
    assert main(["finetune", "vqa", "--init", "scratch", "--config", str(CONFIGS / "finetune-vqa-tiny.yaml"),
                 "--train-questions", str(world.vqa_questions("train")),
                 "--train-annotations", str(world.vqa_annotations("train")), "--features", str(store),
                 "--out", str(base), "--set", "train.steps=2", "--set", "train.batch_size=16",
                 "--set", f"model={CONFIGS / config}", "--set", "model.region.feature_dim=16"]) == 0
    out = tmp_path / "mix"
    assert _finetune_from(world, base, store, out, "--mode", "scalar-mix") == 0
    before, after = load_state_file(base / "model.safetensors"), load_state_file(out / "model.safetensors")
    assert all(torch.equal(before[key], after[key]) for key in before if key.startswith("fusion."))
    cfg = load_fusion_config(CONFIGS / config)
    layers = cfg.text.num_layers + 1 + (cfg.cross.num_layers if cfg.fusion == "dual_stream" else 0)
    assert after["scalar_mix.weights"].shape == (layers,) and not torch.equal(after["scalar_mix.weights"],
                                                                             torch.zeros(layers))
    results = tmp_path / "results.json"  # the run loads back with its mix
    assert main(["predict", "vqa", "--run", str(out), "--questions", str(world.vqa_questions("val")),
                 "--features", str(store), "--out", str(results)]) == 0
    assert yaml_mode(out) == "scalar-mix"


def test_scalar_mix_is_refused_for_vilbert_in_one_line(world, tmp_path, capsys):
    store = write_world_features(world, tmp_path / "store")
    code = main(["finetune", "vqa", "--init", "scratch", "--config", str(CONFIGS / "finetune-vqa-tiny.yaml"),
                 "--train-questions", str(world.vqa_questions("train")),
                 "--train-annotations", str(world.vqa_annotations("train")), "--features", str(store),
                 "--out", str(tmp_path / "v"), "--set", "train.steps=2", "--mode", "scalar-mix",
                 "--set", f"model={CONFIGS / 'vilbert-tiny.yaml'}", "--set", "model.region.feature_dim=16"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the tokenizer's progress note
    assert code == 2 and "error:" in last and "ViLBERT" in last and "use frozen or adapters" in last


def yaml_mode(run) -> str:

    return yaml.safe_load((run / "config.yaml").read_text())["finetune"]["mode"]
