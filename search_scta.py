"""
Search your own images with a trained SCTA model: index a folder once, query it by text (two-stage: the global
embeddings propose candidates, the exact SCTA head re-ranks them) or rank captions for one image.

    scta-search index --model outputs/demo_synthetic --images photos/ --index photos.scta
    scta-search query --index photos.scta "a small red circle at the top" -k 5
    scta-search query --index photos.scta --image photo.jpg --captions captions.txt

Python:

    gallery = Gallery.build(model, processor, "photos/", index_dir="photos.scta")
    gallery = Gallery.load("photos.scta")               # the model named in its manifest
    gallery.update("photos/")                           # encodes only new or changed files, drops deleted ones
    gallery.search_text("a small red circle at the top", k=10)   # [SearchResult(path, score), ...]
    gallery.search_image("photo.jpg", ["a red circle", "two dogs"])

The index on disk (`../shared/docs/RETRIEVAL.md`): a `datasets` Arrow folder, one row per image with its path,
file size and modification time, its projected image tokens in float16 (what the head re-ranks) and its global
embedding; a `manifest.json` with the model (path or Hub id, a hash of its config and weights) and the image
processor's settings. It is written to a temporary folder and renamed when complete, so a killed indexing run
leaves the previous index in place. An index built by another model is refused. Images that cannot be decoded are
skipped, listed and counted; EXIF orientation is applied. The first stage is an exact matrix product, or FAISS
(`datasets`' `add_faiss_index`) when `faiss-cpu` is installed (`pip install -e ".[search]"`).
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from configuration_scta import HEAD_SETTINGS
from modeling_scta import SCTAModel
from processing_scta import SCTAProcessor, convert_to_rgb, decode_image


logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MANIFEST = "manifest.json"
TABLE = "images"


@dataclasses.dataclass(frozen=True)
class SearchResult:
    path: str
    score: float


def model_fingerprint(model: SCTAModel) -> str:
    """sha256 of the model's head settings and weights (not of bookkeeping such as its path or transformers
    version): an index is searched and extended only with the model whose fingerprint it records."""
    settings = {name: getattr(model.config, name) for name in HEAD_SETTINGS}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def list_images(folder_or_paths) -> list[str]:
    """Image files of a folder (recursively, sorted) or the given paths, as absolute paths."""
    if isinstance(folder_or_paths, (str, os.PathLike)):
        folder = Path(folder_or_paths)
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder of images.")
        root = folder.resolve()  # once: the walk below then yields absolute paths without a syscall per file
        paths = sorted(
            os.path.join(directory, name)
            for directory, _, names in os.walk(root)
            for name in names
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
        )
        if not paths:
            raise ValueError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
        return paths
    paths = [str(Path(p).resolve()) for p in folder_or_paths]
    if not paths:
        raise ValueError("No image paths given.")
    return paths


def file_stamp(path: str) -> tuple[int, float]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime


def load_image(path: str) -> PIL.Image.Image:
    """An RGB, upright image (EXIF orientation applied), or a ValueError saying why it cannot be used."""
    with open(path, "rb") as file:
        return convert_to_rgb(decode_image(file.read()))


def _device(device) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def encode_images(model: SCTAModel, processor: SCTAProcessor, paths: list[str], batch_size: int = 32, device=None,
                  show_progress: bool = True) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, str]]:  # fmt: skip
    """Encode image files in batches: (encoded paths, float16 tokens `(n, T, C)`, float32 global embeddings
    `(n, C)`, {path: why it was skipped} for files that cannot be decoded)."""
    device = _device(device)
    model = model.to(device).eval()
    kept, tokens, globals_, skipped = [], [], [], {}
    progress = tqdm(total=len(paths), desc="Encoding images", unit="img", disable=not show_progress)
    for start in range(0, len(paths), batch_size):
        batch_paths, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(load_image(path))
                batch_paths.append(path)
            except (OSError, ValueError) as error:
                skipped[path] = str(error)
        if images:
            pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
            features = model.get_image_features(pixel_values)
            tokens.append(features.last_hidden_state.half().cpu().numpy())
            globals_.append(features.pooler_output.float().cpu().numpy())
            kept += batch_paths
        progress.update(len(paths[start : start + batch_size]))
    progress.close()
    width = model.config.embed_size
    num_tokens = model.config.num_patches + int(model.config.vision_has_cls_token)
    empty_tokens = np.zeros((0, num_tokens, width), np.float16)
    return (
        kept,
        np.concatenate(tokens) if tokens else empty_tokens,
        np.concatenate(globals_) if globals_ else np.zeros((0, width), np.float32),
        skipped,
    )


def encode_data_parallel(model, processor, paths: list[str], batch_size: int = 32, device=None):
    """`encode_images`, split across the processes of `accelerate launch` / `torchrun` (each encodes a contiguous
    slice of the files, on its own device); every process gets the whole result, in file order. One process:
    `encode_images`."""
    state = PartialState()
    if state.num_processes == 1:
        return encode_images(model, processor, paths, batch_size, device)
    slices = [paths[len(paths) * r // state.num_processes : len(paths) * (r + 1) // state.num_processes]
              for r in range(state.num_processes)]  # fmt: skip
    part = encode_images(model, processor, slices[state.process_index], batch_size, device or state.device,
                         show_progress=state.is_local_main_process)  # fmt: skip
    parts = gather_object([part])  # one per process, in rank order
    kept = [path for p in parts for path in p[0]]
    tokens = np.concatenate([p[1] for p in parts])
    global_embeddings = np.concatenate([p[2] for p in parts])
    skipped = {path: why for p in parts for path, why in p[3].items()}
    return kept, tokens, global_embeddings, skipped


def _features(num_tokens: int, width: int) -> datasets.Features:
    return datasets.Features(
        {
            "path": datasets.Value("string"),
            "size": datasets.Value("int64"),
            "mtime": datasets.Value("float64"),
            "tokens": datasets.Array2D((num_tokens, width), "float16"),
            "global_embedding": datasets.List(datasets.Value("float32"), length=width),
        }
    )


class Gallery:
    """An indexed set of images, searchable by text (two-stage) and usable to rank captions for an image."""

    def __init__(self, model: SCTAModel, processor: SCTAProcessor, table: datasets.Dataset, manifest: dict,
                 index_dir: str | None = None):  # fmt: skip
        self.model = model.eval()
        self.processor = processor
        self.table = table
        self.manifest = manifest
        self.index_dir = index_dir
        self._global = None  # normalised global embeddings, (n, C), loaded on first search
        self._faiss = False
        self.faiss_factory = None  # a FAISS index-factory string ("HNSW32", "IVF1024,Flat"): approximate search

    # -- building, loading, saving ---------------------------------------------------------------------------

    @classmethod
    def build(cls, model: SCTAModel, processor: SCTAProcessor, images, index_dir: str | None = None,
              model_name_or_path: str | None = None, revision: str | None = None, batch_size: int = 32,
              device=None) -> "Gallery":  # fmt: skip
        """Encode every image of a folder (or list of paths) and, with `index_dir`, save the index there.
        `model_name_or_path` / `revision` are recorded so that `load` can find the model again."""
        paths = list_images(images)
        manifest = {
            "format": INDEX_FORMAT,
            "model": model_name_or_path or getattr(model, "name_or_path", None),
            "revision": revision,
            "model_fingerprint": model_fingerprint(model),
            "image_processor": processor.image_processor.to_dict(),
            "skipped": {},
        }
        gallery = cls(model, processor, cls._empty_table(model), manifest, index_dir)
        gallery._add(paths, batch_size, device)
        if index_dir is not None:
            gallery.save(index_dir)
        return gallery

    @classmethod
    def load(cls, index_dir: str, model: SCTAModel | None = None, processor: SCTAProcessor | None = None) -> "Gallery":
        """An index saved by `build`/`save`, with the model named in its manifest (or the one given, which must be
        the model that built it)."""
        folder = Path(index_dir)
        if not (folder / MANIFEST).is_file():
            raise ValueError(f"{folder} is not an SCTA image index (no {MANIFEST}); build one with scta-search index.")
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != INDEX_FORMAT:
            raise ValueError(f"{folder} has index format {manifest.get('format')}, this version reads {INDEX_FORMAT}.")
        if model is None:
            if not manifest.get("model"):
                raise ValueError(f"{folder}'s manifest names no model: pass model= and processor=.")
            revision = {"revision": manifest["revision"]} if manifest.get("revision") else {}
            model = SCTAModel.from_pretrained(manifest["model"], **revision)
            processor = processor or SCTAProcessor.from_pretrained(manifest["model"], **revision)
        if processor is None:
            raise ValueError("Gallery.load with model= needs processor= too.")
        check_same_model(manifest, model, folder)
        table = datasets.load_from_disk(str(folder / TABLE))
        return cls(model, processor, table, manifest, str(folder))

    def save(self, index_dir: str) -> None:
        """Write the index to a temporary folder beside `index_dir`, then swap it in: a kill never leaves a
        half-written index in place of a good one. Under several processes the main one writes, the others wait."""
        state = PartialState()
        if not state.is_main_process:
            state.wait_for_everyone()
            self.index_dir = str(Path(index_dir).resolve())
            return
        self._write(index_dir)
        if state.num_processes > 1:
            state.wait_for_everyone()

    def _write(self, index_dir: str) -> None:
        target = Path(index_dir).resolve()
        if target.exists() and not (target / MANIFEST).is_file():
            raise ValueError(f"{target} exists and is not an SCTA image index: refusing to replace it.")
        temporary = target.with_name(f".{target.name}.partial-{os.getpid()}")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        self.table.save_to_disk(str(temporary / TABLE))
        manifest = {**self.manifest, "num_images": len(self.table), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")  # written last
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(temporary, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, target)
        self.manifest, self.index_dir = manifest, str(target)
        self.table = datasets.load_from_disk(str(target / TABLE))  # memory-mapped from its final place
        self._global = None

    def update(self, images, batch_size: int = 32, device=None) -> dict[str, int]:
        """Re-index a folder: encode new and changed files (size or modification time), drop deleted ones, keep
        the rest. Saves when the gallery has an `index_dir`. Returns the counts."""
        paths = list_images(images)
        stamps = {path: file_stamp(path) for path in paths}
        columns = self.table.select_columns(["path", "size", "mtime"]).to_dict()  # one read, not row by row
        indexed = {path: (size, mtime) for path, size, mtime in zip(columns["path"], columns["size"], columns["mtime"])}
        keep = [i for i, path in enumerate(columns["path"]) if path in stamps and stamps[path] == indexed[path]]
        todo = [path for path in paths if indexed.get(path) != stamps[path]]
        counts = {
            "unchanged": len(keep),
            "new": sum(path not in indexed for path in todo),
            "changed": sum(path in indexed for path in todo),
            "removed": sum(path not in stamps for path in indexed),
        }
        if counts["new"] or counts["changed"] or counts["removed"]:
            self.table = self.table.select(keep)
            self.manifest["skipped"] = {p: why for p, why in self.manifest.get("skipped", {}).items() if p in stamps and p not in todo}
            self._add(todo, batch_size, device)
            if self.index_dir is not None:
                self.save(self.index_dir)
        logger.info("Re-indexed: %s", counts)
        return counts

    @staticmethod
    def _empty_table(model: SCTAModel) -> datasets.Dataset:
        num_tokens = model.config.num_patches + int(model.config.vision_has_cls_token)
        features = _features(num_tokens, model.config.embed_size)
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)

    def _add(self, paths: list[str], batch_size: int, device) -> None:
        if not paths:
            return
        kept, tokens, global_embeddings, skipped = encode_data_parallel(self.model, self.processor, paths, batch_size, device)
        if skipped:
            logger.warning("Skipped %d of %d images that cannot be decoded, e.g. %s: %s", len(skipped), len(paths),
                           next(iter(skipped)), next(iter(skipped.values())))  # fmt: skip
            self.manifest.setdefault("skipped", {}).update(skipped)
        stamps = [file_stamp(path) for path in kept]
        added = datasets.Dataset.from_dict(
            {"path": kept, "size": [s for s, _ in stamps], "mtime": [m for _, m in stamps], "tokens": list(tokens),
             "global_embedding": list(global_embeddings)},
            features=self.table.features,
        )  # fmt: skip
        self.table = datasets.concatenate_datasets([self.table, added]) if len(self.table) else added
        self._global = None

    # -- search ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.table)

    @property
    def paths(self) -> list[str]:
        return self.table.select_columns(["path"]).to_dict()["path"]

    def _global_matrix(self) -> torch.Tensor:
        if self._global is None:
            embeddings = self.table.with_format("numpy")["global_embedding"]
            self._global = F.normalize(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)), dim=-1)
        return self._global

    def _encode_query(self, text: str):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"The query must be a non-empty string, got {text!r}.")
        device = next(self.model.parameters()).device
        inputs = self.processor(text=[text], return_tensors="pt").to(device)
        features = self.model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        captions = self.model.caption_key_tokens(features.last_hidden_state, inputs["attention_mask"])
        return captions, F.normalize(features.pooler_output.float(), dim=-1)[0].cpu()

    def _tokens(self, rows) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.table.with_format("numpy").select(rows)["tokens"]))

    @torch.no_grad()
    def search_text(self, query: str, k: int = 10, rerank_top_k: int = 64) -> list[SearchResult]:
        """The `k` images best matching `query`, best first, with their SCTA scores. The global embeddings'
        cosine proposes `max(k, rerank_top_k)` candidates and the exact head scores them; `rerank_top_k=0` scores
        every image with the head (exhaustive)."""
        if len(self) == 0:
            raise ValueError("The gallery is empty.")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        captions, query_global = self._encode_query(query)
        if rerank_top_k == 0:
            scores = torch.cat([
                self.model.score(self._tokens(range(start, min(start + 4096, len(self)))), captions)[:, 0].float().cpu()
                for start in range(0, len(self), 4096)
            ])  # fmt: skip
            order = scores.topk(min(k, len(self))).indices
            rows, row_scores = order.tolist(), scores[order].tolist()
        else:
            candidates = self.first_stage(query_global, min(max(k, rerank_top_k), len(self)))
            tokens = self._tokens(candidates)
            scores = self.model.score_candidates(
                tokens, captions, torch.arange(len(candidates))[None, :], torch.zeros(1, 1, dtype=torch.long)
            )[0].float().cpu()
            order = scores.topk(min(k, len(candidates))).indices
            rows, row_scores = [candidates[i] for i in order.tolist()], scores[order].tolist()
        paths = self.table.select(rows)["path"]
        return [SearchResult(path, score) for path, score in zip(paths, row_scores)]

    def first_stage(self, query_global: torch.Tensor, k: int) -> list[int]:
        """Rows of the `k` best global-embedding cosines (FAISS when installed, else one matrix product)."""
        try:
            import faiss  # noqa: F401
        except ImportError:
            return (self._global_matrix() @ query_global).topk(k).indices.tolist()
        if not self._faiss:
            normalised = self.table.map(
                lambda batch: {"unit": list(F.normalize(torch.as_tensor(np.asarray(batch["global_embedding"])), dim=-1).numpy())},
                batched=True, desc="Normalising global embeddings", keep_in_memory=True,
            )  # fmt: skip
            factory = {"string_factory": self.faiss_factory} if self.faiss_factory else {}  # default: exact (flat)
            normalised.add_faiss_index("unit", metric_type=faiss.METRIC_INNER_PRODUCT, **factory)
            self._faiss_table, self._faiss = normalised, True
        _, examples = self._faiss_table.search("unit", query_global.numpy().astype(np.float32), k=k)
        return [int(i) for i in examples]

    @torch.no_grad()
    def search_image(self, image, captions: list[str], k: int | None = None) -> list[tuple[str, float]]:
        """Rank `captions` for one image (a path or a PIL image) by SCTA score, best first (the top `k`)."""
        if not captions:
            raise ValueError("search_image needs at least one caption.")
        image = load_image(str(image)) if isinstance(image, (str, os.PathLike)) else convert_to_rgb(image)
        device = next(self.model.parameters()).device
        inputs = self.processor(images=[image], text=list(captions), return_tensors="pt").to(device)
        scores = self.model(**inputs).logits_per_image[0].float().cpu()
        order = scores.argsort(descending=True)[: k or len(captions)]
        return [(captions[i], float(scores[i])) for i in order.tolist()]


def draw_grid(query: str, results: list[SearchResult], path, thumbnail: int = 160, columns: int = 5) -> None:
    """A PNG of the query and its results: thumbnails in rank order, each with its rank, score and file name."""
    from PIL import ImageDraw

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
        try:
            image = load_image(result.path)
            if max(image.size) < thumbnail:  # small images (the synthetic set's 64 px) scaled up, pixels kept sharp
                scale = thumbnail / max(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.NEAREST)
            else:
                image.thumbnail((thumbnail, thumbnail), PIL.Image.BICUBIC)
            canvas.paste(image, (x, y))
        except (OSError, ValueError):
            draw.rectangle([x, y, x + thumbnail, y + thumbnail], outline="red")
            draw.text((x + 4, y + 4), "unreadable", fill="red")
        draw.text((x, y + thumbnail + 3), f"#{rank + 1}  score {result.score:.3f}", fill="black")
        draw.text((x, y + thumbnail + 17), Path(result.path).name[:26], fill="gray")
    canvas.save(path)


@dataclasses.dataclass
class Explanation:
    """Why a pair scored what it did, in the head's own terms (METHOD.md steps 1-6) for one (image, caption).

    Attributes:
        image: the image as the model saw it (resized to the tower's input size).
        grid: patches per side (`num_patches = grid ** 2`).
        kept: indices of the patches the selection kept (row-major); the others were fused into one token.
        slot_maps: `(M, N)` weight of every patch in each learned patch slot (0 for fused patches).
        slot_matches: per patch slot, (the caption key token it aligns with best, cosine).
        word_slots: per caption key token, its top words with weights ([CLS] / the global token first).
        score: the pair's SCTA score.
    """

    image: PIL.Image.Image
    grid: int
    kept: list[int]
    slot_maps: np.ndarray
    slot_matches: list[tuple[int, float]]
    word_slots: list[list[tuple[str, float]]]
    score: float


@torch.no_grad()
def explain(model: SCTAModel, processor: SCTAProcessor, image, caption: str) -> Explanation:
    """The head's selection, patch slots and word slots for one pair, computed by the head's own functions."""
    if model.config.scoring_head != "key_tokens":
        raise ValueError("explain needs the key-token head; this model scores pairs by its global embeddings.")
    image = load_image(str(image)) if isinstance(image, (str, os.PathLike)) else convert_to_rgb(image)
    device = next(model.parameters()).device
    inputs = processor(images=[image], text=[caption], return_tensors="pt").to(device)
    head = model.head
    image_tokens = model.get_image_features(inputs["pixel_values"]).last_hidden_state
    text_tokens = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
    mask = inputs["attention_mask"]
    caption_keys = head.text_key_tokens(text_tokens, mask)
    state = head.image_key_state(image_tokens)
    selection = head.selection_scores(state, caption_keys)[0, 0]  # (N,), exactly what block_scores ranks
    kept = selection.topk(head.num_kept_patches).indices.sort().values
    _, patches = head.split_image_tokens(image_tokens)
    keep = torch.zeros(1, head.num_patches, dtype=torch.bool, device=device)
    keep[0, kept] = True
    slot_maps = head.kept_slot_weights(patches, keep)[0].t()  # (M, N)
    slots = F.normalize(slot_maps @ patches[0], dim=-1)  # (M, C)
    key_tokens = caption_keys.tokens[0][caption_keys.mask[0]]  # (J, C)
    similarities = slots @ key_tokens.t()  # (M, J)
    best = similarities.max(dim=1)
    slot_matches = [(int(j), float(v)) for j, v in zip(best.indices, best.values)]
    word_slots = _word_slots(head, processor, inputs["input_ids"][0], text_tokens, mask)
    score = float(head.score(image_tokens, head.caption_key_tokens(text_tokens, mask))[0, 0])
    side = processor.image_processor.size.get("height") or processor.image_processor.size.get("shortest_edge")
    return Explanation(
        image=image.resize((side, side), PIL.Image.BICUBIC),
        grid=int(round(head.num_patches ** 0.5)),
        kept=kept.tolist(),
        slot_maps=slot_maps.float().cpu().numpy(),
        slot_matches=slot_matches,
        word_slots=word_slots,
        score=score,
    )


def _word_slots(head, processor, input_ids, text_tokens, mask) -> list[list[tuple[str, float]]]:
    """The caption's key tokens as words: the global token, then each word slot's top words (LAPS: each token)."""
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


def draw_explanation(explanation: Explanation, caption: str, path, num_slots: int = 4, side: int = 224) -> None:
    """A PNG: the image with the kept patches as they are and the fused ones dimmed and crossed, then the heat maps
    of the `num_slots` patch slots that align best with the caption, each with the words it matches."""
    from PIL import ImageDraw

    grid, cell = explanation.grid, side / explanation.grid
    base = explanation.image.resize((side, side), PIL.Image.NEAREST)
    kept = set(explanation.kept)
    selection = np.asarray(base, dtype=np.float32)
    for index in range(grid * grid):
        if index not in kept:
            row, column = divmod(index, grid)
            y0, y1, x0, x1 = round(row * cell), round((row + 1) * cell), round(column * cell), round((column + 1) * cell)
            selection[y0:y1, x0:x1] *= 0.3  # fused into the extra token
    panels = [(PIL.Image.fromarray(selection.astype(np.uint8)), f"kept {len(kept)} of {grid * grid} patches")]
    order = sorted(range(len(explanation.slot_matches)), key=lambda m: -explanation.slot_matches[m][1])[:num_slots]
    for slot in order:
        weights = explanation.slot_maps[slot].reshape(grid, grid)
        heat = np.kron(weights / max(weights.max(), 1e-12), np.ones((int(np.ceil(cell)),) * 2))[:side, :side]
        gray = np.asarray(base.convert("L"), dtype=np.float32)[..., None].repeat(3, axis=2)
        tinted = gray * 0.35  # grey, so that the heat's red is not confused with a red object
        tinted[..., 0] += 200 * heat
        tinted[..., 1] += 60 * heat
        key, cosine = explanation.slot_matches[slot]
        words = " ".join(word for word, _ in explanation.word_slots[key])
        panels.append((PIL.Image.fromarray(np.clip(tinted, 0, 255).astype(np.uint8)), f"slot {slot} ~ '{words}' ({cosine:.2f})"))
    margin, label = 8, 18
    canvas = PIL.Image.new("RGB", (len(panels) * (side + margin) + margin, side + 2 * label + 70), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 6), f"caption: {caption}   (SCTA score {explanation.score:.3f})", fill="black")
    for number, (panel, title) in enumerate(panels):
        x = margin + number * (side + margin)
        canvas.paste(panel, (x, label + 8))
        draw.text((x, label + 12 + side), title[:40], fill="black")
        if number == 0:  # cross the fused patches, so that dimming is not the only cue
            for index in range(grid * grid):
                if index not in kept:
                    row, column = divmod(index, grid)
                    x0, y0 = x + column * cell, label + 8 + row * cell
                    draw.line([x0 + 2, y0 + 2, x0 + cell - 3, y0 + cell - 3], fill=(200, 200, 200))
    slot_text = "  |  ".join(" ".join(f"{w}" for w, _ in slot) for slot in explanation.word_slots)
    draw.text((margin, side + 2 * label + 20), f"caption key tokens: {slot_text}"[:180], fill="gray")
    canvas.save(path)


def check_same_model(manifest: dict, model: SCTAModel, where) -> None:
    if manifest.get("model_fingerprint") != model_fingerprint(model):
        raise ValueError(
            f"The index {where} was built by another model ({manifest.get('model')}, fingerprint "
            f"{str(manifest.get('model_fingerprint'))[:12]}...) than the one given (fingerprint "
            f"{model_fingerprint(model)[:12]}...): its embeddings cannot be mixed or searched with it. Re-index "
            "with this model into a new --index folder."
        )


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _index(args) -> None:
    # under accelerate launch / torchrun each process encodes a slice of the files; the main one writes and prints
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    revision = {"revision": args.revision} if args.revision else {}
    model = SCTAModel.from_pretrained(args.model, **revision)
    processor = SCTAProcessor.from_pretrained(args.model, **revision)
    if (Path(args.index) / MANIFEST).is_file():
        gallery = Gallery.load(args.index, model, processor)  # refuses another model's index
        counts = gallery.update(args.images, batch_size=args.batch_size, device=args.device)
        if state.is_main_process:
            print(f"Updated {args.index}: {counts['new']} new, {counts['changed']} changed, {counts['removed']} removed, "
                  f"{counts['unchanged']} unchanged; {len(gallery)} images.")  # fmt: skip
    else:
        model_id = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model  # findable from anywhere
        gallery = Gallery.build(model, processor, args.images, args.index, model_name_or_path=model_id, revision=args.revision,
                                batch_size=args.batch_size, device=args.device)  # fmt: skip
        if state.is_main_process:
            print(f"Indexed {len(gallery)} images into {args.index}.")
    skipped = gallery.manifest.get("skipped", {})
    if not state.is_main_process:
        return
    if skipped:
        print(f"Skipped {len(skipped)} file(s) that cannot be decoded:")
        for path, why in list(skipped.items())[:20]:
            print(f"  {path}: {why}")


def _explain(args) -> None:
    model = SCTAModel.from_pretrained(args.model)
    processor = SCTAProcessor.from_pretrained(args.model)
    if not args.caption.strip():
        raise ValueError("The caption must be a non-empty string.")
    explanation = explain(model, processor, args.image, args.caption)
    draw_explanation(explanation, args.caption, args.output, num_slots=args.slots)
    print(f"score {explanation.score:.4f}; kept {len(explanation.kept)} of {explanation.grid ** 2} patches; "
          f"wrote {args.output}")  # fmt: skip


def _query(args) -> None:
    gallery = Gallery.load(args.index)
    gallery.faiss_factory = args.faiss_factory
    if args.image is not None:
        if args.captions is None:
            raise ValueError("--image needs --captions FILE (one caption per line).")
        captions = [line.strip() for line in Path(args.captions).read_text(encoding="utf-8").splitlines() if line.strip()]
        ranked = gallery.search_image(args.image, captions, k=args.k)
        if args.json:
            print(json.dumps([{"caption": c, "score": s} for c, s in ranked], indent=2))
        else:
            for caption, score in ranked:
                print(f"{score:8.4f}  {caption}")
        return
    if args.text is None:
        raise ValueError("Give a text query, or --image with --captions.")
    results = gallery.search_text(args.text, k=args.k, rerank_top_k=args.rerank_top_k)
    if args.grid:
        draw_grid(args.text, results, args.grid)
    if args.json:
        print(json.dumps([dataclasses.asdict(result) for result in results], indent=2))
    else:
        for result in results:
            print(f"{result.score:8.4f}  {result.path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scta-search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="index a folder of images (again: only new or changed files)")
    index.add_argument("--model", required=True, help="a trained SCTA model folder or Hub id")
    index.add_argument("--revision", default=None, help="the model's Hub revision (branch, tag or commit) to pin")
    index.add_argument("--images", required=True, help="the folder of images (searched recursively)")
    index.add_argument("--index", required=True, help="the index folder to write or update")
    index.add_argument("--batch_size", type=int, default=32)
    index.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    query = commands.add_parser("query", help="search an index by text, or rank captions for an image")
    query.add_argument("text", nargs="?", help="the text query")
    query.add_argument("--index", required=True)
    query.add_argument("-k", type=int, default=10, help="how many results")
    query.add_argument("--rerank_top_k", type=int, default=64, help="candidates the head re-ranks; 0 = every image")
    query.add_argument("--image", help="rank --captions for this image instead")
    query.add_argument("--captions", help="a text file, one caption per line (with --image)")
    query.add_argument("--json", action="store_true", help="machine-readable output")
    query.add_argument("--grid", help="also draw the query and its top-k thumbnails with scores into this PNG")
    query.add_argument("--faiss_factory", default=None,
                       help="with faiss-cpu: a FAISS index-factory string for approximate first stages on big "
                       "galleries, e.g. HNSW32 (default: exact)")  # fmt: skip
    explain_parser = commands.add_parser("explain", help="draw why one (image, caption) pair scored what it did")
    explain_parser.add_argument("image")
    explain_parser.add_argument("caption")
    explain_parser.add_argument("--model", required=True)
    explain_parser.add_argument("--output", required=True, help="the PNG to write")
    explain_parser.add_argument("--slots", type=int, default=4, help="patch slots to draw")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        {"index": _index, "query": _query, "explain": _explain}[args.command](args)
    except ValueError as error:
        parser.exit(2, f"scta-search {args.command}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
