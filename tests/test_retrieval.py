"""Retrieval: Recall@K against brute force, two-stage == full ITM when k = N, single-modality encodings that depend
on their own modality only, the training losses, RANKINGS.json, and the commands end to end on the world."""

from __future__ import annotations

import json

import pytest
import torch

from vl.cli import main
from vl.world.features import write_world_features
from vl.fusion import FUSION_REGISTRY
from vl.fusion import load_fusion_config
from vl.fusion.pretraining import build_pretraining_model
from vl.tasks.retrieval.config import PAIR_SCORES, RetrievalConfig
from vl.tasks.retrieval.data import load_split
from vl.tasks.retrieval.index import RetrievalIndex, all_pair_scores, evaluate_index
from vl.tasks.retrieval.metrics import recall_at_k, rerank
from vl.tasks.retrieval.model import RETRIEVAL_RUN, RetrievalModel, contrastive_loss
from vl.tasks.runs import load_task_run
from vl.tasks.vl_finetune import open_store, region_batch, text_batch

from support import ARCHITECTURES, CONFIGS, tiny_architectures





pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def brute_force_recall(scores: torch.Tensor, positives: list[list[int]], k: int) -> float:
    """Share of queries whose best positive has fewer than k candidates scoring strictly higher."""
    found = 0
    for query, correct in enumerate(positives):
        best = max(float(scores[query, c]) for c in correct)
        higher = sum(1 for value in scores[query].tolist() if value > best)
        found += higher < k
    return 100.0 * found / len(positives)


def test_recall_matches_brute_force_on_a_toy_score_matrix():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 12, generator=generator)  # 40 captions x 12 images, ties impossible
    caption_image = [i % 12 for i in range(40)]
    rankings = scores.argsort(dim=1, descending=True)
    recalls = recall_at_k(rankings, [[image] for image in caption_image], (1, 5, 10))
    for k in (1, 5, 10):
        assert recalls[f"R@{k}"] == pytest.approx(brute_force_recall(scores, [[i] for i in caption_image], k))
    # image -> text: an image is found when ANY of its captions is in the top K
    by_image = [[t for t in range(40) if caption_image[t] == image] for image in range(12)]
    recalls = recall_at_k(scores.t().argsort(dim=1, descending=True), by_image, (1, 5, 10))
    for k in (1, 5, 10):
        assert recalls[f"R@{k}"] == pytest.approx(brute_force_recall(scores.t(), by_image, k))


def test_recall_by_hand():
    rankings = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 1, 2]])
    recalls = recall_at_k(rankings, [[0], [0], [0, 2]], (1, 2, 3))
    assert recalls == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 100.0})


def test_rerank_with_k_equal_n_is_the_full_ranking():
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(9, 7, generator=generator)
    exact = torch.randn(9, 7, generator=generator)
    calls = []

    def score_pairs(queries, candidates):
        calls.append(len(queries))
        return exact[queries, candidates]

    rankings, scores = rerank(first, 7, score_pairs, keep=7, query_chunk=4)
    assert torch.equal(rankings, exact.argsort(dim=1, descending=True))
    torch.testing.assert_close(scores, exact.sort(dim=1, descending=True).values)
    assert sum(calls) == 9 * 7
    # k = 3: only 3 pairs per query are scored; the top 3 are re-ordered, the rest keep the first-stage order
    calls.clear()
    rankings, scores = rerank(first, 3, score_pairs, keep=5)
    assert sum(calls) == 9 * 3
    for query in range(9):
        top3 = first[query].topk(5).indices.tolist()
        assert set(rankings[query, :3].tolist()) == set(top3[:3])
        assert rankings[query, 3:].tolist() == top3[3:]
        assert torch.isinf(scores[query, 3:]).all()


