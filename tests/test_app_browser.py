"""The Gradio app in a real browser: headless Debian Chromium driven by Playwright types a query, checks that the
gallery shows the image the API ranks first, selects it and gets the explanation picture.

Marked `browser`: the default test run leaves it out; `.ci/run` installs Chromium, Gradio and Playwright and runs
`python -m pytest -m browser`. Chromium's flags are those this machine needs (no sandbox as root, no background
networking on a closed network)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from test_search import save_model, write_photos

from search_scta import Gallery


pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def served_app(tmp_path):
    pytest.importorskip("gradio", reason="the web demo needs gradio: pip install -e '.[app]'")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Debian Chromium: apt-get install chromium chromium-driver")
    model, processor = save_model(tmp_path / "model")
    write_photos(tmp_path / "photos")
    gallery = Gallery.build(model, processor, tmp_path / "photos", tmp_path / "index", model_name_or_path=str(tmp_path / "model"))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "app.py", "--index", str(tmp_path / "index"), "--port", str(port), "-k", "5"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"the app exited: {server.stdout.read()[-3000:]}")
            time.sleep(1)
    else:
        server.kill()
        pytest.fail("the app did not start within 180 s")
    yield url, gallery, tmp_path
    server.kill()
    server.wait()


def test_a_query_in_the_browser_shows_the_expected_image_and_its_explanation(served_app):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    url, gallery, tmp_path = served_app
    query = "a blue square on a plain background"
    expected = os.path.basename(gallery.search_text(query, k=5)[0].path)
    with sync_api.sync_playwright() as playwright:  # Playwright gives Chromium a new empty profile itself
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(url)
        page.locator("#query textarea").fill(query)
        page.locator("#search").click()
        captions = page.locator("#results .caption-label, #results figcaption, #results [class*='caption']")
        captions.first.wait_for(timeout=60_000)
        texts = captions.all_inner_texts()
        assert texts and texts[0].startswith(f"#1 {expected}"), texts
        page.locator("#results img").first.click()
        page.locator("#explanation img").first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
    shutil.copy(tmp_path / "app.png", os.environ.get("SCTA_APP_SCREENSHOT", tmp_path / "app-copy.png"))
