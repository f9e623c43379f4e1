"""scta-search serve: the JSON API over an in-memory gallery (FastAPI's test client, in this process), what it
refuses to serve, reloading when the index changes; and one subprocess smoke test of the installed command."""

import os
import subprocess
import sys
import time

import pytest

from helpers import save_search_model, write_photos
from scta_search import Gallery


fastapi = pytest.importorskip("fastapi", reason="scta-search serve needs: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from scta_search.server import create_app  # noqa: E402


@pytest.fixture()
def served(tmp_path):
    model, processor = save_search_model(tmp_path / "model")
    write_photos(tmp_path / "photos")
    (tmp_path / "photos" / "secret.txt").write_text("not an image, not indexed")
    Gallery.build(
        model, processor, tmp_path / "photos", tmp_path / "index", model_name_or_path=str(tmp_path / "model")
    ).close()
    gallery = Gallery.load(tmp_path / "index")
    return tmp_path, gallery, TestClient(create_app(gallery, with_app=False))


def test_the_json_api_answers_as_the_gallery_does(served):
    tmp_path, gallery, client = served
    response = client.get("/api/search", params={"q": "a blue square on a plain background", "k": 3})
    assert response.status_code == 200
    body = response.json()
    expected = gallery.search_text("a blue square on a plain background", k=3, word_report=True)
    assert [r["path"] for r in body["results"]] == [r.path for r in expected]
    assert [r["score"] for r in body["results"]] == pytest.approx([r.score for r in expected])
    assert body["results"][0]["words"] and {"words", "alignment", "matched"} == set(body["results"][0]["words"][0])
    first = body["results"][0]
    image = client.get(first["image_url"])
    assert image.status_code == 200 and image.content == open(first["path"], "rb").read()
    like = client.get("/api/like", params={"id": first["id"], "k": 2}).json()
    assert like["results"][0]["path"] == first["path"]
    uploaded = client.post("/api/like", params={"k": 2}, content=open(first["path"], "rb").read()).json()
    assert uploaded["results"][0]["path"] == first["path"]
    picture = client.get("/api/explain", params={"id": first["id"], "q": "a blue square"})
    assert picture.status_code == 200 and picture.content[:4] == b"\x89PNG"
    negative = client.get("/api/search", params={"q": "a blue square", "not": "a red square", "cutoff": 0.5}).json()
    assert all(r["score"] >= 0.5 * negative["results"][0]["score"] for r in negative["results"])


def test_only_indexed_images_are_served_and_bad_requests_say_why(served):
    tmp_path, gallery, client = served
    for url in (
        "/api/image/9999",
        "/api/image/-1",
        "/api/image/..%2Fsecret.txt",
        "/api/image/%2Fetc%2Fpasswd",
        "/api/like?id=9999",
    ):
        assert client.get(url).status_code in (404, 422), url
    assert client.get("/api/search", params={"q": "  "}).status_code == 400
    assert "non-empty" in client.get("/api/search", params={"q": "  "}).json()["detail"]
    assert client.get("/api/search", params={"q": "x", "k": 0}).status_code == 422
    assert client.post("/api/like", content=b"not an image").status_code == 400


def test_the_server_reloads_the_index_when_it_changes_on_disk(served):
    tmp_path, gallery, client = served
    assert client.get("/api/health").json()["images"] == 10
    write_photos(tmp_path / "photos", 2, start=50)
    Gallery.load(tmp_path / "index", writable=True).update(tmp_path / "photos")  # another process's indexing run
    assert client.get("/api/health").json()["images"] == 12
    names = {
        os.path.basename(r["path"])
        for r in client.get("/api/search", params={"q": "a red square", "k": 12}).json()["results"]
    }
    assert {"photo50.png", "photo51.png"} <= names


@pytest.mark.slow
def test_the_installed_command_starts_fast_and_serves(served):
    """One subprocess per command family: --help (no torch import), index + query, and serve over real HTTP."""
    tmp_path, _, _ = served
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    helped = subprocess.run([sys.executable, "-m", "scta_search", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "scta-search" in helped.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, scta_search.cli; assert 'torch' not in sys.modules"], env=env
    )
    assert probe.returncode == 0, "the command line imports torch before a subcommand needs it"
    assert time.perf_counter() - start < 60
    # re-indexing an unchanged folder, and a missing index, answer without importing torch
    index_args = ["index", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "photos")]
    for arguments, expected in (
        ([*index_args, "--index", str(tmp_path / "index")], 0),
        (["query", "--index", str(tmp_path / "nowhere"), "x"], 2),
    ):
        script = (
            "import sys\nfrom scta_search.cli import main\n"
            f"try:\n    main({arguments!r})\nexcept SystemExit as exit_:\n    assert exit_.code == {expected}, exit_.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')"
        )
        fast = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert fast.returncode == 0 and fast.stdout.strip().endswith("ok"), fast.stdout + fast.stderr[-2000:]
        if expected == 0:
            assert "0 new, 0 changed, 0 renamed or moved, 0 removed, 10 unchanged" in fast.stdout
    queried = subprocess.run(
        [sys.executable, "-m", "scta_search", "query", "--index", str(tmp_path / "index"), "a red square", "-k", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert queried.returncode == 0 and len(queried.stdout.splitlines()) == 4, queried.stderr[-2000:]
    import socket
    import urllib.request

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scta_search",
            "serve",
            "--index",
            str(tmp_path / "index"),
            "--port",
            str(port),
            "--no_app",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                    assert b'"images":10' in response.read()
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read()[-3000:]
                time.sleep(0.5)
        else:
            pytest.fail("the server did not answer within 120 s")
    finally:
        server.terminate()
        server.wait(timeout=30)
