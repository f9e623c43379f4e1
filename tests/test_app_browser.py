"""The web demo in a real browser: headless Debian Chromium driven by Playwright types a query, checks that the
gallery shows the image the API ranks first with its word report, selects it and gets the explanation picture and
the report; an empty query is a hint, not an error; and the server refuses every file but the indexed images.

Marked `browser`: the default test run leaves it out; `.ci/run` installs Chromium, Gradio and Playwright and runs
`python -m pytest -m browser`. Chromium's flags are those this machine needs (no sandbox as root, no background
networking on a closed network)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from helpers import save_search_model, write_photos
from scta_search import Gallery


pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def served_app(tmp_path):
    pytest.importorskip("gradio", reason="the web demo needs gradio: pip install -e '.[app]'")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Debian Chromium: apt-get install chromium chromium-driver")
    model, processor = save_search_model(tmp_path / "model")
    write_photos(tmp_path / "photos")
    gallery = Gallery.build(
        model, processor, tmp_path / "photos", tmp_path / "index", model_name_or_path=str(tmp_path / "model")
    )
    gallery.close()
    gallery = Gallery.load(tmp_path / "index")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "app.py", "--index", str(tmp_path / "index"), "--port", str(port), "-k", "5"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
    server.terminate()
    server.wait(timeout=30)


def test_a_query_in_the_browser_shows_the_expected_image_its_word_report_and_explanation(served_app):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    url, gallery, tmp_path = served_app
    query = "a blue square on a plain background"
    top = gallery.search_text(query, k=5, word_report=True)[0]
    expected = os.path.basename(top.path)
    with sync_api.sync_playwright() as playwright:  # Playwright gives Chromium a new empty profile itself
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(url)
        page.locator("#query textarea").fill("   ")
        page.locator("#search").click()
        page.get_by_text("Type what you are looking for").wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "empty-query.png"), full_page=True)
        assert page.get_by_text("Error", exact=True).count() == 0  # a hint, no red "Error" badges
        page.locator("#query textarea").fill(query)
        page.locator("#search").click()
        captions = page.locator("#results .caption-label, #results figcaption, #results [class*='caption']")
        captions.first.wait_for(timeout=60_000)
        texts = captions.all_inner_texts()
        assert texts and texts[0].startswith(f"#1 {expected}"), texts
        assert top.word_summary() in texts[0], (texts[0], top.word_summary())
        page.locator("#results img").first.click()
        page.locator("#explanation img").first.wait_for(timeout=60_000)
        report = page.locator("#words").inner_text()
        assert "Why #1 matched" in report and "Matched:" in report and "Weak:" in report
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
    shutil.copy(tmp_path / "app.png", os.environ.get("SCTA_APP_SCREENSHOT", tmp_path / "app-copy.png"))


def test_the_server_serves_no_file_but_the_indexed_images(served_app):
    url, gallery, tmp_path = served_app
    (tmp_path / "photos" / "private.txt").write_text("private")
    refused = [
        "/etc/passwd",
        str(tmp_path / "photos" / "private.txt"),
        gallery.paths[0],  # even an indexed photo is not served by path: only /api/image/ID
        str(tmp_path / "model" / "config.json"),
    ]
    for path in refused:
        for route in ("gradio_api/file=", "file="):
            try:
                status = urllib.request.urlopen(f"{url}{route}{path}", timeout=10).status
            except urllib.error.HTTPError as error:
                status = error.code
            assert status in (403, 404), (route, path, status)
    ids = json.loads(urllib.request.urlopen(f"{url}api/search?q=a+red+square&k=1", timeout=60).read())["results"]
    assert urllib.request.urlopen(f"{url}api/image/{ids[0]['id']}", timeout=10).status == 200
