"""The Gradio demo served for real on 127.0.0.1: `gradio_client` calls and a headless-Chromium session.

The browser test drives Debian's chromium (`/usr/bin/chromium`) with Python playwright (no browser download); it
skips only when that executable is missing. With DIFFACCEL_SCREENSHOT=path it also writes its screenshot there
(how the README's `docs/app.png` is made).
"""

import os
import shutil
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from diffaccel.app import RunRequest, build_app
from diffaccel.app.ui import INPUT_FIELDS
from served import gradio_client, predict, serve

CHROMIUM = Path("/usr/bin/chromium")
# what the page opens with (the browser test runs these defaults); client calls pass every field explicitly
PAGE_DEFAULTS = RunRequest(model="digits-sd", prompt="a handwritten digit seven", num_images=4, baseline_steps=25,
                           steps=10, sampler="DPM-Solver++")
SMALL = dict(model="digits-sd", prompt="a handwritten digit three", seed=5, num_images=2, baseline_steps=6,
             guidance_scale=7.5, sampler="DPM-Solver++", steps=3, time_shift=False, cache="none",
             ep_schedule="sd50-scaled", ep_parallel=True, cache_plan=None, fora_interval=2, steering="none",
             particles=2, potential="max", one_step=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    with serve(lambda: build_app(PAGE_DEFAULTS, workdir=tmp / "runs"), tmp) as (demo, url):
        yield demo, url, tmp


@pytest.fixture(scope="module")
def client(served):
    return gradio_client(served[1], served[2])


def _predict(client, **change):
    return predict(client, {**SMALL, **change})


def test_app_builds(tmp_path):
    demo = build_app(workdir=tmp_path)
    assert isinstance(demo, gr.Blocks)
    assert "run" in [fn.api_name for fn in demo.fns.values()]
    assert set(INPUT_FIELDS) <= {f for f in RunRequest.__dataclass_fields__}


def test_client_run_returns_both_galleries_and_metrics(served, client):
    _, _, tmp = served
    message, baseline, accelerated, speedup, metrics, archive, details = _predict(client)
    assert message.startswith("Done"), message
    assert len(baseline) == len(accelerated) == 2
    assert [item["caption"] for item in baseline] == ["seed 5", "seed 6"]
    for item in baseline + accelerated:
        assert Path(item["image"]).is_file()
    assert "Speed-up:" in speedup and "×" in speedup
    assert [row[0] for row in metrics["data"]] == ["baseline", "accelerated"]
    assert metrics["headers"][2] == "s/image"
    assert details["request"]["seed"] == 5 and details["speedup"] > 0
    with zipfile.ZipFile(archive) as zf:
        assert {"baseline/seed-5.png", "accelerated/seed-6.png", "metrics.json"} <= set(zf.namelist())
    assert any(p.name == Path(archive).name for p in (tmp / "gradio").rglob("*.zip"))  # served from GRADIO_TEMP_DIR


def test_invalid_input_gives_message_and_app_keeps_serving(client):
    message, baseline, accelerated, speedup, metrics, archive, details = _predict(client, steps=0, num_images=40)
    assert message.startswith("**Cannot run:**")
    assert "steps = 0 is out of range" in message and "num_images = 40 is out of range" in message
    assert "Traceback" not in message
    assert baseline == [] and accelerated == [] and archive is None
    message, *_ = _predict(client, prompt="")
    assert "prompt is empty" in message
    message, *_ = _predict(client, model="digits-dit", prompt="7", cache="encoder propagation")
    assert "caches a UNet encoder" in message  # the protocol's refusal, naming the method
    message, baseline, accelerated, *_ = _predict(client, seed=9)
    assert message.startswith("Done") and len(accelerated) == 2


def test_folder_that_is_not_a_pipeline(client, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    message, baseline, *_ = _predict(client, model=str(tmp_path))
    assert "is not a diffusers pipeline folder" in message and "model_index.json" in message
    assert baseline == []
    message, *_ = _predict(client, model="someone/some-pipeline")
    assert "runs offline" in message


@pytest.mark.slow
def test_browser_run_end_to_end(served, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's chromium: apt-get install -y chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("Chromium is installed but Python playwright is not: install the dev extra")
    _, url, _ = served
    shot = tmp_path / "app.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox",
                                                                        "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url, wait_until="domcontentloaded")
            seed = page.locator("#seed input")
            seed.wait_for(timeout=60_000)
            seed.fill("3")
            seed.press("Tab")
            page.locator("#run-button").click()
            expect(page.locator("#speedup")).to_contain_text("Speed-up:", timeout=120_000)
            for gallery in ("#baseline-gallery", "#accelerated-gallery"):
                expect(page.locator(f"{gallery} img")).to_have_count(PAGE_DEFAULTS.num_images, timeout=30_000)
            expect(page.locator("#metrics")).to_contain_text("accelerated")
            expect(page.locator("#baseline-gallery")).to_contain_text("seed 3")  # the seed typed into the page
            text = page.locator("#speedup").inner_text()
            assert "same seeds 3–6" in text
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    target = os.environ.get("DIFFACCEL_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


def test_queue_serves_concurrent_users(client):
    """Two users submitting at once both get their own results (the queue runs one generation at a time)."""
    jobs = [client.submit(*[{**SMALL, "seed": s}[k] for k in INPUT_FIELDS], api_name="/run") for s in (11, 21)]
    results = [job.result(timeout=120) for job in jobs]
    for seed, (message, _baseline, accelerated, *_rest) in zip((11, 21), results, strict=True):
        assert message.startswith("Done"), message
        assert [item["caption"] for item in accelerated] == [f"seed {seed}", f"seed {seed + 1}"]
