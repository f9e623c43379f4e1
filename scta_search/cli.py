"""
Search your own images with a trained SCTA model: index a folder once, query it by text (two-stage: the global
embeddings propose candidates, the exact SCTA head re-ranks them), by image, or rank captions for one image.

    scta-search index --model outputs/demo_synthetic --images photos/ --index photos.scta
    scta-search query --index photos.scta "a small red circle at the top" -k 5
    scta-search query --index photos.scta "a red circle" --not "a ring" --cutoff 0.8 --exclude "*/drafts/*"
    scta-search query --index photos.scta --like photo.jpg
    scta-search query --index photos.scta --image photo.jpg --captions captions.txt
    scta-search explain photo.jpg "a small red circle" --model outputs/demo_synthetic --output why.png
    scta-search duplicates --index photos.scta --threshold 0.97
    scta-search serve --index photos.scta            # HTTP JSON API and the web demo on 127.0.0.1:8000

Re-running `index` encodes only new or changed files, reuses the embeddings of renamed or moved ones, and forgets
deleted ones; a killed run loses at most the batch in flight. The index format is described in docs/RETRIEVAL.md.
Every user error exits with status 2 and a message saying what to fix.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from . import DEFAULT_RERANK_TOP_K


logger = logging.getLogger("scta_search")


def bounded(convert, accepted, rule: str):
    """An argparse type: `convert` the text, then check it is `accepted`, else an error saying the `rule`."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if convert is int else 'number'}"
            ) from None
        if not accepted(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {value}")
        return value

    return parse


positive_int = bounded(int, lambda value: value >= 1, "must be >= 1")
non_negative_int = bounded(int, lambda value: value >= 0, "must be >= 0")
share = bounded(float, lambda value: 0 < value <= 1, "must be in (0, 1]")
cosine = bounded(float, lambda value: -1 <= value <= 1, "must be a cosine in [-1, 1]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scta-search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="index a folder of images (again: only new, changed or moved files)")
    index.add_argument("--model", required=True, help="a trained SCTA model folder or Hub id")
    index.add_argument("--revision", default=None, help="the model's Hub revision (branch, tag or commit) to pin")
    index.add_argument("--images", required=True, help="the folder of images (searched recursively)")
    index.add_argument("--index", required=True, help="the index folder to create (absent or empty) or update")
    index.add_argument("--batch_size", type=positive_int, default=32, help="images per encoding batch")
    index.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="shell pattern of paths or file names not to index (repeatable), e.g. '*/thumbs/*'",
    )
    index.add_argument(
        "--faiss_factory",
        default=None,
        help="with faiss-cpu: the first stage's FAISS index-factory string for big galleries, e.g. "
        "HNSW32 or IVF1024,Flat (trained on the gallery); default: exact",
    )
    index.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    query = commands.add_parser("query", help="search an index by text or by image, or rank captions for an image")
    query.add_argument("text", nargs="?", help="the text query")
    query.add_argument("--index", required=True)
    query.add_argument("-k", type=positive_int, default=10, help="how many results")
    query.add_argument(
        "--rerank_top_k",
        type=non_negative_int,
        default=DEFAULT_RERANK_TOP_K,
        help="candidates of the first stage the fused score re-ranks; 0 = every image",
    )
    query.add_argument(
        "--not",
        dest="negative",
        metavar="TEXT",
        help="rank down images matching this text: score = score(query) - score(TEXT), both by the head",
    )
    query.add_argument(
        "--cutoff",
        type=share,
        default=None,
        help="keep only results scoring at least this share (0-1] of the best result's score",
    )
    query.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN", help="shell pattern of paths never returned"
    )
    query.add_argument("--like", metavar="IMAGE", help="images most like this one (global-embedding cosine)")
    query.add_argument("--image", help="rank --captions for this image instead")
    query.add_argument("--captions", help="a text file, one caption per line (with --image)")
    query.add_argument("--json", action="store_true", help="machine-readable output")
    query.add_argument("--grid", help="also draw the query and its top-k thumbnails with scores into this PNG")
    query.add_argument(
        "--faiss_factory", default=None, help="with faiss-cpu: another first-stage index than the index's own"
    )
    query.add_argument(
        "--model", default=None, help="the model, if its folder moved since indexing (checked to be the same)"
    )
    query.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    explain = commands.add_parser("explain", help="draw why one (image, caption) pair scored what it did")
    explain.add_argument("image")
    explain.add_argument("caption")
    explain.add_argument("--model", required=True)
    explain.add_argument("--output", required=True, help="the PNG to write")
    explain.add_argument("--words", type=positive_int, default=6, help="word slots to draw")
    explain.add_argument("--device", default=None)

    duplicates = commands.add_parser("duplicates", help="groups of near-duplicate images of an index")
    duplicates.add_argument("--index", required=True)
    duplicates.add_argument(
        "--threshold", type=cosine, default=0.95, help="global-embedding cosine that makes two images duplicates"
    )
    duplicates.add_argument("--json", action="store_true")
    duplicates.add_argument("--model", default=None, help="the model, if its folder moved since indexing")

    serve = commands.add_parser("serve", help="an HTTP JSON API and the web demo over an index, kept in memory")
    serve.add_argument("--index", required=True)
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=positive_int, default=8000)
    serve.add_argument("--model", default=None, help="the model, if its folder moved since indexing")
    serve.add_argument("--no_app", action="store_true", help="the JSON API only, without the Gradio web demo at /")
    serve.add_argument("-k", type=positive_int, default=12, help="results per query in the web demo")
    return parser


