"""The training loop: learning, exact resume, checkpoints, schedules, accumulation, bf16; ``vl pretrain-text``."""

import dataclasses
import json
import shutil

import pytest
import torch
from torch import nn

from vl.checkpoints.io import load_state_file
from vl.checkpoints.vl_run import load_vl_run
from vl.cli import main
from vl.encoders.text import TextEncoderConfig
from vl.text.bert import BertPretrainingModel
from vl.text.corpus import read_documents, tokenize_documents
from vl.text.objectives import TextPretrainingModel
from vl.text.pretrain import TextDataConfig, TextPretrainConfig, build_text_stream
from vl.text.tokenizer import Tokenizer
from vl.train.checkpoint import list_checkpoints
from vl.train.loop import TrainConfig, seed_everything, train
from vl.train.optim import build_optimizer, clipped_step, decay_parameter_groups
from vl.train.schedule import lr_multiplier

TINY = TextEncoderConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                         max_position=64)


class Regression(nn.Module):
    """A learnable toy: y = x·w through a small MLP with dropout."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def forward(self, batch):
        error = self.net(batch["x"]).squeeze(-1) - batch["y"]
        return {"mse": (error ** 2).mean(), "mae": error.abs().mean().detach()}


class ToyData:
    """Endless random batches from its own generator, with a resumable state."""

    def __init__(self, batch_size=16, seed=0):
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.weights = torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __iter__(self):
        while True:
            x = torch.randn(self.batch_size, 4, generator=self.generator)
            yield {"x": x, "y": x @ self.weights}

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_run_directory_is_complete(tmp_path):
    cfg = TrainConfig(steps=80, lr=1e-2, warmup_steps=5, log_every=10, save_every=40, keep_last=1, seed=0)
    seed_everything(0)
    result = train(Regression(), ToyData(), cfg, tmp_path / "run", loss_weights={"mse": 1.0})
    rows = metrics(tmp_path / "run")
    assert rows[-1]["mse"] < 0.2 * rows[0]["mse"]
    assert result.step == 80 and result.last["step"] == 80
    assert {"lr", "loss", "mse", "mae", "grad_norm", "samples_per_s"} <= set(rows[0])
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [80]  # keep_last=1
    state = torch.load(tmp_path / "run/checkpoints/step-80/train_state.pt", weights_only=True)
    assert state["step"] == 80 and "optimizer" in state and "rng" in state and state["data"] is not None
    assert (tmp_path / "run/model.safetensors").is_file() and (tmp_path / "run/loss.png").is_file()


def _text_setup(world, tmp_path):
    tokenizer = Tokenizer.train([world.corpus_split("train")], 300)
    documents = tokenize_documents(read_documents([world.corpus_split("train")]), tokenizer, progress=False)
    model_cfg = dataclasses.replace(TINY, vocab_size=tokenizer.vocab_size)
    cfg = TextPretrainConfig(model=model_cfg, objectives={"mlm": 1.0, "sop": 1.0}, data=TextDataConfig(max_len=32),
                             train=TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, log_every=1,
                                               save_every=3, keep_last=3, seed=3))
    return tokenizer, documents, cfg


def _run_text(cfg, tokenizer, documents, run):
    seed_everything(cfg.train.seed)
    model = TextPretrainingModel(cfg.model, cfg.objectives)
    stream = build_text_stream(cfg, documents, tokenizer)
    return train(model, stream, cfg.train, run, loss_weights=dict(cfg.objectives), run_config=cfg, plot=False)


def test_exact_resume_gives_bit_identical_losses_and_weights(world, tmp_path):
    tokenizer, documents, cfg = _text_setup(world, tmp_path)
    straight = tmp_path / "straight"
    _run_text(cfg, tokenizer, documents, straight)
    # an interrupted run: the first 3 steps, as if it stopped right after the step-3 checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints/step-6")
    (resumed / "model.safetensors").unlink()
    rows = [line for line in (resumed / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4]
    (resumed / "metrics.jsonl").write_text("\n".join(rows) + "\n")  # step 4 was logged before the stop
    result = _run_text(cfg, tokenizer, documents, resumed)
    assert result.start_step == 3
    assert [row["loss"] for row in metrics(straight)] == [row["loss"] for row in metrics(resumed)]
    a, b = load_state_file(straight / "model.safetensors"), load_state_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    class Fixed:
        def __init__(self, batch_size):
            generator = torch.Generator().manual_seed(0)
            self.x = torch.randn(8, 4, generator=generator)
            self.batch_size = batch_size

        def __iter__(self):
            for start in range(0, 8, self.batch_size):
                x = self.x[start:start + self.batch_size]
                yield {"x": x, "y": x.sum(dim=1)}

    def run(batch_size, accumulation, name):
        seed_everything(0)
        model = Regression().eval()
        model.net[2].p = 0.0
        cfg = TrainConfig(steps=1, batch_size=batch_size, grad_accum_steps=accumulation, lr=1e-2, clip_grad_norm=0)
        train(model, Fixed(batch_size), cfg, tmp_path / name, loss_weights={"mse": 1.0}, plot=False)
        return model.state_dict()

    big, accumulated = run(8, 1, "big"), run(4, 2, "accumulated")
    assert all(torch.allclose(big[key], accumulated[key], atol=1e-6) for key in big)


class DtypeRecorder(Regression):
    """The toy regression, recording the dtype its first layer computes in."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.dtype] = []
        self.net[0].register_forward_hook(lambda module, args, out: self.seen.append(out.dtype))


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_reaches_the_forward_pass_on_cpu(tmp_path, precision, dtype):
    seed_everything(0)
    cfg = TrainConfig(steps=3, precision=precision, log_every=1)
    model = DtypeRecorder()
    result = train(model, ToyData(), cfg, tmp_path / precision, loss_weights={"mse": 1.0}, plot=False)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    assert model.seen and set(model.seen) == {dtype}  # bf16: the matmuls ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights stay fp32


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_run_continued_to_more_steps_follows_the_new_schedule(tmp_path, optimizer):
    """10 cosine steps, then the same run continued to 20: after the resume the rate is the 20-step schedule's, not
    the 10-step one's (which has decayed to 0)."""
    cfg = TrainConfig(steps=10, lr=1e-2, warmup_steps=2, schedule="cosine", optimizer=optimizer, log_every=1,
                      precision="fp32", save_every=0)
    train(Regression(), ToyData(), cfg, tmp_path / "run", loss_weights={"mse": 1.0})
    train(Regression(), ToyData(), dataclasses.replace(cfg, steps=20), tmp_path / "run", loss_weights={"mse": 1.0})
    rows = metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == list(range(1, 21))
    assert [row["lr"] for row in rows[10:]] == pytest.approx([1e-2 * lr_multiplier(step, 20, 2, "cosine")
                                                              for step in range(10, 20)])


