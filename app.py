"""
A web demo of scta-search in the HF ecosystem's convention (a Gradio app, as a Space would run it): a query box, the
top-k images of an index with their SCTA scores, and why a selected result matched.

    pip install -e ".[app]"
    scta-search index --model outputs/demo_synthetic --images outputs/shapes-photos/test --index outputs/shapes.scta
    python app.py --index outputs/shapes.scta          # then open http://127.0.0.1:7860
"""

import argparse
import os
import tempfile
from pathlib import Path

import gradio as gr

from search_scta import Gallery, draw_explanation, explain


def build_app(gallery: Gallery, k: int = 12) -> gr.Blocks:
    """The Blocks app over one gallery."""

    def search(text: str):
        if not text or not text.strip():
            raise gr.Error("Type a query first.")
        results = gallery.search_text(text, k=k)
        items = [(r.path, f"#{rank + 1} {Path(r.path).name} {r.score:.3f}") for rank, r in enumerate(results)]
        return items, [r.path for r in results], None

    def explain_selected(paths: list[str], text: str, event: gr.SelectData):
        if not paths or event.index is None or not text.strip():
            return None
        path = paths[event.index]
        explanation = explain(gallery.model, gallery.processor, path, text)
        output = Path(tempfile.mkdtemp(prefix="scta-explain-")) / f"{Path(path).stem}.png"
        draw_explanation(explanation, text, output)
        return str(output)

    with gr.Blocks(title="SCTA image search") as demo:
        gr.Markdown(
            f"# SCTA image search\n{len(gallery)} images, model `{gallery.manifest.get('model')}`. The global "
            "embeddings propose candidates, the SCTA head re-ranks them. Select a result to see why it matched."
        )
        with gr.Row():
            query = gr.Textbox(label="Query", placeholder="a small red circle on the left", elem_id="query", scale=4)
            button = gr.Button("Search", variant="primary", elem_id="search", scale=1)
        results = gr.Gallery(label="Results", columns=6, height="auto", allow_preview=False, elem_id="results")
        explanation = gr.Image(label="Why it matched", type="filepath", elem_id="explanation")
        paths = gr.State([])
        button.click(search, query, [results, paths, explanation])
        query.submit(search, query, [results, paths, explanation])
        results.select(explain_selected, [paths, query], explanation)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="an index folder written by scta-search index")
    parser.add_argument("-k", type=int, default=12, help="results per query")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    gallery = Gallery.load(args.index)
    image_root = os.path.commonpath([os.path.dirname(path) for path in gallery.paths])  # Gradio serves files under it
    build_app(gallery, args.k).launch(server_name=args.host, server_port=args.port, allowed_paths=[image_root])


if __name__ == "__main__":
    main()
