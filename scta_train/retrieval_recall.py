"""Recall@K of image-text retrieval, as an `evaluate` metric that any retrieval project can load offline:

    import evaluate
    recall = evaluate.load("path/to/scta_train/retrieval_recall.py")
    recall.compute(predictions=[0, 3, 0, 12], references=[0, 0, 1, 1])

Inputs, one example per query:
- `predictions`: the 0-based rank of the query's positive among the candidates (0 = ranked first). For an image
  query (image to text), the rank of the best of the image's captions; for a caption query (text to image), the
  rank of the caption's image. How ties count is the caller's choice (SCTA counts them against the model);
- `references`: the query's direction, 0 for image to text, 1 for text to image.

Returns, for each direction present, R@1/5/10 in % (`r1_i2t`, ..., `r10_t2i`: the share of queries whose positive
ranks below K), `medr_*` = floor(median rank) + 1 and `meanr_*` = mean rank + 1; with both directions, `rsum`, the
sum of the six recalls. The ranking itself stays with the caller, so a score matrix of any size costs one example
per query here (the Flickr30K test: 1,000 + 5,000), not one per pair.
"""

import datasets
import evaluate
import numpy as np


_CITATION = """\
@inproceedings{karpathy2015deep,
  title={Deep visual-semantic alignments for generating image descriptions},
  author={Karpathy, Andrej and Fei-Fei, Li},
  booktitle={CVPR},
  year={2015}
}
"""

DIRECTIONS = {0: "i2t", 1: "t2i"}


@evaluate.utils.file_utils.add_start_docstrings(__doc__)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=__doc__,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int8")}),
            format="numpy",
        )

    def _compute(self, predictions, references):
        ranks, directions = np.asarray(predictions), np.asarray(references)
        if len(ranks) and ranks.min() < 0:
            raise ValueError(f"predictions are 0-based ranks, got {int(ranks.min())}.")
        unknown = set(np.unique(directions).tolist()) - set(DIRECTIONS)
        if unknown:
            raise ValueError(
                f"references are directions, 0 (image to text) or 1 (text to image); got {sorted(unknown)}."
            )
        metrics = {}
        for code, name in DIRECTIONS.items():
            direction_ranks = ranks[directions == code]
            if not len(direction_ranks):
                continue
            for k in (1, 5, 10):
                metrics[f"r{k}_{name}"] = 100.0 * float(np.mean(direction_ranks < k))
            metrics[f"medr_{name}"] = float(np.floor(np.median(direction_ranks)) + 1)
            metrics[f"meanr_{name}"] = float(np.mean(direction_ranks) + 1)
        if len(metrics) == 10:
            metrics["rsum"] = sum(metrics[f"r{k}_{d}"] for d in DIRECTIONS.values() for k in (1, 5, 10))
        return metrics