def test_contrastive_loss():
    embeddings = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    low, accuracy = contrastive_loss(embeddings, embeddings, torch.tensor(100.0))
    assert low < 0.05 and accuracy == 1.0
    shuffled, _ = contrastive_loss(embeddings, embeddings.roll(1, 0), torch.tensor(100.0))
    assert shuffled > 1.0
    # two captions of one image: both count as positives
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    loss, accuracy = contrastive_loss(embeddings, embeddings, torch.tensor(1.0), ids)
    assert torch.isfinite(loss) and 0.0 <= accuracy <= 1.0


# ----------------------------------------------------------------------------------------------------------------
# The model


def test_every_registered_fusion_has_a_tiny_architecture():
    assert set(tiny_architectures().values()) == set(FUSION_REGISTRY)


def _inputs(feature_dim: int):
    generator = torch.Generator().manual_seed(0)
    captions = [[2, 7, 9, 11, 3], [2, 5, 3], [2, 8, 8, 3]]
    regions = []
    for count in (5, 2, 3):
        corner = torch.rand(count, 2, generator=generator) * 0.5
        regions.append((torch.randn(count, feature_dim, generator=generator).numpy(),
                        torch.cat([corner, corner + 0.3], dim=1).numpy()))
    return captions, regions


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_single_modality_encodings_depend_on_their_modality_only(name):
    cfg = load_fusion_config(CONFIGS / f"{name}-tiny.yaml")
    torch.manual_seed(0)
    model = RetrievalModel(build_pretraining_model(cfg).fusion, RetrievalConfig(embed_dim=16)).eval()
    captions, regions = _inputs(cfg.region.feature_dim)
    with torch.no_grad():
        texts = model.embed_texts(text_batch(captions, 0))  # padded to the longest caption
        alone = model.embed_texts(text_batch(captions[1:2], 0))
        torch.testing.assert_close(texts[1], alone[0], atol=1e-5, rtol=1e-4)
        with_regions = model.embed_texts({**text_batch(captions, 0), **region_batch(regions, cfg.region.feature_dim)})
        torch.testing.assert_close(texts, with_regions)  # the batch's regions are not looked at
        images = model.embed_images(region_batch(regions, cfg.region.feature_dim))
        image_alone = model.embed_images(region_batch(regions[1:2], cfg.region.feature_dim))
        torch.testing.assert_close(images[1], image_alone[0], atol=1e-5, rtol=1e-4)
    assert texts.shape == (3, 16) and images.shape == (3, 16)
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("source", ["itm", "contrastive", "sampled"])
@pytest.mark.parametrize("name", ["uniter", "lxmert"])
def test_training_losses_are_finite_and_reach_every_part(name, source):
    cfg = load_fusion_config(CONFIGS / f"{name}-tiny.yaml")
    torch.manual_seed(0)
    model = RetrievalModel(build_pretraining_model(cfg).fusion,
                           RetrievalConfig(embed_dim=16, hard_negatives=2, hard_negative_source=source))
    captions, regions = _inputs(cfg.region.feature_dim)
    batch = {**text_batch(captions, 0), **region_batch(regions, cfg.region.feature_dim),
             "image_ids": torch.tensor([0, 1, 2])}
    losses = model(batch)
    assert set(losses) >= {"itm", "contrastive", "itm_acc", "contrastive_acc", "temperature"}
    (losses["itm"] + losses["contrastive"]).backward()
    for part in (model.heads.itm.weight, model.contrastive.text_proj.weight, model.contrastive.region_proj.weight,
                 model.contrastive.log_scale):
        assert part.grad is not None and torch.isfinite(part.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------------------------
# On the generated world


@pytest.fixture(scope="module")
def retrieval_run(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    store = write_world_features(world, root / "store")
    run = root / "run"
    assert main(["finetune", "retrieval", "--init", "scratch", "--config",
                 str(CONFIGS / "finetune-retrieval-tiny.yaml"), "--karpathy", str(world.karpathy),
                 "--features", str(store), "--out", str(run), "--set", "train.steps=3",
                 "--set", "train.batch_size=8"]) == 0
    return run, store


def test_two_stage_with_k_equal_n_matches_full_itm(world, retrieval_run):
    run, store = retrieval_run
    model, config, tokenizer = load_task_run(run, RETRIEVAL_RUN)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.heads.itm.weight, std=1.0)  # spread the barely trained scores well beyond rounding
    split = load_split(world.karpathy, "test", open_store(store))
    index = RetrievalIndex(model, tokenizer, split, open_store(store), config.settings, batch_size=64,
                           progress=False)
    report, full = evaluate_index(index, k=len(split.texts), full=True, keep=10)
    _, two = evaluate_index(index, k=len(split.texts), full=False, keep=10)
    assert report["two_stage"]["text_to_image"] == report["full"]["text_to_image"]
    assert report["two_stage"]["image_to_text"] == report["full"]["image_to_text"]
    scores = all_pair_scores(index)  # (N_t, N_i)
    for direction, matrix in (("text_to_image", scores), ("image_to_text", scores.t())):
        ranked_two = matrix.gather(1, two[direction])
        ranked_full = matrix.gather(1, full[direction])
        torch.testing.assert_close(ranked_two, ranked_full, atol=1e-4, rtol=0)  # the same ranking, up to ties
        torch.testing.assert_close(ranked_full, matrix.topk(10, dim=1).values, atol=1e-4, rtol=0)
    # the serving path agrees with the evaluator
    served = index.search(split.texts[0], top=5, k=len(split.image_ids))
    torch.testing.assert_close(torch.tensor([item["score"] for item in served]), scores[0].topk(5).values,
                               atol=1e-4, rtol=0)


def test_pair_scores_add_the_first_stage_as_configured(world, retrieval_run):
    run, store = retrieval_run
    model, config, tokenizer = load_task_run(run, RETRIEVAL_RUN)
    split = load_split(world.karpathy, "test", open_store(store))
    texts, images = torch.arange(4), torch.tensor([0, 1, 0, 2])
    scores = {}
    for pair_score in PAIR_SCORES:
        index = RetrievalIndex(model, tokenizer, split, open_store(store), config.settings, batch_size=64,
                               progress=False, pair_score=pair_score)
        scores[pair_score] = index.score_pairs(texts, images)
    cosine = (index.text_emb[texts] * index.image_emb[images]).sum(dim=1)
    scale = float(model.contrastive.logit_scale.detach())
    assert scale > 2  # 1 / temperature: the contrastive logit weighs more than the bare cosine
    torch.testing.assert_close(scores["itm+similarity"], scores["itm"] + cosine)
    torch.testing.assert_close(scores["itm+contrastive"], scores["itm"] + cosine * scale)


def test_finetune_and_evaluate_end_to_end(world, retrieval_run, tmp_path, capsys):
    run, store = retrieval_run
    for name in ("config.yaml", "model.safetensors", "vocab.txt", "val_metrics.json"):
        assert (run / name).is_file(), name
    rankings_path, metrics_path = tmp_path / "RANKINGS.json", tmp_path / "metrics.json"
    capsys.readouterr()
    assert main(["evaluate", "retrieval", "--run", str(run), "--karpathy", str(world.karpathy), "--split", "test",
                 "--features", str(store), "--out", str(rankings_path), "--k", "5", "--full",
                 "--metrics", str(metrics_path)]) == 0
    printed = capsys.readouterr().out
    for method in ("first-stage", "two-stage", "full"):
        assert method in printed
    assert "text->image R@1 " in printed and "image->text R@1 " in printed and " R@10 " in printed
    rankings = json.loads(rankings_path.read_text())
    assert set(rankings) == {"text_to_image", "image_to_text"}
    split = load_split(world.karpathy, "test")
    assert [row["sentid"] for row in rankings["text_to_image"]] == list(split.sentids)
    assert [row["image_id"] for row in rankings["image_to_text"]] == list(split.image_ids)
    for row in rankings["text_to_image"]:
        assert set(row) == {"sentid", "ranked_image_ids"}
        assert len(row["ranked_image_ids"]) == 10 and len(set(row["ranked_image_ids"])) == 10
        assert set(row["ranked_image_ids"]) <= set(split.image_ids)
    for row in rankings["image_to_text"]:
        assert set(row) == {"image_id", "ranked_sentids"}
        assert len(row["ranked_sentids"]) == 10 and set(row["ranked_sentids"]) <= set(split.sentids)
    report = json.loads(metrics_path.read_text())
    assert report["rankings_from"] == "full" and report["k"] == 5
    for method in ("first_stage", "two_stage", "full"):
        assert set(report[method]["text_to_image"]) == {"R@1", "R@5", "R@10"}
        assert report[method]["seconds"] >= 0
    # RANKINGS.json's full ranking gives the full recall
    image_of = dict(zip(split.sentids, (split.image_ids[i] for i in split.text_image)))
    hits = sum(image_of[row["sentid"]] == row["ranked_image_ids"][0] for row in rankings["text_to_image"])
    assert 100.0 * hits / len(split.sentids) == pytest.approx(report["full"]["text_to_image"]["R@1"])


def test_cli_errors_name_the_input(world, retrieval_run, tmp_path, capsys):
    run, store = retrieval_run
    base = ["evaluate", "retrieval", "--karpathy", str(world.karpathy), "--features", str(store),
            "--out", str(tmp_path / "R.json")]
    empty_store = write_world_features(world, tmp_path / "val_only", splits=("val",))
    cases = [
        ([*base, "--run", str(tmp_path)], "--run"),
        ([*base, "--run", str(run), "--top", "5"], "--top"),
        ([*base, "--run", str(run), "--split", "nonsense"], "nonsense"),
        (["evaluate", "retrieval", "--karpathy", str(world.karpathy), "--features", str(empty_store),
          "--out", str(tmp_path / "R.json"), "--run", str(run)], "no features"),
        (["finetune", "retrieval", "--init", "scratch", "--karpathy", str(world.karpathy), "--features", str(store),
          "--out", str(tmp_path / "run")], "--init scratch needs a model"),
        (["finetune", "retrieval", "--init", "scratch", "--config", str(CONFIGS / "finetune-retrieval-tiny.yaml"),
          "--karpathy", str(tmp_path / "none.json"), "--features", str(store), "--out", str(tmp_path / "run")],
         "none.json"),
        (["finetune", "retrieval", "--init", "scratch", "--config", str(CONFIGS / "finetune-retrieval-tiny.yaml"),
          "--set", "retrieval.nope=1", "--karpathy", str(world.karpathy), "--features", str(store),
          "--out", str(tmp_path / "run")], "retrieval.nope"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error:" in err and expected in err, (argv, err)
    assert not (tmp_path / "R.json").exists()


@pytest.mark.parametrize("mode", ["frozen", "adapters"])
def test_modes_keep_the_fusion_model_fixed_and_the_run_evaluates(world, retrieval_run, tmp_path, mode):
    from vl.checkpoints.io import load_state_file

    run, store = retrieval_run
    out = tmp_path / mode
    assert main(["finetune", "retrieval", "--init", str(run), "--config", str(CONFIGS / "finetune-retrieval-tiny.yaml"),
                 "--karpathy", str(world.karpathy), "--features", str(store), "--out", str(out), "--mode", mode,
                 "--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "finetune.adapter_size=8"]) == 0
    before, after = load_state_file(run / "model.safetensors"), load_state_file(out / "model.safetensors")
    fixed = [key for key in before if key.startswith("fusion.")
             and (mode == "frozen" or not key.endswith(("norm.weight", "norm.bias")))]
    assert fixed and all(torch.equal(before[key], after[key]) for key in fixed)
    assert any(".adapter." in key for key in after) == (mode == "adapters")
    rankings = tmp_path / f"{mode}.json"
    assert main(["evaluate", "retrieval", "--run", str(out), "--karpathy", str(world.karpathy), "--split", "test",
                 "--features", str(store), "--out", str(rankings)]) == 0
