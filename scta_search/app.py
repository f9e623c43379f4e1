"""The web demo (Gradio Blocks): a query box, the top results with their scores and word reports, and why a
selected result matched. It runs inside `scta-search serve`, on the server's in-process gallery.

It never hands Gradio a path of the user's photos: results are shown as thumbnails made in memory, which Gradio
keeps in the server's private cache folder (removed at exit), so Gradio needs no `allowed_paths` and serves no file
of the indexed folders or anything else.
"""

import html
import io

import PIL.Image


THUMBNAIL = 192
PLACEHOLDER = "Describe the image you are looking for"


def thumbnail(path: str) -> PIL.Image.Image:
    from .files import read_image_file

    file = read_image_file(path)
    if file.error is not None:
        return PIL.Image.new("RGB", (THUMBNAIL, THUMBNAIL), (230, 230, 230))
    image = file.image
    if max(image.size) < THUMBNAIL:  # small images (the synthetic set's 64 px) scaled up, pixels kept sharp
        scale = THUMBNAIL / max(image.size)
        return image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.NEAREST)
    image.thumbnail((THUMBNAIL, THUMBNAIL), PIL.Image.BICUBIC)
    return image


def word_report_markdown(result) -> str:
    matched = [w for w in result.words if w.matched]
    weak = [w for w in result.words if not w.matched]

    def fmt(words):
        return ", ".join(f"**{html.escape(w.words)}** ({w.alignment:.2f})" for w in words) or "none"

    return f"Matched: {fmt(matched)}  \nWeak: {fmt(weak)}"


def build_app(live, k: int = 12):
    """The Blocks app over a `server.LiveGallery`."""
    import gradio as gr

    from .explain import draw_explanation, explain
    from .files import display
    from .gallery import SearchResult, WordMatch

    def search(text: str):
        if not text or not text.strip():
            return gr.update(), [], "Type what you are looking for, then press Enter or Search.", None, ""
        with live as gallery:
            results = gallery.search_text(text, k=k, word_report=True)
            count = len(gallery)
        items = [
            (thumbnail(r.path), f"#{rank + 1} {display(r.path.rsplit('/', 1)[-1])} {r.score:.3f} · {r.word_summary()}")
            for rank, r in enumerate(results)
        ]
        lines = [
            f"{len(results)} best of {count} images for “{html.escape(text)}”. Select one to see where it matched."
        ]
        lines += [
            f"{rank + 1}. `{html.escape(display(r.path.rsplit('/', 1)[-1]))}` {r.score:.3f}: {html.escape(r.word_summary())}"
            for rank, r in enumerate(results)
        ]
        status = "\n".join(lines)
        return (
            items,
            [(r.path, [(w.words, w.alignment, w.matched) for w in r.words]) for r in results],
            status,
            None,
            "",
        )

    def explain_selected(state: list, text: str, event: gr.SelectData):
        if not state or event.index is None or not text or not text.strip():
            return None, ""
        path, words = state[event.index]
        with live as gallery:
            explanation = explain(gallery.model, gallery.processor, path, text, matched={w: m for w, _, m in words})
        buffer = io.BytesIO()
        draw_explanation(explanation, text, buffer)
        buffer.seek(0)
        report = SearchResult(path, 0.0, tuple(WordMatch(w, a, m) for w, a, m in words))
        return PIL.Image.open(buffer).convert(
            "RGB"
        ), f"### Why #{event.index + 1} matched\n{word_report_markdown(report)}"

    with live as gallery:
        count, model_name = len(gallery), gallery.manifest.get("model")
    with gr.Blocks(title="SCTA image search") as demo:
        gr.Markdown(
            f"# SCTA image search\n{count} images, model `{model_name}`. The global embeddings propose candidates, "
            "the SCTA head re-ranks them. Under each result: the words of the query it matched, and those it "
            "matched only weakly. Select a result to see where."
        )
        with gr.Row():
            query = gr.Textbox(show_label=False, placeholder=PLACEHOLDER, elem_id="query", scale=4, autofocus=True)
            button = gr.Button("Search", variant="primary", elem_id="search", scale=1)
        status = gr.Markdown("", elem_id="status")
        results = gr.Gallery(
            label="Results", columns=6, height="auto", allow_preview=False, elem_id="results", format="png"
        )
        words = gr.Markdown("", elem_id="words")
        explanation = gr.Image(show_label=False, type="pil", elem_id="explanation", format="png")
        state = gr.State([])
        outputs = [results, state, status, explanation, words]
        button.click(search, query, outputs)
        query.submit(search, query, outputs)
        results.select(explain_selected, [state, query], [explanation, words])
    return demo
