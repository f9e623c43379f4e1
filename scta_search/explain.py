"""Why a pair scored what it did, in the head's own terms (docs/METHOD.md steps 1-6), and the pictures of it."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from modeling_scta import KeyTokenAlignmentHead
from processing_scta import image_side

from .files import display


@dataclasses.dataclass
class WordEvidence:
    """One key token of the caption: its words, the image key token it aligns with best and how well, and the
    region of the image (a patch slot or the fused patches) it aligns with best."""

    words: str
    alignment: float  # max_v leaky_relu(u . v): the term this key token adds to the score
    image_key: str  # the best image key token: "[CLS]", "slot 3" or "fused patches"
    region: str  # the best of the patch-based image key tokens: "slot 3" or "fused patches"
    region_alignment: float  # leaky_relu(u . region)
    heat: np.ndarray  # (grid, grid) weight of every patch in that region
    matched: bool | None = None  # from a gallery's word report; None for a pair scored alone


@dataclasses.dataclass
class Explanation:
    """Why a pair scored what it did.

    Attributes:
        image: the image as the model saw it (resized to the tower's input size).
        grid: patches per side (`num_patches = grid ** 2`).
        kept: indices of the patches the selection kept (row-major); the others were fused into one token.
        words: one `WordEvidence` per key token of the caption (its global token first).
        score: the pair's SCTA score.
    """

    image: PIL.Image.Image
    grid: int
    kept: list[int]
    words: list[WordEvidence]
    score: float


@torch.no_grad()
def explain(model, processor, image, caption: str, matched: dict[str, bool] | None = None) -> Explanation:
    """The head's selection and, for every key token of the caption, the image key token and the image region it
    aligns with best, computed by the head's own functions. `matched` ({word-slot name: flag}, from
    `Gallery.word_report`) labels the word slots as matched or weak."""
    from .gallery import eval_mode, open_image

    if not isinstance(model.head, KeyTokenAlignmentHead):
        raise ValueError("explain needs the key-token head; this model scores pairs by its global embeddings.")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("The caption to explain must be a non-empty string.")
    pil = open_image(image)
    device = next(model.parameters()).device
    inputs = processor(images=[pil], text=[caption], return_tensors="pt").to(device)
    head = model.head
    with eval_mode(model):
        image_tokens = model.get_image_features(inputs["pixel_values"]).last_hidden_state
        text_tokens = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
        mask = inputs["attention_mask"]
        caption_keys = head.text_key_tokens(text_tokens, mask)
        state = head.image_key_state(image_tokens, with_basis=False)  # one caption: no basis needed
        selection = head.selection_scores(state, caption_keys)[0, 0]  # (N,), exactly what block_scores ranks
        kept = selection.topk(head.num_kept_patches).indices.sort().values
        keep = torch.zeros(1, head.num_patches, dtype=torch.bool, device=device)
        keep[0, kept] = True
        _, patches = head.split_image_tokens(image_tokens)
        slot_maps = head.kept_slot_weights(patches, keep)[0].t()  # (M, N)
        fused_map = torch.softmax(selection.masked_fill(keep[0], float("-inf")), dim=0)  # (N,) over dropped ones
        similarities = head.block_similarities(state, caption_keys)[0, 0]  # (J, V): V = [cls;] slots; fused
        alignment = F.leaky_relu(similarities.max(-1).values, head.negative_slope)  # (J,)
        best = similarities.max(-1).indices  # (J,)
        score = float(head.score(image_tokens, head.caption_key_tokens(text_tokens, mask))[0, 0])
    from .gallery import key_token_names

    names = key_token_names(model, processor, {**inputs, "text_tokens": text_tokens})
    grid = int(round(head.num_patches**0.5))
    first_region = int(state.cls is not None)  # the image key tokens are [CLS] (if any), the slots, the fused token
    region_best = similarities[:, first_region:].max(-1)  # the best patch-based key of each text key token
    region_alignment = F.leaky_relu(region_best.values, head.negative_slope)
    flags = {frozenset(words.split()): flag for words, flag in (matched or {}).items()}  # word order may differ
    words = []
    for j, name in enumerate(names):
        column = int(region_best.indices[j])
        if column < slot_maps.shape[0]:
            region, heat = f"slot {column}", slot_maps[column].float().cpu().numpy()
        else:
            region, heat = "fused patches", fused_map.float().cpu().numpy()
        key = "[CLS]" if int(best[j]) < first_region else region
        flag = None if matched is None or j == 0 else flags.get(frozenset(name.split()))
        words.append(
            WordEvidence(
                name, float(alignment[j]), key, region, float(region_alignment[j]), heat.reshape(grid, grid), flag
            )
        )
    side = image_side(processor.image_processor)
    return Explanation(pil.resize((side, side), PIL.Image.BICUBIC), grid, kept.tolist(), words, score)


def word_slots(head, processor, input_ids, text_tokens, mask) -> list[list[tuple[str, float]]]:
    """The caption's key tokens as words: the global token, then each word slot's top words with their weights,
    heaviest first (LAPS: each token alone)."""
    length = int(mask[0].sum())
    tokens = processor.tokenizer.convert_ids_to_tokens(input_ids[:length].tolist())
    if head.word_aggregator is None:
        return [[(token, 1.0)] for token in tokens]
    lengths = mask.sum(1)
    first = head.text_global_token == "first"
    global_word = tokens[0] if first else tokens[length - 1]
    word_tokens = tokens[1:] if first else tokens[: length - 1]
    count = int(head.word_slot_counts(lengths)[0])
    weights = head.word_slot_weights(text_tokens, mask.bool(), lengths, count)[2][0]  # (L', k)
    slots = [[(global_word, 1.0)]]
    for slot in range(count):
        top = weights[: len(word_tokens), slot].topk(min(3, len(word_tokens)))
        slots.append([(word_tokens[i], float(w)) for w, i in zip(top.values, top.indices)])
    return slots


def draw_explanation(explanation: Explanation, caption: str, path, max_words: int = 6, side: int = 192) -> None:
    """A PNG: the image with the kept patches as they are and the fused ones dimmed and crossed, then one panel per
    word slot of the caption (strongest alignment first, at most `max_words`): where in the image its best image key
    token lies, titled with the words, matched / weak (when known) and the alignment."""
    from PIL import ImageDraw

    grid, cell = explanation.grid, side / explanation.grid
    base = explanation.image.resize((side, side), PIL.Image.NEAREST)
    kept = set(explanation.kept)
    selection = np.asarray(base, dtype=np.float32).copy()
    for index in range(grid * grid):
        if index not in kept:
            row, column = divmod(index, grid)
            y0, y1, x0, x1 = (
                round(row * cell),
                round((row + 1) * cell),
                round(column * cell),
                round((column + 1) * cell),
            )
            selection[y0:y1, x0:x1] *= 0.3  # fused into the extra token
    panels = [
        (PIL.Image.fromarray(selection.astype(np.uint8)), f"kept {len(kept)} of {grid * grid} patches", "black", "")
    ]
    distinct = {}
    for word in sorted(explanation.words[1:], key=lambda w: -w.alignment):  # slots of the same words drawn once
        distinct.setdefault(frozenset(word.words.split()), word)
    word_panels = list(distinct.values())[:max_words]
    gray = np.asarray(base.convert("L"), dtype=np.float32)[..., None].repeat(3, axis=2)
    for word in word_panels:
        heat = np.kron(word.heat / max(word.heat.max(), 1e-12), np.ones((int(np.ceil(cell)),) * 2))[:side, :side]
        tinted = gray * 0.35  # grey, so that the heat's colour is not confused with a coloured object
        tinted[..., 0] += 200 * heat
        tinted[..., 1] += 60 * heat
        verdict = "" if word.matched is None else ("matched " if word.matched else "weak ")
        colour = {True: (0, 120, 0), False: (190, 0, 0), None: (0, 0, 0)}[word.matched]
        title = f"'{word.words}' {verdict}{word.alignment:.2f}"
        detail = f"best: {word.image_key}; shown: {word.region} {word.region_alignment:.2f}"
        panels.append((PIL.Image.fromarray(np.clip(tinted, 0, 255).astype(np.uint8)), title, colour, detail))
    margin, header, footer = 8, 30, 40
    canvas = PIL.Image.new("RGB", (len(panels) * (side + margin) + margin, header + side + footer), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 8), f"caption: {caption}"[:150] + f"   (SCTA score {explanation.score:.3f})", fill="black")
    for number, (panel, title, colour, image_key) in enumerate(panels):
        x = margin + number * (side + margin)
        canvas.paste(panel, (x, header))
        draw.text((x, header + side + 6), title[:34], fill=colour)
        draw.text((x, header + side + 20), image_key, fill="gray")
        if number == 0:  # cross the fused patches, so that dimming is not the only cue
            for index in range(grid * grid):
                if index not in kept:
                    row, column = divmod(index, grid)
                    x0, y0 = x + column * cell, header + row * cell
                    draw.line([x0 + 2, y0 + 2, x0 + cell - 3, y0 + cell - 3], fill=(200, 200, 200))
    write_png(canvas, path)


def draw_grid(query: str, results, path, thumbnail: int = 160, columns: int = 5) -> None:
    """A PNG of the query and its results: thumbnails in rank order, each with its rank, score and file name."""
    from PIL import ImageDraw

    from .files import read_image_file

    rows = max(1, -(-len(results) // columns))
    margin, label = 8, 34
    width = columns * (thumbnail + margin) + margin
    height = 40 + rows * (thumbnail + label + margin) + margin
    canvas = PIL.Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 12), f"query: {query}", fill="black")
    for rank, result in enumerate(results):
        row, column = divmod(rank, columns)
        x, y = margin + column * (thumbnail + margin), 40 + row * (thumbnail + label + margin)
        file = read_image_file(result.path)
        if file.error is None:
            image = file.image
            if max(image.size) < thumbnail:  # small images (the synthetic set's 64 px) scaled up, pixels kept sharp
                scale = thumbnail / max(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.NEAREST)
            else:
                image.thumbnail((thumbnail, thumbnail), PIL.Image.BICUBIC)
            canvas.paste(image, (x, y))
        else:
            draw.rectangle([x, y, x + thumbnail, y + thumbnail], outline="red")
            draw.text((x + 4, y + 4), "unreadable", fill="red")
        draw.text((x, y + thumbnail + 3), f"#{rank + 1}  score {result.score:.3f}", fill="black")
        draw.text((x, y + thumbnail + 17), display(Path(result.path).name)[:26], fill="gray")
    write_png(canvas, path)


def write_png(image: PIL.Image.Image, path) -> None:
    """Save a PNG atomically; a missing folder is a ValueError naming it."""
    if hasattr(path, "write"):
        image.save(path, format="PNG")
        return
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {display(str(path))}: the folder {display(str(path.parent))} does not exist.")
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)
