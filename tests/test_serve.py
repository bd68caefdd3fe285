"""``vl serve`` in a real headless Chromium (Debian's ``chromium`` package) driven by Playwright: a caption finds
images, a click on an image shows its captions, bad queries get a clear message; plus the JSON API's refusals.

``make test`` installs chromium when it is missing; the test is skipped only when no chromium binary exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vl.cli import main
from vl.world.features import write_world_features

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def chromium_path() -> str | None:
    for candidate in (os.environ.get("VL_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    """A tiny retrieval run on the world, served by ``vl serve --port 0`` in a subprocess; yields its base URL."""
    root = tmp_path_factory.mktemp("serve")
    store = write_world_features(world, root / "store")
    run = root / "run"
    assert main(["finetune", "retrieval", "--init", "scratch", "--config",
                 str(ROOT / "configs" / "finetune-retrieval-tiny.yaml"), "--karpathy", str(world.karpathy),
                 "--features", str(store), "--out", str(run), "--set", "train.steps=3", "--set",
                 "train.batch_size=8", "--set", "retrieval.val_split="]) == 0
    log_path = root / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "vl", "serve", "--run", str(run), "--karpathy", str(world.karpathy), "--split",
             "test", "--features", str(store), "--images", str(world.root / "images"), "--port", "0", "--quiet"],
            stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        for _ in range(1200):  # up to 120 s for the start-up (model load and embeddings)
            if lines or process.poll() is not None:
                break
            threading.Event().wait(0.1)
        if not lines:
            process.kill()
            pytest.fail(f"vl serve did not start: {log_path.read_text()[-2000:]}")
        first = lines[0]
        assert first.startswith("serving on http://127.0.0.1:"), first
        yield first.split()[2].rstrip("/")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def fetch(url: str, data: bytes | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
            return response.status, dict(response.headers), body.decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode("utf-8", "replace")


def test_page_in_chromium(server, world, tmp_path):
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium binary (install Debian's chromium: apt-get install chromium; make test does)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            page.goto(server + "/")
            expect(page.locator("#info")).to_contain_text("16 images, 80 captions", timeout=20_000)

            page.fill("#query", "a large red circle and a small blue square")
            page.click("#search-button")
            results = page.locator("#results .result")
            expect(results).to_have_count(12, timeout=20_000)
            expect(page.locator("#message")).to_contain_text("12 images for")
            expect(page.locator("#message")).not_to_have_class("error")
            first = results.first
            image_id = first.get_attribute("data-image-id")
            expect(first.locator("img")).to_have_attribute("src", f"/images/{image_id}")
            # the image loads after its src is set: wait for it rather than look at once
            page.wait_for_function("(img) => img.complete && img.naturalWidth > 0",
                                   arg=first.locator("img").element_handle(), timeout=20_000)

            first.click()
            captions = page.locator("#captions li")
            expect(captions).to_have_count(8, timeout=20_000)
            expect(page.locator("#captions-title")).to_have_text(f"Captions for image {image_id}")
            assert captions.first.locator(".text").inner_text().strip()
            screenshot = tmp_path / "serve.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000

            for query, message in (("   ", "Type a caption"), ("x" * 10_000, "too long: 10,000 characters"),
                                   ("un café noir", "plain ASCII text")):
                page.fill("#query", query)
                page.click("#search-button")
                expect(page.locator("#message")).to_contain_text(message, timeout=20_000)
                expect(page.locator("#message")).to_have_class("error")
                expect(results).to_have_count(0)
            page.fill("#query", "three green triangles")
            page.click("#search-button")
            expect(results).to_have_count(12, timeout=20_000)
        finally:
            browser.close()


def test_api_refuses_bad_requests_clearly(server, world):
    status, headers, body = fetch(server + "/api/search", json.dumps({"q": "a red circle", "top": 5}).encode())
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    answer = json.loads(body)
    assert len(answer["results"]) == 5 and answer["ms"] >= 0
    assert all(item["url"] == f"/images/{item['image_id']}" for item in answer["results"])
    scores = [item["score"] for item in answer["results"]]
    assert scores == sorted(scores, reverse=True)

    image_id = answer["results"][0]["image_id"]
    status, headers, _ = fetch(f"{server}/images/{image_id}")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    status, _, body = fetch(f"{server}/api/captions?image_id={image_id}&top=3")
    assert status == 200 and len(json.loads(body)["captions"]) == 3

    bad = [
        ("/api/search?q=", 400, "Type a caption"),
        ("/api/search?q=" + "a" * 10_000, 400, "too long"),
        ("/api/search?q=caf%C3%A9", 400, "ASCII"),
        ("/api/search?q=%FF%FE", 400, "ASCII"),
        ("/api/search?q=red&top=many", 400, "'top'"),
        ("/api/search?q=red&top=0", 400, "'top'"),
        ("/api/captions?image_id=999999999", 404, "No image"),
        ("/api/captions", 400, "image_id"),
        ("/images/..%2F..%2Fworld.json", 404, "No image"),
        ("/images/../world.json", 404, "No"),
        ("/nowhere", 404, "No page"),
    ]
    for path, expected_status, message in bad:
        status, _, body = fetch(server + path)
        assert status == expected_status, (path, status, body[:200])
        assert message in json.loads(body)["error"], (path, body[:200])
    status, _, body = fetch(server + "/api/search", b"not json")
    assert status == 400 and "JSON" in json.loads(body)["error"]
    status, _, body = fetch(server + "/api/search", json.dumps({"q": "x" * 100_000}).encode())
    assert status == 413 and "too long" in json.loads(body)["error"]