def test_schedules_and_weight_decay_groups():
    assert lr_multiplier(0, 100, 10) == pytest.approx(1 / 11)
    assert lr_multiplier(10, 100, 10) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(80, 100, 0, "constant") == 1.0
    model = BertPretrainingModel(TINY)
    decay, no_decay = decay_parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in decay["params"]) and decay["weight_decay"] == 0.01
    no_decay_names = [names[id(p)] for p in no_decay["params"]]
    assert "text_encoder.embeddings.norm.weight" in no_decay_names and no_decay["weight_decay"] == 0.0
    assert all(name.endswith("bias") or ".norm." in name for name in no_decay_names)


def test_pretrain_text_command_writes_a_loadable_run(world, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64, max_position: 64}\n"
        "objectives: {electra: 1.0}\n"
        "data: {max_len: 32, vocab_size: 300}\n"
        "train: {steps: 3, batch_size: 4, log_every: 1, save_every: 2}\n")
    run = tmp_path / "run"
    assert main(["pretrain-text", "--config", str(config), "--text", str(world.corpus_split("train")),
                 "--out", str(run)]) == 0
    assert "disc_acc" in metrics(run)[-1]
    model = load_vl_run(run)  # the exported discriminator loads as a BertPretrainingModel
    assert isinstance(model, BertPretrainingModel)
    assert any(key.startswith("generator.") for key in load_state_file(run / "checkpoints/step-3/model.safetensors"))
    # continued pretraining (DAPT/TAPT) from that run, with MLM + SOP
    dapt = tmp_path / "dapt"
    assert main(["pretrain-text", "--config", "configs/text-bert-tiny.yaml", "--text", str(world.corpus_split("val")),
                 "--out", str(dapt), "--init", str(run), "--set", "train.steps=2", "--set", "data.max_len=32",
                 "--set", "train.batch_size=4"]) == 0
    assert (dapt / "vocab.txt").read_text() == (run / "vocab.txt").read_text()
    # the --init weights are what it starts from: with a vanishing learning rate they come out unchanged
    frozen = tmp_path / "dapt_lr0"
    assert main(["pretrain-text", "--config", "configs/text-bert-tiny.yaml", "--text", str(world.corpus_split("val")),
                 "--out", str(frozen), "--init", str(run), "--set", "train.steps=2", "--set", "data.max_len=32",
                 "--set", "train.batch_size=4", "--set", "train.lr=1e-30", "--set", "train.warmup_steps=0"]) == 0
    start, end = load_state_file(run / "model.safetensors"), load_state_file(frozen / "model.safetensors")
    encoder = [key for key in start if key.startswith("text_encoder.encoder.")]
    assert encoder and all(torch.allclose(start[key], end[key], rtol=0, atol=1e-20) for key in encoder)
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["--text", "missing.txt"], "--text file not found: missing.txt"),
    (["--set", "objectives={mlm: 1, clm: 1}"], "need different inputs"),
    (["--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
])
def test_pretrain_text_errors_name_the_input(world, tmp_path, capsys, argv, message):
    base = {"--config": "configs/text-bert-tiny.yaml", "--text": str(world.corpus_split("train")),
            "--out": str(tmp_path / "run")}
    args = dict(base)
    extra = []
    if argv[0] == "--text":
        args["--text"] = argv[1]
    else:
        extra = argv
    flat = [item for pair in args.items() for item in pair]
    assert main(["pretrain-text", *flat, *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("max_norm", [0.05, 100.0])  # clipped, and below the limit
def test_clipping_inside_the_fused_kernel_equals_clip_then_step(max_norm):
    torch.manual_seed(0)
    models = [Regression(), Regression()]
    models[1].load_state_dict(models[0].state_dict())
    batch = {"x": torch.randn(64, 4), "y": torch.randn(64)}
    optimizers = [build_optimizer(model, TrainConfig(lr=1e-2)) for model in models]
    assert optimizers[0].defaults["fused"]
    for _ in range(3):
        norms = []
        for model, optimizer, in_kernel in zip(models, optimizers, (True, False)):
            model.eval()  # no dropout: the same gradients
            model(batch)["mse"].backward()
            norms.append(clipped_step(optimizer, list(model.parameters()), max_norm, in_kernel=in_kernel))
            optimizer.zero_grad(set_to_none=True)
        torch.testing.assert_close(norms[0], norms[1])
        assert not hasattr(optimizers[0], "grad_scale")
    if max_norm < 1:
        assert norms[0] > max_norm  # the clipping was active
    for ours, reference in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
