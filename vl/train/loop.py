"""One readable training loop on ``accelerate``: AdamW or SGD, warmup + decay, accumulation, clipping, bf16, resume.

The loop knows nothing about models or objectives. It takes

- a model whose forward (or a ``compute_losses(model, batch)`` callable) returns a dict of named scalars: the
  entries named in ``loss_weights`` are summed with those weights into the loss that is minimised, and every
  other entry (accuracies, rates) is only logged;
- an iterable of batches (dicts of tensors). When it runs out, the loop starts it again (a new epoch). When it
  has ``state_dict()`` / ``load_state_dict()``, its position is saved in checkpoints and restored on resume;
  otherwise a resumed run fast-forwards it by the number of batches already consumed.

Run directory::

    RUN/config.yaml                      the resolved run config (``run_config``)
    RUN/metrics.jsonl                    one JSON row per log step (and per evaluation)
    RUN/checkpoints/step-N/              model.safetensors + train_state.pt, the last ``keep_last`` kept
    RUN/model.safetensors                the final weights
    RUN/loss.png                         the curves of every logged metric

``train_state.pt`` holds the optimizer, scheduler, step, data position and the python/numpy/torch RNG states as
tensors and plain containers, so ``torch.load(path, weights_only=True)`` reads it. Under several processes it
also holds every rank's RNG states and data position (``ranks``), and a resumed run needs the same number of
processes. When ``RUN`` holds a checkpoint, ``train`` resumes from the latest one: N steps, then a resumed run to
2N, give bit-identical losses and weights to 2N steps in one go.

Stopping safely. SIGTERM or SIGINT (Ctrl-C) saves a checkpoint of the last completed step, then ``train`` raises
``KeyboardInterrupt`` (a second Ctrl-C stops at once). An error from the data (e.g. too many consecutive bad
samples) saves the last completed step, then raises. A step whose loss is not finite is skipped (no update; a
warning, and ``nonfinite_skipped`` in metrics.jsonl); ``max_nonfinite_steps`` of them in a row save a checkpoint
and stop with ``TrainingStopped``. Under several processes every rank takes these decisions together.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from vl.checkpoints.io import load_state_file, save_weights
from vl.config import save_config
from vl.errors import UserError
from vl.progress import progress_bar
from vl.train.checkpoint import (
    WEIGHTS_FILE,
    capture_snapshot,
    data_state,
    latest_checkpoint,
    load_model_weights,
    own_snapshot,
    read_train_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    truncate_metrics,
)
from vl.train.optim import build_optimizer, clipped_step
from vl.train.schedule import SCHEDULES, ScheduleName, build_scheduler, restore_rate
from vl.train.sharding import full_norm, full_state, gathered, load_full_state, shard_model

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # examples per micro-batch per process (read by the data pipeline)
    lr: float = 1e-4  # peak learning rate
    warmup_steps: int = 0  # linear warmup steps; the larger of this and warmup_ratio * steps is used
    warmup_ratio: float = 0.0  # warmup as a fraction of ``steps``
    schedule: ScheduleName = "linear"  # decay after warmup: linear, cosine or constant
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd (with momentum): the usual recipe of large detectors
    weight_decay: float = 0.01  # decay, not applied to biases, LayerNorm and other 1-d parameters
    momentum: float = 0.9  # SGD only
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-6
    clip_grad_norm: float = 1.0  # max global gradient norm; 0 disables clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    precision: Literal["auto", "fp32", "bf16", "fp16", "no"] = "auto"  # auto: bf16 where native (vl.precision)
    cpu: bool = False  # force the CPU even when a GPU is present
    log_every: int = 10  # steps between metrics.jsonl rows and progress-bar updates
    eval_every: int = 0  # steps between evaluations (0: only at the end, when an evaluate callback is given)
    save_every: int = 500  # steps between checkpoints (0: only the final one)
    keep_last: int = 2  # checkpoints kept; 0 keeps all
    seed: int = 0  # seeds python, numpy and torch at the start of a run
    max_nonfinite_steps: int = 5  # consecutive steps with a non-finite loss (each skipped) that stop the run; 0: never
    compile: bool = False  # torch.compile the model's forward (nn.Module.compile; state-dict names unchanged)
    fsdp: bool = False  # under several processes, shard parameters, gradients and optimizer state (vl.train.sharding)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_last", "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")

    @property
    def warmup(self) -> int:
        """Warmup in optimizer steps."""
        return max(self.warmup_steps, int(round(self.warmup_ratio * self.steps)))


@dataclass
class TrainResult:
    """What ``train`` did: the step it ended at, the step it started from, and the rows it logged."""

    step: int
    start_step: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, float]:
        rows = [row for row in self.history if "loss" in row]
        return rows[-1] if rows else {}


LossFn = Callable[[nn.Module, Mapping[str, Any]], Mapping[str, torch.Tensor]]


class TrainingStopped(UserError):
    """The run stopped itself (repeated non-finite losses) after saving a checkpoint."""


# --------------------------------------------------------------------------------------------------------------
# Optimizer


# --------------------------------------------------------------------------------------------------------------
# The loop


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim:
                return int(value.shape[0])
            if isinstance(value, list):  # e.g. a detector's images of different sizes
                return len(value)
    return 0


def weighted_total(outputs: Mapping[str, torch.Tensor], loss_weights: Mapping[str, float] | None,
                   sampled: bool = False) -> torch.Tensor:
    """Σ weight·loss over the entries named in ``loss_weights`` (all grad-carrying entries, weight 1, when None).

    sampled: a batch computes only some of the weighted losses (one task per batch); absent names are skipped.
    """
    if loss_weights is None:
        terms = [value for value in outputs.values() if isinstance(value, torch.Tensor) and value.requires_grad]
        if not terms:
            raise UserError(f"the model returned no loss that carries a gradient (returned: {', '.join(outputs)})")
        return torch.stack([term.float() for term in terms]).sum()
    total = None
    for name, weight in loss_weights.items():
        if name not in outputs and sampled:
            continue
        if name not in outputs:
            raise UserError(f"loss weight '{name}' names no loss the model returns (returned: {', '.join(outputs)})")
        term = outputs[name].float() * weight
        total = term if total is None else total + term
    if total is None:
        if sampled:
            raise UserError(f"the batch computed none of the weighted losses {', '.join(loss_weights)} "
                            f"(returned: {', '.join(outputs)})")
        raise UserError("loss_weights is empty: nothing to minimise")
    return total


class _BatchIterator:
    """Cycles over ``data``, starting a new pass when one ends."""

    def __init__(self, data: Iterable):
        self.data = data
        self.iterator: Iterator | None = None

    def __next__(self):
        if self.iterator is None:
            self.iterator = iter(self.data)
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.data)
            try:
                return next(self.iterator)
            except StopIteration:
                raise UserError("the training data yielded no batches") from None


def _default_loss_fn(model: nn.Module, batch: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    return model(batch)


def _format_postfix(row: Mapping[str, float]) -> dict[str, str]:
    skip = {"step", "lr", "elapsed_s", "grad_norm"}
    postfix = {key: f"{value:.4g}" for key, value in row.items() if key not in skip and key != "samples_per_s"}
    if "samples_per_s" in row:
        postfix["samples/s"] = f"{row['samples_per_s']:.1f}"
    return postfix


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks between micro-batches (main thread only).

    A second SIGINT raises KeyboardInterrupt at once. The previous handlers come back on ``restore()``.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _agree(accelerator: Any, flags: list[bool]) -> list[bool]:
    """Each flag true on any rank (one all-reduce under several processes)."""
    if accelerator.num_processes == 1:
        return flags
    tensor = torch.tensor([float(flag) for flag in flags], device=accelerator.device)
    tensor = accelerator.reduce(tensor, reduction="sum")
    return [bool(value > 0) for value in tensor.tolist()]


def make_accelerator(precision: str = "auto", cpu: bool = False, **kwargs: Any) -> Any:
    """An ``accelerate.Accelerator`` with these settings; ``precision`` is resolved by ``vl.precision`` for the
    device the run trains on (``auto``: bf16 only where it is native). ``kwargs`` go to ``Accelerator``.

    accelerate keeps one global state per process and refuses a second Accelerator with other settings; in a
    single, non-distributed process (tests, notebooks, a script that pretrains in bf16 then fine-tunes in fp32)
    that state is reset first. Under ``accelerate launch`` the launch settings stand.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    from vl.precision import accelerate_mixed_precision, resolve_precision

    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    mixed = accelerate_mixed_precision(resolve_precision(precision, device))
    if AcceleratorState._shared_state and PartialState._shared_state and PartialState().num_processes == 1:
        state = AcceleratorState()
        if state.mixed_precision != mixed or (cpu and state.device.type != "cpu"):
            AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed, cpu=cpu, **kwargs)


