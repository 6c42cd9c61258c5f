"""The Gradio demo, driven in headless Chromium: generate a video, then an error that leaves the server serving."""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Chromium as root in a sandbox with no network beyond loopback.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_browser():
    missing = [what for what, ok in (("Debian's chromium at " + CHROMIUM, shutil.which(CHROMIUM)),
                                     ("playwright", importlib.util.find_spec("playwright"))) if not ok]
    if missing:
        reason = f"browser test needs {' and '.join(missing)} (.ci/run installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    port = free_port()
    log = (tmp_path_factory.mktemp("app") / "server.log").open("w")
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while not answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the demo did not start; see {log.name}")
        time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(server)
        yield page
        browser.close()


def test_generate_shows_video_and_time(page, tmp_path):
    page.locator("#prompt textarea").fill("a red circle moves to the right on black")
    steps = page.locator("#steps input[type=number]")
    steps.fill("3")
    steps.press("Enter")
    page.locator("#generate").click()
    page.locator("#video video").wait_for()
    page.wait_for_function("document.querySelector('#status textarea').value.startsWith('Generated in')")
    assert "3 steps" in page.locator("#status textarea").input_value()
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_empty_prompt_shows_error_and_server_goes_on(page, server):
    page.locator("#prompt textarea").fill("")
    page.locator("#generate").click()
    page.get_by_text("Please type a prompt").first.wait_for()
    assert answers(server)
    # ...and the next request is served as usual.
    page.locator("#prompt textarea").fill("a blue square moves up on white")
    steps = page.locator("#steps input[type=number]")
    steps.fill("1")
    steps.press("Enter")
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#status textarea').value.includes('1 steps')")
