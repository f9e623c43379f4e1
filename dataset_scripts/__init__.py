"""Dataset builders for SCTA: Flickr30K / MSCOCO (`build_retrieval_dataset`) and the synthetic set (`synthetic_shapes`)."""

import datasets


# The schema of every split both scripts write, and that `processing_scta`'s dataset views read: one row per image.
FEATURES = datasets.Features(
    {
        "image": datasets.Image(),  # the file's bytes, stored once
        "image_id": datasets.Value("int64"),
        "filename": datasets.Value("string"),
        "captions": datasets.List(datasets.Value("string")),  # in file order
    }
)
