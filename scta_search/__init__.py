"""scta-search: index a folder of images with a trained SCTA model and search it by text or image.

    from scta_search import Gallery
    gallery = Gallery.build(model, processor, "photos/", index_dir="photos.scta")
    gallery = Gallery.load("photos.scta")
    gallery.search_text("a small red circle at the top", k=10, word_report=True)

The command line is `scta-search` (`scta_search.cli`), the HTTP server `scta-search serve` (`scta_search.server`),
the pictures of why a result matched `scta_search.explain`.
Importing this package costs nothing: torch and transformers load with the first attribute that needs them.
"""

__all__ = ["Gallery", "SearchResult", "WordMatch"]


def __getattr__(name: str):
    if name in ("Gallery", "SearchResult", "WordMatch"):
        from . import gallery

        return getattr(gallery, name)
    raise AttributeError(f"module 'scta_search' has no attribute {name!r}")