def _select(state: Mapping[str, torch.Tensor], keep: Callable[[str], bool] | None) -> dict[str, torch.Tensor]:
    return dict(state) if keep is None else {name: tensor for name, tensor in state.items() if keep(name)}


def train(
    model: nn.Module,
    data: Iterable[Mapping[str, Any]],
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    compute_losses: LossFn | None = None,
    loss_weights: Mapping[str, float] | None = None,
    run_config: Any | None = None,
    save_filter: Callable[[str], bool] | None = None,
    export_filter: Callable[[str], bool] | None = None,
    evaluate: Callable[[nn.Module, int], Mapping[str, float]] | None = None,
    accelerator: Any | None = None,
    desc: str = "train",
    plot: bool = True,
    sampled_losses: bool = False,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps, resuming from ``run_dir``'s latest checkpoint if any.

    model: its trainable parameters are those with ``requires_grad``; the caller freezes the rest.
    data: batches (dicts of tensors, moved to the device here). See the module docstring for epochs and resume.
    compute_losses: ``(model, batch) -> {name: scalar}``; default ``model(batch)``. Call the model through its
        forward (not sub-modules) so that DDP sees the computation.
    loss_weights: which outputs are losses, and their weights; None: every output carrying a gradient, weight 1.
    run_config: a dataclass written to ``RUN/config.yaml``.
    save_filter: state-dict keys to write in checkpoints and the final weights (e.g. only adapters and heads);
        None writes everything.
    export_filter: the state-dict keys written to ``RUN/model.safetensors`` at the end (e.g. without the parts only
        training needs); default: those of a checkpoint (``save_filter``).
    evaluate: ``(model, step) -> {name: value}`` run in eval mode under no_grad every ``cfg.eval_every`` steps
        and at the end; its values go to metrics.jsonl.
    accelerator: an ``accelerate.Accelerator``; by default one is built from ``cfg.precision`` and ``cfg.cpu``.
    sampled_losses: each batch computes only some of the ``loss_weights`` losses (one task per batch); the
        logged mean of each is over the steps that computed it.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or make_accelerator(cfg.precision, cfg.cpu)
    compute_losses = compute_losses or _default_loss_fn
    seed_everything(cfg.seed)
    if run_config is not None and accelerator.is_main_process:
        save_config(run_config, run_dir)

    from accelerate.utils import DistributedType

    sharded = accelerator.num_processes > 1 and (cfg.fsdp or accelerator.distributed_type == DistributedType.FSDP)
    if sharded:  # sharded here, not by accelerate's plugin (vl.train.sharding); before the optimizer sees the params
        shard_model(model, accelerator.device, accelerator.num_processes)
    optimizer = build_optimizer(model, cfg, fused=not sharded)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.warmup, cfg.schedule, cfg.min_lr_ratio)
    trainable = [param for group in optimizer.param_groups for param in group["params"]]
    if cfg.compile:
        model.compile()  # compiled on the first batch, and again when batch shapes change
    if sharded:
        prepared_model, optimizer = model, accelerator.prepare_optimizer(optimizer, device_placement=False)
    else:
        prepared_model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(prepared_model)
    # Clipping inside the fused AdamW kernel needs the gradients as they are: not under fp16 loss scaling (accelerate
    # unscales them in its clip_grad_norm_) nor sharded (FSDP, DeepSpeed).
    kernel_clipping = accelerator.scaler is None and not sharded and accelerator.distributed_type in (
        DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)

    metrics_path = run_dir / METRICS_FILE
    start_step = 0
    resume_from = latest_checkpoint(run_dir)
    data_restored = False
    if resume_from is not None:
        state = read_train_state(resume_from)
        if bool(state.get("sharded", False)) != sharded:
            raise UserError(f"checkpoint {resume_from} was saved with train.fsdp={str(not sharded).lower()}; resume "
                            "it the same way")
        if sharded:
            load_full_state(raw_model, optimizer, load_state_file(resume_from / WEIGHTS_FILE), state["optimizer"],
                            str(resume_from), save_filter)
        else:
            load_model_weights(raw_model, resume_from / WEIGHTS_FILE, save_filter)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rate(scheduler)
        start_step = int(state["step"])
        own = own_snapshot(state, accelerator, resume_from)
        if own.get("data") is not None and data_state(data) is not None:
            data.load_state_dict(own["data"])
            data_restored = True
        set_rng_state(own["rng"])
        if accelerator.is_main_process:
            truncate_metrics(metrics_path, start_step)
            tqdm.write(f"{desc}: resuming from {resume_from} (step {start_step})")

    batches = _BatchIterator(data)
    if start_step and not data_restored:
        for _ in range(start_step * cfg.grad_accum_steps):  # no saved data position: replay the consumed batches
            next(batches)

    history: list[dict[str, float]] = []
    progress = progress_bar(total=cfg.steps, initial=start_step, desc=desc,
                            show=None if accelerator.is_main_process else False)
    sums: dict[str, list[torch.Tensor]] = {}
    grad_norms: list[torch.Tensor] = []
    samples, window_start, run_start = 0, time.perf_counter(), time.perf_counter()
    eval_every = cfg.eval_every
    prepared_model.train()

    def log_row(step: int, lr: float) -> dict[str, float]:
        nonlocal samples, window_start
        means = {name: torch.stack(values).float().mean() for name, values in sums.items()}
        if accelerator.num_processes > 1:
            means = {name: accelerator.reduce(value, reduction="mean") for name, value in means.items()}
        now = time.perf_counter()
        row: dict[str, float] = {"step": step, "lr": lr}
        row.update({name: float(value.item()) for name, value in means.items()})
        if grad_norms:
            row["grad_norm"] = float(torch.stack(grad_norms).float().mean().item())
        row["samples_per_s"] = samples * accelerator.num_processes / max(now - window_start, 1e-9)
        row["elapsed_s"] = now - run_start
        sums.clear()
        grad_norms.clear()
        samples, window_start = 0, now
        return row

    def write_row(row: dict[str, float]) -> None:
        history.append(row)
        if accelerator.is_main_process:
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    def run_evaluation(step: int) -> None:
        prepared_model.eval()
        with torch.no_grad(), accelerator.autocast(), gathered(raw_model) if sharded else contextlib.nullcontext():
            values = evaluate(raw_model, step)
        prepared_model.train()
        write_row({"step": step, **{name: float(value) for name, value in values.items()}})
        progress.set_postfix(_format_postfix(values), refresh=False)

    def save(step: int, snapshot: Mapping[str, Any]) -> Path | None:
        """A checkpoint of ``step`` with ``snapshot`` (collective: every rank calls it)."""
        rank_snapshots = None
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rank_snapshots = gather_object([snapshot])
        model_state, optimizer_state = full_state(raw_model, optimizer) if sharded else (None, None)
        accelerator.wait_for_everyone()
        path = None
        if accelerator.is_main_process:
            if not sharded:
                model_state, optimizer_state = raw_model.state_dict(), optimizer.state_dict()
            path = save_checkpoint(run_dir, step, _select(model_state, save_filter), optimizer_state, scheduler, data,
                                   cfg.keep_last, snapshot=snapshot, rank_snapshots=rank_snapshots, sharded=sharded)
        accelerator.wait_for_everyone()
        return path

    def stop_with_checkpoint(step: int, snapshot: Mapping[str, Any], why: str) -> None:
        progress.close()
        if step > start_step or (step and latest_checkpoint(run_dir) is None):
            path = save(step, snapshot)
            where = f"saved {path}" if path is not None else f"saved step {step}"
        else:
            where = f"nothing new to save (step {step})"
        if accelerator.is_main_process:
            tqdm.write(f"{desc}: {why}; {where}")

    stop_request = StopRequest()
    nonfinite_in_a_row = 0
    nonfinite_skipped = 0
    try:
        for step in range(start_step, cfg.steps):
            boundary = capture_snapshot(data)  # the state a checkpoint of ``step`` holds
            skip_update = False
            for micro in range(cfg.grad_accum_steps):
                batch, data_error = None, None
                if stop_request.received is None:
                    try:
                        batch = next(batches)
                    except Exception as err:  # noqa: BLE001 - any data failure stops the run after saving
                        data_error = err
                failed, stopping = _agree(accelerator, [data_error is not None, stop_request.received is not None])
                if stopping:
                    stop_with_checkpoint(step, boundary, f"stopped by {stop_request.received or 'another rank'}; "
                                                         "rerun the same command to resume")
                    raise KeyboardInterrupt
                if failed:
                    stop_with_checkpoint(step, boundary, "the data failed")
                    if data_error is None:
                        raise UserError("another rank's data pipeline failed (see its error above)")
                    if isinstance(data_error, UserError):
                        raise data_error
                    first_line = (str(data_error) or type(data_error).__name__).splitlines()[0]
                    raise UserError(f"data pipeline failed: {first_line}") from data_error
                batch = _to_device(batch, accelerator.device)
                samples += _batch_size(batch)
                last_micro = micro == cfg.grad_accum_steps - 1
                if sharded:
                    prepared_model.set_requires_gradient_sync(last_micro)
                    sync = contextlib.nullcontext()
                else:
                    sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(prepared_model)
                with sync:
                    with accelerator.autocast():
                        outputs = compute_losses(prepared_model, batch)
                        total = weighted_total(outputs, loss_weights, sampled_losses)
                    (nonfinite,) = _agree(accelerator, [not bool(torch.isfinite(total.detach()))])
                    if nonfinite:
                        skip_update = True
                        if accelerator.num_processes > 1:  # DDP expects the backward of every forward
                            accelerator.backward(total.nan_to_num(0.0, 0.0, 0.0) * 0.0)
                        values = {name: float(value.detach().float()) for name, value in outputs.items()}
                        tqdm.write(f"{desc}: step {step + 1}: non-finite loss {values}; update skipped")
                        continue
                    accelerator.backward(total / cfg.grad_accum_steps)
                sums.setdefault("loss", []).append(total.detach())
                for name, value in outputs.items():
                    sums.setdefault(name, []).append(value.detach().float())
            step_lr = scheduler.get_last_lr()[0]
            if skip_update:  # like a step that fp16 loss scaling skips: no update, the schedule waits
                optimizer.zero_grad(set_to_none=True)
                nonfinite_in_a_row += 1
                nonfinite_skipped += 1
            else:
                nonfinite_in_a_row = 0
                if cfg.clip_grad_norm > 0 and kernel_clipping:
                    grad_norms.append(clipped_step(optimizer, trainable, cfg.clip_grad_norm).detach())
                else:
                    if cfg.clip_grad_norm > 0 and sharded:  # over every rank's shards
                        grad_norms.append(full_norm(torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad_norm)))
                    elif cfg.clip_grad_norm > 0:
                        grad_norms.append(torch.as_tensor(
                            accelerator.clip_grad_norm_(trainable, cfg.clip_grad_norm)).detach())
                    optimizer.step()
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            done = step + 1
            progress.update(1)

            if cfg.max_nonfinite_steps and nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                stop_with_checkpoint(done, capture_snapshot(data), "too many non-finite losses")
                raise TrainingStopped(f"the loss was non-finite in {nonfinite_in_a_row} consecutive steps (the last "
                                      f"at step {done}); lower train.lr, check the data, or raise "
                                      "train.max_nonfinite_steps")
            if done % cfg.log_every == 0 or done == cfg.steps:
                row = log_row(done, step_lr)
                if nonfinite_skipped:
                    row["nonfinite_skipped"] = nonfinite_skipped
                    nonfinite_skipped = 0
                write_row(row)
                progress.set_postfix(_format_postfix(row), refresh=False)
            if evaluate is not None and ((eval_every and done % eval_every == 0) or done == cfg.steps):
                run_evaluation(done)
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                save(done, capture_snapshot(data))
    finally:
        stop_request.restore()
    progress.close()

    final_state = full_state(raw_model)[0] if sharded else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = _select(final_state if sharded else raw_model.state_dict(), export_filter or save_filter)
        save_weights(final, run_dir / WEIGHTS_FILE)
        if plot and metrics_path.is_file():
            from vl.train.plot import plot_metrics

            plot_metrics(run_dir)
    return TrainResult(step=max(start_step, cfg.steps), start_step=start_step, history=history)
