"""`scta-search serve`: the model and the index kept in memory behind an HTTP JSON API, with the web demo (Gradio,
`scta_search.app`) on the same in-process gallery.

Built on FastAPI + uvicorn rather than Gradio's own API: the search API is plain JSON over GET/POST that any client
(curl, a photo manager, a script) calls without a Gradio client, FastAPI documents it at /docs, and Gradio mounts
into the same application, so the demo and the API share one model in memory.

    GET  /api/search?q=TEXT&k=10&not=TEXT&cutoff=0.8&exclude=PATTERN&rerank_top_k=16
    GET  /api/like?id=ID&k=10                      images like an indexed one
    POST /api/like?k=10   (body: image bytes)      images like an uploaded one
    GET  /api/image/ID                             an indexed image file (only those: no path is ever taken)
    GET  /api/explain?id=ID&q=TEXT                 the PNG of why image ID matched TEXT
    GET  /api/health                               images, index generation

Binds 127.0.0.1 by default. Serves no file but the indexed images, by their row id. Re-reads the index when it
changes on disk (another `scta-search index` run), checked before every request.
"""

import io
import logging
import os
import shutil
import tempfile
import threading
import time

from . import DEFAULT_RERANK_TOP_K


logger = logging.getLogger(__name__)


class LiveGallery:
    """A gallery shared by the API and the app: one lock around the model, rows re-read when the index changes."""

    def __init__(self, gallery):
        self.gallery = gallery
        self.lock = threading.Lock()

    def __enter__(self):
        self.lock.acquire()
        try:
            if self.gallery.refresh():
                logger.info("The index changed on disk: %d images now", len(self.gallery))
        except BaseException:
            self.lock.release()
            raise
        return self.gallery

    def __exit__(self, *exc):
        self.lock.release()

    def ids(self) -> dict[int, str]:
        return self.gallery.path_of_id  # rebuilt by the gallery only when the rows change

    def id_of(self) -> dict[str, int]:
        return self.gallery.id_of_path


def create_app(gallery, with_app: bool = True, k: int = 12):
    """The FastAPI application over `gallery` (a `Gallery`), with the Gradio demo mounted at / unless `with_app` is
    False."""
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, Response

    live = LiveGallery(gallery)
    api = FastAPI(title="scta-search", description=__doc__)

    def result_rows(results, ids: dict[str, int]) -> list[dict]:
        return [{"id": ids[r.path], **r.as_dict(), "image_url": f"/api/image/{ids[r.path]}"} for r in results]

    def user_error(error: ValueError):
        return HTTPException(status_code=400, detail=str(error))

    @api.get("/api/health")
    def health() -> dict:
        with live as g:
            return {"images": len(g), "generation": g._generation, "model": g.manifest.get("model")}

    @api.get("/api/search")
    def search(
        q: str = Query(..., description="the text query"),
        k: int = Query(10, ge=1, le=1000),
        rerank_top_k: int = Query(DEFAULT_RERANK_TOP_K, ge=0),
        negative: str | None = Query(None, alias="not"),
        cutoff: float | None = Query(None, gt=0, le=1),
        exclude: list[str] = Query([]),
        words: bool = True,
    ) -> dict:
        start = time.perf_counter()
        try:
            with live as g:
                results = g.search_text(
                    q,
                    k=k,
                    rerank_top_k=rerank_top_k,
                    negative=negative,
                    cutoff=cutoff,
                    exclude=exclude,
                    word_report=words,
                )
                rows = result_rows(results, live.id_of())
        except ValueError as error:
            raise user_error(error) from error
        return {"query": q, "results": rows, "seconds": round(time.perf_counter() - start, 4)}

    @api.get("/api/like")
    def like_indexed(id: int, k: int = Query(10, ge=1, le=1000)) -> dict:
        with live as g:
            path = live.ids().get(id)
            if path is None:
                raise HTTPException(status_code=404, detail=f"no indexed image has id {id}")
            try:
                results = g.search_like(path, k=k)
            except ValueError as error:
                raise user_error(error) from error
            return {"like": id, "results": result_rows(results, live.id_of())}

    @api.post("/api/like")
    async def like_uploaded(request: Request, k: int = Query(10, ge=1, le=1000)) -> dict:
        from processing_scta import convert_to_rgb, decode_image

        body = await request.body()
        if not body:
            raise HTTPException(status_code=400, detail="send the image's bytes as the request body")
        try:
            image = convert_to_rgb(decode_image(body))
            with live as g:
                results = g.search_like(image, k=k)
                rows = result_rows(results, live.id_of())
        except ValueError as error:
            raise user_error(error) from error
        return {"results": rows}

    @api.get("/api/image/{image_id}")
    def image(image_id: int):
        with live:
            path = live.ids().get(image_id)
        if path is None or not os.path.isfile(path):
            raise HTTPException(status_code=404, detail=f"no indexed image has id {image_id}")
        return FileResponse(path)

    @api.get("/api/explain")
    def explain_png(id: int, q: str):
        from .explain import draw_explanation, explain

        if not q.strip():
            raise HTTPException(status_code=400, detail="q must be a non-empty text")
        with live as g:
            path = live.ids().get(id)
            if path is None:
                raise HTTPException(status_code=404, detail=f"no indexed image has id {id}")
            try:
                picture = explain(g.model, g.processor, path, q)
            except ValueError as error:
                raise user_error(error) from error
        buffer = io.BytesIO()
        draw_explanation(picture, q, buffer)
        return Response(buffer.getvalue(), media_type="image/png")

    if with_app:
        import gradio as gr

        from .app import build_app

        api = gr.mount_gradio_app(api, build_app(live, k), path="/")
    return api


def private_gradio_cache() -> str:
    """A private (0700) folder for what Gradio writes (the app's thumbnails and explanation pictures), removed at
    exit: nothing of a user's photos is left world-readable in a shared temp folder."""
    folder = tempfile.mkdtemp(prefix="scta-serve-")  # mkdtemp makes it 0700
    os.environ["GRADIO_TEMP_DIR"] = folder
    return folder


def serve(
    index_dir,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name_or_path: str | None = None,
    with_app: bool = True,
    k: int = 12,
) -> None:
    import uvicorn

    from .gallery import Gallery

    gallery = Gallery.load(index_dir, model_name_or_path=model_name_or_path)
    cache = private_gradio_cache() if with_app else None
    try:
        app = create_app(gallery, with_app=with_app, k=k)
        logger.warning("Serving %d images on http://%s:%d (API at /api, docs at /docs)", len(gallery), host, port)
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