def check_file(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file.")


def check_output(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {Path(path).resolve().parent} does not exist; create it first.")


def say(text: str) -> None:
    """Print, with paths that are not valid UTF-8 escaped rather than failing."""
    sys.stdout.write(text.encode("utf-8", "backslashreplace").decode("utf-8") + "\n")


def unchanged_without_the_model(args, index_dir: Path, marker: dict) -> bool:
    """Re-indexing from cron: when the model's weights files and every file of the folder are as the index records
    them, say so and stop, without importing torch or loading the model. True if so."""
    from .files import display, list_images
    from .store import IndexStore, Scan, weights_stamps

    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    if (
        model != marker.get("model")
        or weights_stamps(model) in (None, {})
        or weights_stamps(model) != marker.get("weights_stamps")
    ):
        return False
    if args.faiss_factory and args.faiss_factory != marker.get("faiss_factory"):
        return False
    store = IndexStore.open(index_dir, writable=True)
    try:
        root = str(Path(args.images).resolve())
        scan = Scan(store, list_images(args.images, args.exclude), root)
        if not scan.nothing_to_do or root not in store.folders():
            return False
        counts, total = scan.counts, len(store.rows())
    finally:
        store.close()
    say(
        f"Updated {display(args.index)}: 0 new, 0 changed, 0 renamed or moved, 0 removed, {counts['unchanged']} "
        f"unchanged; {total} images."
    )
    return True


def run_index(args) -> None:
    from .files import display, list_images
    from .store import IndexFolderError, check_faiss_factory, read_marker

    if args.faiss_factory:
        check_faiss_factory(args.faiss_factory)
    list_images(args.images, args.exclude)  # refuses a missing or image-less folder before the model loads
    index_dir = Path(args.index)
    marker = read_marker(index_dir) if index_dir.is_dir() else None  # an old or damaged index: refused here
    if marker is None and index_dir.exists() and (not index_dir.is_dir() or any(index_dir.iterdir())):
        what = "is a file" if not index_dir.is_dir() else "exists, holds other files and is not an scta-search index"
        raise IndexFolderError(
            f"--index {display(str(index_dir))} {what}: refusing to write into it. Choose a new or empty folder."
        )
    if marker is not None and unchanged_without_the_model(args, index_dir, marker):
        return
    import torch
    from accelerate import PartialState

    from .gallery import Gallery, load_model, model_fingerprint

    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    if marker is not None:
        gallery = Gallery.load(
            index_dir, model_name_or_path=args.model, device=args.device, writable=state.is_main_process
        )
        gallery.faiss_factory = args.faiss_factory or gallery.faiss_factory
        if args.faiss_factory and state.is_main_process:
            gallery.store.update_marker(faiss_factory=args.faiss_factory)
        counts = gallery.update(args.images, batch_size=args.batch_size, exclude=args.exclude)
        verb = "Updated"
    else:
        model, processor = load_model(args.model, args.revision, args.device)
        model_id = (
            str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
        )  # findable from anywhere
        fingerprint = model_fingerprint(model)
        gallery = Gallery.build(
            model,
            processor,
            args.images,
            index_dir,
            model_name_or_path=model_id,
            revision=args.revision,
            batch_size=args.batch_size,
            exclude=args.exclude,
            faiss_factory=args.faiss_factory,
            fingerprint=fingerprint,
        )
        counts = None
        verb = "Indexed"
    if not state.is_main_process:
        return
    if len(gallery):
        gallery.first_stage(gallery.first_stage_embeddings()[0], 1)  # builds and saves the FAISS index (with faiss)
    if counts is None:
        say(f"Indexed {len(gallery)} images into {display(args.index)}.")
    else:
        say(
            f"{verb} {display(args.index)}: {counts['new']} new, {counts['changed']} changed, {counts['renamed']} "
            f"renamed or moved, {counts['removed']} removed, {counts['unchanged']} unchanged; {len(gallery)} images."
        )
    skipped = gallery.skipped
    if skipped:
        say(f"Skipped {len(skipped)} file(s) that cannot be used (not decoded again until they change):")
        for path, why in list(skipped.items())[:20]:
            say(f"  {display(path)}: {why}")
    others = [folder for folder in gallery.store.folders() if folder != str(Path(args.images).resolve())]
    if others:
        say(f"The index also holds the images of {', '.join(display(f) for f in others)} (kept).")


def quiet_loading() -> None:
    """No progress bars while a model loads for a query: it takes a second, and the answer is a few lines."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


def check_index(args) -> None:
    """A missing, foreign or damaged index is refused before torch is imported (a second, not ten)."""
    from .store import IndexStore

    IndexStore.open(args.index).close()


def open_gallery(args):
    from .gallery import Gallery

    quiet_loading()
    return Gallery.load(
        args.index, model_name_or_path=getattr(args, "model", None), device=getattr(args, "device", None)
    )


def run_query(args) -> None:
    for path, flag in ((args.like, "--like"), (args.image, "--image"), (args.captions, "--captions")):
        check_file(path, flag)
    check_output(args.grid, "--grid")
    if args.image is not None and args.captions is None:
        raise ValueError("--image needs --captions FILE (one caption per line).")
    if args.captions is not None and args.image is None:
        raise ValueError("--captions goes with --image IMAGE (the image to rank them for).")
    modes = [
        name for name, value in (("a text query", args.text), ("--like", args.like), ("--image", args.image)) if value
    ]
    if len(modes) != 1:
        raise ValueError(
            "Give one of: a text query, --like IMAGE, or --image IMAGE --captions FILE."
            + (f" Got {', '.join(modes)}." if modes else "")
        )
    if args.text is not None and not args.text.strip():
        raise ValueError("The query must be a non-empty string.")
    if args.negative is not None and not args.negative.strip():
        raise ValueError("--not needs a non-empty text.")
    if args.faiss_factory:
        from .store import check_faiss_factory

        check_faiss_factory(args.faiss_factory)
    check_index(args)
    from .explain import draw_grid
    from .files import display

    gallery = open_gallery(args)
    if args.faiss_factory:
        gallery.faiss_factory = args.faiss_factory
    if args.image is not None:
        captions = [
            line.strip() for line in Path(args.captions).read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        if not captions:
            raise ValueError(f"--captions {args.captions} holds no caption (one per line).")
        ranked = gallery.search_image(args.image, captions, k=args.k)
        if args.json:
            say(json.dumps([{"caption": c, "score": s} for c, s in ranked], indent=2))
        else:
            for caption, score in ranked:
                say(f"{score:8.4f}  {caption}")
        return
    if args.like is not None:
        results = gallery.search_like(args.like, k=args.k, exclude=args.exclude)
        title = f"like {Path(args.like).name}"
    else:
        results = gallery.search_text(
            args.text,
            k=args.k,
            rerank_top_k=args.rerank_top_k,
            negative=args.negative,
            cutoff=args.cutoff,
            exclude=args.exclude,
            word_report=True,
        )
        title = args.text
    if args.grid:
        draw_grid(title, results, args.grid)
    if args.json:
        say(json.dumps([result.as_dict() for result in results], indent=2, ensure_ascii=True))
    else:
        for result in results:
            say(f"{result.score:8.4f}  {display(result.path)}")
            if result.words:
                say(f"          {result.word_summary()}")
        if not results:
            say("No results (all excluded, or below --cutoff).")
    if args.grid:
        say(f"Wrote {display(args.grid)}.")


def run_explain(args) -> None:
    check_file(args.image, "image")
    check_output(args.output, "--output")
    if not args.caption.strip():
        raise ValueError("The caption must be a non-empty string.")
    from .explain import draw_explanation, explain
    from .gallery import load_model

    quiet_loading()
    model, processor = load_model(args.model, device=args.device)
    explanation = explain(model, processor, args.image, args.caption)
    draw_explanation(explanation, args.caption, args.output, max_words=args.words)
    words = "; ".join(f"{w.words} {w.alignment:.2f}" for w in explanation.words[1:])
    say(
        f"score {explanation.score:.4f}; kept {len(explanation.kept)} of {explanation.grid**2} patches; word slots: {words}"
    )
    say(f"Wrote {args.output}.")


def run_duplicates(args) -> None:
    from .files import display

    check_index(args)
    groups = open_gallery(args).duplicates(args.threshold)
    if args.json:
        say(json.dumps([[{"path": p, "best_cosine": c} for p, c in group] for group in groups], indent=2))
        return
    for number, group in enumerate(groups, 1):
        say(f"group {number} ({len(group)} images)")
        for path, best in group:
            say(f"  {best:.4f}  {display(path)}")
    say(f"{len(groups)} group(s) of near-duplicates at cosine >= {args.threshold}.")


def run_serve(args) -> None:
    from .server import serve

    check_index(args)
    serve(args.index, host=args.host, port=args.port, model_name_or_path=args.model, with_app=not args.no_app, k=args.k)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)

    commands = {
        "index": run_index,
        "query": run_query,
        "explain": run_explain,
        "duplicates": run_duplicates,
        "serve": run_serve,
    }
    try:
        commands[args.command](args)
    except ValueError as error:
        parser.exit(2, f"scta-search {args.command}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
