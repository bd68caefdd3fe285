"""``vl demo``: the whole pipeline on a generated world, through the real commands, with a report.

Stages (each one a real ``vl`` / ``vl-regions`` command in a subprocess, logged to ``OUT/logs/STAGE.log``):

1. ``vl generate-world`` — the data (train / val / test splits), and ``vl tokenizer train`` — one WordPiece
   vocabulary from the train split's text corpus (captions, descriptions, questions), shared by every model as a
   general-domain vocabulary would be;
2. ``vl-regions train`` — the detector on the train split's COCO instances;
3. ``vl-regions detect`` — COCO results on the held-out test split (its mAP goes in the report);
4. ``vl-regions extract`` — region features for every split into one feature store;
5. ``vl pretrain`` — a single-stream (UNITER) and a dual-stream (LXMERT) model on the train split's shards;
6. ``vl finetune vqa`` — from each pretrained model and, with the same budget, from scratch in each architecture;
   ``vl predict vqa`` + ``vl evaluate vqa`` on the test split, and the image-blind control (``--shuffle-images``:
   each question answered on another image's regions), which shows how much of each score comes from the image;
7. ``vl finetune retrieval`` + ``vl evaluate retrieval`` on the test split;
8. ``vl vqa`` — a few questions on held-out test images, end to end from the image file.

Every figure comes from the test split, which no stage trains on. A stage that finished is recorded in
``OUT/demo_state.json`` and skipped when the demo is run again with the same settings, so an interrupted demo
continues where it stopped.

Stages 1-4 have the machine to themselves. From stage 5 on, ``DemoConfig.parallel`` stages whose inputs are ready run
at a time, each on ``cores // parallel`` threads: these models are small enough that one process uses two cores
poorly (LXMERT-small fine-tunes only 1.3x faster on two threads than on one), so two at a time finish sooner.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vl.config import atomic_write_text
from vl.demo.config import CONFIG_DIR, DemoConfig, fraction_stage
from vl.errors import UserError
from vl.progress import PROGRESS_ENV, latest_progress

@dataclass
class Stage:
    name: str
    title: str
    commands: Callable[[], list[list[str]]]
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads
    alone: bool = False  # runs with the whole machine: nothing else runs beside it


def _vl(*args: str) -> list[str]:
    return [sys.executable, "-m", "vl", *args]


def _regions(*args: str) -> list[str]:
    return [sys.executable, "-m", "vl.cli.regions", *args]


class Demo:
    def __init__(self, out: str | os.PathLike, cfg: DemoConfig, progress_seconds: float = 20.0):
        self.out = Path(out)
        self.cfg = cfg
        self.progress_seconds = progress_seconds  # how often the console shows the running stages' progress
        self.world = self.out / "world"
        self.detector = self.out / "detector"
        self.features = self.out / "features"
        self.tokenizer = self.out / "tokenizer"
        self.logs = self.out / "logs"
        self.state_path = self.out / "demo_state.json"
        self.timings: dict[str, float] = {}
        self._stop_reporting = threading.Event()

    # paths ----------------------------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def world_file(self, *parts: str) -> str:
        return str(self.world.joinpath(*parts))

    def questions(self, split: str) -> str:
        return self.world_file("vqa", f"v2_OpenEnded_mscoco_{split}2014_questions.json")

    def annotations(self, split: str) -> str:
        return self.world_file("vqa", f"v2_mscoco_{split}2014_annotations.json")

    def feature_sets(self) -> list[str]:
        """Overrides that fit the models' region inputs to the extracted store (feature width, detector classes)."""
        from region_features.store import FeatureStore

        meta = FeatureStore(self.features).meta
        return [f"model.region.feature_dim={meta['feature_dim']}", f"heads.region_outputs.feat={meta['feature_dim']}",
                f"heads.region_outputs.obj={meta['num_classes']}"]

    def sets(self, stage: str, *pairs: str) -> list[str]:
        args: list[str] = []
        for pair in (*pairs, *self.cfg.extra_sets.get(stage, ())):
            args += ["--set", pair]
        return args

    # stages ---------------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        cfg = self.cfg
        pretrained = {"vqa-single": str(self.run_dir("pretrain-single")),
                      "vqa-dual": str(self.run_dir("pretrain-dual"))}
        # the other VQA runs start from scratch: each pretrained model's architecture with the same VQA recipe
        scratch_models = {"vqa-scratch": self._model_file(cfg.single_stream_config),
                          "vqa-scratch-dual": self._model_file(cfg.dual_stream_config)}

        def world() -> list[list[str]]:
            return [_vl("generate-world", "--out", str(self.world), "--seed", str(cfg.seed), "--train",
                        str(cfg.train_images), "--val", str(cfg.val_images), "--test", str(cfg.test_images),
                        "--size", str(cfg.size), "--questions-per-image", str(cfg.questions_per_image), "--force"),
                    _vl("tokenizer", "train", "--text", self.world_file("text", "corpus_train.txt"), "--vocab-size",
                        str(cfg.vocab_size), "--out", str(self.tokenizer))]

        def detector() -> list[list[str]]:
            return [_regions("train", "--instances", self.world_file("annotations", "instances_train2014.json"),
                             "--images", self.world_file("images", "train2014"),
                             "--val-instances", self.world_file("annotations", "instances_val2014.json"),
                             "--val-images", self.world_file("images", "val2014"), "--out", str(self.detector),
                             "--config", str(CONFIG_DIR / cfg.detector_config),
                             *self.sets("detector", f"train.steps={cfg.detector_steps}"))]

        def detect() -> list[list[str]]:
            return [_regions("detect", "--detector", str(self.detector), "--images",
                             self.world_file("images", "test2014"), "--out", str(self.out / "detections_test.json")),
                    _regions("evaluate", "--detector", str(self.detector), "--instances",
                             self.world_file("annotations", "instances_test2014.json"), "--images",
                             self.world_file("images", "test2014"), "--out", str(self.out / "detector_test.json"))]

        def extract() -> list[list[str]]:
            return [_regions("extract", "--detector", str(self.detector), "--images", self.world_file("images"),
                             "--out", str(self.features), "--num-boxes", str(cfg.num_boxes))]

        def pretrain(name: str, config: str) -> Callable[[], list[list[str]]]:
            return lambda: [_vl("pretrain", "--config", str(CONFIG_DIR / config),
                                "--shards", self.world_file("shards", "train-*.tar"), "--features", str(self.features),
                                "--out", str(self.run_dir(name)), "--tokenizer", str(self.tokenizer),
                                *self.sets("pretrain", *([f"train.steps={cfg.pretrain_steps}"]
                                                         if cfg.pretrain_steps is not None else []),
                                           f"train.seed={cfg.seed}", *self.feature_sets()))]

        def vqa(name: str, fraction: float | None = None, steps: int = cfg.vqa_steps
                ) -> Callable[[], list[list[str]]]:
            """Fine-tune VQA model ``name`` (on ``fraction`` of the training questions) and answer the test split;
            the full-data runs also answer it on other images' regions (the image-blind control)."""
            stage = name if fraction is None else fraction_stage(name, fraction)
            run = str(self.run_dir(stage))
            results = str(self.out / f"{stage}_test_results.json")
            blind = str(self.out / f"{stage}_test_blind_results.json")
            subset = [] if fraction is None else [f"vqa.train_fraction={fraction}"]

            def commands() -> list[list[str]]:
                scratch = [f"model={scratch_models[name]}", *self.feature_sets()[:1]] if name in scratch_models else []
                listed = [
                    _vl("finetune", "vqa", "--init", pretrained.get(name, "scratch"),
                        "--train-questions", self.questions("train"), "--train-annotations", self.annotations("train"),
                        "--val-questions", self.questions("val"), "--val-annotations", self.annotations("val"),
                        "--features", str(self.features), "--out", run,
                        "--config", str(CONFIG_DIR / cfg.vqa_config),
                        *(["--tokenizer", str(self.tokenizer)] if name in scratch_models else []),
                        *self.sets("vqa", f"train.steps={steps}", f"train.seed={cfg.seed}", *subset, *scratch)),
                    _vl("predict", "vqa", "--run", run, "--questions", self.questions("test"), "--features",
                        str(self.features), "--out", results),
                    _vl("evaluate", "vqa", "--annotations", self.annotations("test"), "--results", results),
                ]
                if fraction is None:  # the image-blind control: the same questions on other images' regions
                    listed.append(_vl("predict", "vqa", "--run", run, "--questions", self.questions("test"),
                                      "--features", str(self.features), "--out", blind, "--shuffle-images",
                                      str(cfg.seed)))
                return listed

            return commands

        def retrieval() -> list[list[str]]:
            run = str(self.run_dir("retrieval"))
            return [
                _vl("finetune", "retrieval", "--init", str(self.run_dir("pretrain-single")), "--karpathy",
                    self.world_file("dataset_coco.json"), "--features", str(self.features), "--out", run,
                    "--config", str(CONFIG_DIR / cfg.retrieval_config),
                    *self.sets("retrieval", f"train.steps={cfg.retrieval_steps}", f"train.seed={cfg.seed}")),
                _vl("evaluate", "retrieval", "--run", run, "--karpathy", self.world_file("dataset_coco.json"),
                    "--split", "test", "--features", str(self.features), "--out",
                    str(self.out / "retrieval_rankings_test.json")),
            ]

        def examples() -> list[list[str]]:
            commands = []
            for example in self.example_questions():
                commands.append(_vl("vqa", "--run", str(self.run_dir("vqa-single")), "--detector", str(self.detector),
                                    "--image", example["image"], "--question", example["question"]))
            return commands

        def vqa_stages(name: str, title: str, needs: tuple[str, ...]) -> list[Stage]:
            """The full-data VQA stage of model ``name``, then one per data fraction."""
            return [Stage(name, title, vqa(name), needs)] + [
                Stage(fraction_stage(name, fraction), f"{title}, {fraction:.0%} of the questions",
                      vqa(name, fraction, steps), needs)
                for fraction, steps in zip(cfg.data_fractions, cfg.fraction_steps)]

        # In order of priority: with two at a time, the longest chain (dual-stream pretraining, then its VQA) starts
        # first, and the single-stream chain (pretraining, retrieval, VQA) runs beside it.
        return [
            Stage("world", "generate the world and a tokenizer", world, alone=True),
            Stage("detector", "train the detector", detector, ("world",), alone=True),
            Stage("detect", "detect on held-out images", detect, ("detector",), alone=True),
            Stage("extract", "extract region features", extract, ("detector",), alone=True),
            Stage("pretrain-dual", "pretrain dual-stream (LXMERT)", pretrain("pretrain-dual", cfg.dual_stream_config),
                  ("extract",)),
            Stage("pretrain-single", "pretrain single-stream (UNITER)", pretrain("pretrain-single",
                                                                                 cfg.single_stream_config),
                  ("extract",)),
            Stage("retrieval", "retrieval fine-tune and evaluate", retrieval, ("pretrain-single",)),
            *vqa_stages("vqa-dual", "VQA from pretrained dual-stream", ("pretrain-dual",)),
            *vqa_stages("vqa-single", "VQA from pretrained single-stream", ("pretrain-single",)),
            *vqa_stages("vqa-scratch-dual", "VQA from scratch (dual-stream)", ("extract",)),
            *vqa_stages("vqa-scratch", "VQA from scratch (single-stream)", ("extract",)),
            Stage("examples", "answer questions on held-out images", examples, ("vqa-single", "detector")),
        ]

    @staticmethod
    def _model_file(pretrain_config: str) -> str:
        """The model file a pretraining config names (``model: uniter-tiny.yaml``)."""
        from vl.config import read_yaml

        model = read_yaml(CONFIG_DIR / pretrain_config).get("model")
        if not isinstance(model, str):
            raise UserError(f"{pretrain_config}: the demo needs 'model:' to name a model file")
        return str(CONFIG_DIR / model)

    def example_questions(self) -> list[dict[str, Any]]:
        """The first few test questions, on distinct test images."""
        questions = json.loads(Path(self.questions("test")).read_text())["questions"]
        chosen, seen = [], set()
        for question in questions:
            if question["image_id"] in seen:
                continue
            seen.add(question["image_id"])
            image = self.world / "images" / "test2014" / f"COCO_test2014_{question['image_id']:012d}.jpg"
            chosen.append({"image_id": question["image_id"], "image": str(image), "question": question["question"],
                           "question_id": question["question_id"]})
            if len(chosen) == self.cfg.example_questions:
                break
        return chosen

    # running --------------------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {}
        state = json.loads(self.state_path.read_text())
        if state.get("config") != _jsonable(asdict(self.cfg)):
            return {}  # other settings: start over (every command's own outputs are replaced or resumed)
        return state

    def _save_state(self, done: dict[str, float]) -> None:
        atomic_write_text(self.state_path, json.dumps({"config": _jsonable(asdict(self.cfg)), "done": done}, indent=1))

    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        start = time.perf_counter()
        self.timings = self.run_stages(self.stages())
        from vl.demo.report import write_report

        report = write_report(self, total_seconds=time.perf_counter() - start)
        print(f"report: {report}")
        return report

    def run_stages(self, stages: list[Stage]) -> dict[str, float]:
        """Run every stage not done yet, ``cfg.parallel`` at a time where they may share the machine; returns each
        stage's wall seconds. A failed stage stops new ones from starting; the ones running finish and are recorded
        as done, then the failure is raised."""
        names = [stage.name for stage in stages]
        for stage in stages:
            unknown = [need for need in stage.needs if need not in names[:names.index(stage.name)]]
            if unknown:
                raise ValueError(f"demo stage {stage.name!r} needs {unknown}, which do not come before it")
        done: dict[str, float] = self._load_state().get("done", {})
        number = {stage.name: f"[{i}/{len(stages)}] {stage.title}" for i, stage in enumerate(stages, 1)}
        for stage in stages:
            if stage.name in done:
                print(f"{number[stage.name]}: done earlier ({done[stage.name]:.0f}s)", flush=True)
        pending = [stage for stage in stages if stage.name not in done]
        slots = self.slots()
        threads = str(self.threads_per_stage())
        finished: queue.Queue[tuple[Stage, float, Exception | None]] = queue.Queue()
        running: dict[str, tuple[Stage, threading.Thread]] = {}
        failures: list[Exception] = []

        def work(stage: Stage, env: dict[str, str]) -> None:
            began, error = time.perf_counter(), None
            try:
                self._run_commands(stage, env)
            except Exception as failure:  # reported by the scheduling loop, which waits for the other stages
                error = failure
            finished.put((stage, time.perf_counter() - began, error))

        def startable(stage: Stage) -> bool:
            return all(need in done for need in stage.needs)

        self._stop_reporting.clear()
        reporter = threading.Thread(target=self._report_progress, args=(running, number), daemon=True)
        reporter.start()
        try:
            while pending or running:
                while pending and not failures:
                    exclusive = any(item.alone for item, _ in running.values())
                    ready = next((stage for stage in pending if startable(stage)), None)
                    if ready is None or exclusive or len(running) >= slots or (ready.alone and running):
                        break
                    pending.remove(ready)
                    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5", PROGRESS_ENV: "1"}
                    if not ready.alone and slots > 1:
                        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
                    thread = threading.Thread(target=work, args=(ready, env), daemon=True)
                    running[ready.name] = (ready, thread)
                    print(f"{number[ready.name]} ...", flush=True)
                    thread.start()
                if not running:
                    break  # a failure stopped the queue (otherwise the first pending stage can always start)
                stage, seconds, error = finished.get()
                running.pop(stage.name)[1].join()
                if error is not None:
                    failures.append(error)
                    continue
                done[stage.name] = seconds
                self._save_state(done)
                print(f"{number[stage.name]}: done in {seconds:.0f}s", flush=True)
        except KeyboardInterrupt:
            for _, thread in running.values():  # the commands got the signal too: let them save and exit
                thread.join()
            raise
        finally:
            self._stop_reporting.set()
            reporter.join()
        if failures:
            raise failures[0]
        return {name: done[name] for name in names if name in done}

    def _report_progress(self, running: dict[str, tuple[Stage, threading.Thread]], number: dict[str, str]) -> None:
        """Every ``progress_seconds``, print the latest progress bar of each running stage (its log's last tqdm
        state: step N of M, elapsed and left, the loss) until ``_stop_reporting`` is set."""
        while not self._stop_reporting.wait(self.progress_seconds):
            try:
                names = list(running)
            except RuntimeError:  # a stage started or ended while the names were read: next time
                continue
            for name in names:
                state = latest_progress(_tail(self.logs / f"{name}.log"))
                if state:
                    print(f"    {number[name]}: {state}", flush=True)

    def slots(self) -> int:
        """How many stages run at a time after feature extraction (at most one per core)."""
        return max(1, min(self.cfg.parallel, os.cpu_count() or 1))

    def threads_per_stage(self) -> int:
        """Threads each of those stages gets: the cores shared between the stages running at a time."""
        return max(1, (os.cpu_count() or 1) // self.slots())

    def _run_commands(self, stage: Stage, env: dict[str, str]) -> None:
        log = self.logs / f"{stage.name}.log"
        with open(log, "w") as handle:
            for command in stage.commands():
                handle.write("$ " + shlex.join(command) + "\n")
                handle.flush()
                code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
                if code != 0:
                    tail = "\n".join(log.read_text().splitlines()[-15:])
                    print(tail, file=sys.stderr)
                    raise UserError(f"demo stage '{stage.name}' failed (exit {code}); see {log}")

    def machine(self) -> str:
        from vl.precision import bf16_native, cpu_name  # imports torch, which the orchestrator needs only here

        bf16 = "native bf16" if bf16_native("cpu") else "no native bf16"
        return f"{os.cpu_count()} CPU cores ({cpu_name()}, {bf16}), Python {platform.python_version()}"


def _tail(path: Path, size: int = 4096) -> str:
    """The last ``size`` bytes of a log file as text ("" when it does not exist yet)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))
