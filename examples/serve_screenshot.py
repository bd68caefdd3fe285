"""Make ``docs/serve.png``, the README's screenshot of the retrieval demo (``vl serve``).

Generates a small world (128 px images), writes its synthetic region features, fine-tunes retrieval briefly (or uses
``--run``), starts ``vl serve`` on a free port, and drives Debian's Chromium with Playwright: a caption query, then a
click on the best image to show its captions; the page is saved as a PNG.

    .venv/bin/python examples/serve_screenshot.py [--out docs/serve.png] [--steps 300] [--query "..."]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vl.world.dataset import WorldConfig, generate_world
from vl.world.features import write_world_features
from vl.tasks.retrieval.commands import finetune_retrieval
from vl.config import load_config
from vl.tasks.retrieval.config import RetrievalFinetuneConfig


ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start_server(run: Path, world, store: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "vl", "serve", "--run", str(run), "--karpathy", str(world.karpathy), "--split", "test",
         "--features", str(store), "--images", str(world.root / "images"), "--port", "0", "--quiet"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = process.stdout.readline()
    if not line.startswith("serving on "):
        process.kill()
        raise SystemExit(f"vl serve did not start: {line!r}")
    return process, line.split()[2].rstrip("/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    parser.add_argument("--run", help="an existing retrieval run (with --world and --features)")
    parser.add_argument("--steps", type=int, default=300, help="retrieval fine-tuning steps")
    parser.add_argument("--query", default="a large red circle and a small blue square")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    import torch
    from playwright.sync_api import expect, sync_playwright

    torch.set_num_threads(1)  # tiny models run fastest on one thread

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = generate_world(root / "world", WorldConfig(seed=11, train=240, val=24, test=48, size=128,
                                                           shard_size=60), progress=False)
        store = write_world_features(world, root / "features")
        run = Path(args.run) if args.run else root / "run"
        if not args.run:
            cfg = load_config(RetrievalFinetuneConfig, ROOT / "configs" / "finetune-retrieval-tiny.yaml",
                                                 [f"train.steps={args.steps}", "retrieval.val_split="])
            finetune_retrieval(cfg, "scratch", world.karpathy, store, run)
        process, url = start_server(run, world, store)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1180, "height": 760})
                page.goto(url + "/")
                expect(page.locator("#info")).to_contain_text("images", timeout=20_000)
                page.fill("#query", args.query)
                page.click("#search-button")
                expect(page.locator("#results .result").first).to_be_visible(timeout=20_000)
                page.locator("#results .result").first.click()
                expect(page.locator("#captions li").first).to_be_visible(timeout=20_000)
                time.sleep(0.5)  # let the images paint
                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                partial = out.with_name(f".{out.name}.tmp.png")
                page.screenshot(path=str(partial), full_page=True)
                os.replace(partial, out)
                browser.close()
        finally:
            process.terminate()
            process.wait(timeout=10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
