"""
Why does LAPS fall so far behind SCTA on the synthetic set? Which caption tokens carry each model's ranking.

    python studies/laps_gap.py --scta outputs/demo_synthetic --laps outputs/laps --json bench/results/laps_gap.json

Both models score the demo's synthetic test split. For every caption, its image (the positive) is compared with the
image the model ranks highest among the others (the hardest negative). The text -> image half of the score is a
mean over the caption's key tokens of `leaky_relu(max_v u . v)`:
- LAPS (`word_aggregation=False`): every real caption token is a key token, so the mean runs over [CLS], [SEP],
  the content words (colour, shape, size, position) and the filler words the synthetic captions are padded with
  ("in this picture we can see", "which looks quite nice"). Each token class's share of the tokens and its share of
  the positive-minus-negative margin say which tokens decide the ranking and which only dilute it.
- SCTA: the key tokens are [CLS] and word slots, each a softmax-weighted mix of the words; the share of the slots'
  weight on each token class says what the slots learnt to read.
The cross-check (`bench/crosscheck_published.py`) shows this LAPS mode scores exactly as the published LAPS head;
this study measures what the data does to it.
"""

import argparse
import json
import logging
from collections import defaultdict

import torch
import torch.nn.functional as F

from dataset_scripts.synthetic_shapes import COLOURS, POSITION_PHRASES, SHAPES, SIZE_WORDS
from modeling_scta import SCTAModel, text_lengths
from processing_scta import SCTAProcessor
from scta_train.arguments import DataArguments
from scta_train.data import load_retrieval_dataset
from scta_train.metrics import retrieval_metrics
from scta_train.processing import RetrievalEvalCaptions, RetrievalEvalImages
from scta_train.retrieval import encode_caption_corpus, encode_image_corpus


logger = logging.getLogger("laps_gap")

# The words that describe an object: everything else of a synthetic caption is a filler, a joiner or a prefix.
CONTENT_WORDS = (
    set(COLOURS)
    | set(SHAPES)
    | {word for words in SIZE_WORDS.values() for word in words}
    | {word for phrases in POSITION_PHRASES.values() for phrase in phrases for word in phrase.split()}
    - {"in", "the", "at", "on", "of"}
)


def token_classes(tokenizer, input_ids: list[int]) -> list[str]:
    """'special', 'content' or 'filler' for every token of a caption; a word piece takes its whole word's class."""
    tokens = tokenizer.convert_ids_to_tokens(input_ids)
    special = set(tokenizer.all_special_tokens)
    groups: list[list[int]] = []  # token positions of each word
    for position, token in enumerate(tokens):
        if token.startswith("##") and groups:
            groups[-1].append(position)
        else:
            groups.append([position])
    classes = [""] * len(tokens)
    for group in groups:
        word = "".join(tokens[p].removeprefix("##") for p in group)
        kind = "special" if word in special else ("content" if word in CONTENT_WORDS else "filler")
        for position in group:
            classes[position] = kind
    return classes


@torch.no_grad()
def analyse(model_dir: str, split, batch_size: int) -> dict:
    model = SCTAModel.from_pretrained(model_dir).eval()
    processor = SCTAProcessor.from_pretrained(model_dir)
    head = model.head
    images = RetrievalEvalImages(split, processor.image_processor)
    captions_view = RetrievalEvalCaptions(split, processor.tokenizer)
    caption_to_image = captions_view.caption_to_image
    image_tokens, _ = encode_image_corpus(model, images, batch_size, torch.device("cpu"))
    captions, _ = encode_caption_corpus(model, captions_view, batch_size, "cpu", processor.tokenizer.pad_token_id)
    scores = model.score(image_tokens, captions).float()
    metrics = retrieval_metrics(scores, caption_to_image)
    negatives = scores.t().clone()  # (n_cap, n_img)
    negatives[torch.arange(len(caption_to_image)), caption_to_image] = float("-inf")
    hardest = negatives.argmax(1)

    laps = head.word_aggregator is None
    margin_by_class, count_by_class, weight_by_class = defaultdict(float), defaultdict(float), defaultdict(float)
    for index in range(len(caption_to_image)):
        input_ids = captions_view[index]["input_ids"]
        classes = token_classes(processor.tokenizer, input_ids)
        pair = torch.stack([caption_to_image[index], hardest[index]])
        state = head.image_key_state(image_tokens[pair], with_basis=False)
        text = captions.select(torch.tensor([[index], [index]]))
        similarities = head.block_similarities(state, text)[:, 0]  # (2, J, V)
        best = F.leaky_relu(similarities.max(-1).values, head.negative_slope)  # (2, J)
        keys = int(text.mask[0, 0].sum())
        contribution = (best[0, :keys] - best[1, :keys]) / keys  # each key token's share of the margin
        if laps:  # key token j is caption token j
            for token_class, value in zip(classes, contribution.tolist()):
                margin_by_class[token_class] += value
                count_by_class[token_class] += 1
        else:  # key 0 is the global token; the others word slots, mixes of the words
            margin_by_class["global token"] += float(contribution[0])
            margin_by_class["word slots"] += float(contribution[1:].sum())
            ids = torch.tensor([input_ids])
            tokens = model.get_text_features(ids).last_hidden_state
            mask = torch.ones_like(ids, dtype=torch.bool)
            slot_count = int(head.word_slot_counts(text_lengths(mask.long()))[0])
            _, _, weights = head.word_slot_weights(tokens, mask, text_lengths(mask.long()), slot_count)
            word_classes = classes[1:]  # the global token ([CLS]) is not a word
            per_word = weights[0].sum(-1)  # (L', ) total weight of each word over the slots
            for token_class, value in zip(word_classes, per_word.tolist()):
                weight_by_class[token_class] += value / slot_count
            for token_class in classes:
                count_by_class[token_class] += 1
    captions_count = len(caption_to_image)
    total_tokens = sum(count_by_class.values())
    result = {
        "model": model_dir,
        "mode": "LAPS" if laps else "SCTA",
        "test_r1_i2t": metrics["r1_i2t"],
        "test_r1_t2i": metrics["r1_t2i"],
        "token_share": {name: count / total_tokens for name, count in sorted(count_by_class.items())},
        "mean_margin_text_part": {name: value / captions_count for name, value in sorted(margin_by_class.items())},
    }
    if not laps:
        result["slot_weight_share"] = {name: value / captions_count for name, value in sorted(weight_by_class.items())}
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--scta", required=True, help="a trained SCTA model (word_aggregation=True)")
    parser.add_argument("--laps", required=True, help="a trained LAPS model (word_aggregation=False)")
    parser.add_argument("--synthetic_train_images", type=int, default=16000, help="names the demo's cached set")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data_args = DataArguments(dataset_name="synthetic_shapes", synthetic_train_images=args.synthetic_train_images)
    split = load_retrieval_dataset(data_args)["test"]
    results = [analyse(path, split, args.batch_size) for path in (args.scta, args.laps)]
    for result in results:
        logger.info(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
