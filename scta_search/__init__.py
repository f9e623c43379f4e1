"""scta-search: index a folder of images with a trained SCTA model and search it by text or image.

    from scta_search import Gallery
    gallery = Gallery.build(model, processor, "photos/", index_dir="photos.scta")
    gallery = Gallery.load("photos.scta")
    gallery.search_text("a small red circle at the top", k=10, word_report=True)

The command line is `scta-search` (`scta_search.cli`), the HTTP server `scta-search serve` (`scta_search.server`),
the pictures of why a result matched `scta_search.explain`.
Importing this package costs nothing: torch and transformers load with the first attribute that needs them.
"""

__all__ = ["DEFAULT_RERANK_TOP_K", "Gallery", "SearchResult", "WordMatch"]

# Candidates of the first stage the head re-ranks for a text query (the CLI's, the server's and the Python default):
# with a first-stage adapter, k = 16 kept every positive among the candidates on the demo (bench/RESULTS.md).
DEFAULT_RERANK_TOP_K = 16


def __getattr__(name: str):
    if name in ("Gallery", "SearchResult", "WordMatch"):
        from . import gallery

        return getattr(gallery, name)
    raise AttributeError(f"module 'scta_search' has no attribute {name!r}")
