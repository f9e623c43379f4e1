"""A searchable set of images: a trained SCTA model and its index (`store.IndexStore`).

Text search is two-stage (docs/RETRIEVAL.md): the first stage (the model's adapter over the global embeddings)
proposes candidates, the fused score (exact SCTA head + weighted first-stage cosine) re-ranks them. Image search (`search_like`) ranks by the global embeddings' cosine, the only image-image score the
model has. torch and transformers are imported here, not by the command line's argument parsing.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from configuration_scta import HEAD_SETTINGS
from modeling_scta import KeyTokenAlignmentHead, SCTAModel
from processing_scta import SCTAProcessor, convert_to_rgb, image_side

from . import DEFAULT_RERANK_TOP_K
from .files import display, excluded, list_images, read_ahead, read_image_file
from .store import (
    FAISS_FILE,
    FAISS_INFO,
    IndexStore,
    Scan,
    build_faiss,
    check_faiss_factory,
    is_writable,
    weights_stamps,
    write_json_atomic,
)


logger = logging.getLogger(__name__)

# a word slot counts as matched in a result when its best alignment there is at least this share of the best
# alignment any re-ranked candidate gives it (and positive): see `word_report`
MATCHED_SHARE = 0.9
# images decoded per encoding batch are also bounded by their pixels (after JPEG draft decoding)
PIXELS_PER_BATCH = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class WordMatch:
    """One key token of the query: its top-weighted words, its best alignment with the image's key tokens
    (`max_v leaky_relu(u . v)`, the term it adds to the score), and whether that counts as a match."""

    words: str
    alignment: float
    matched: bool


@dataclasses.dataclass(frozen=True)
class SearchResult:
    path: str
    score: float
    words: tuple[WordMatch, ...] = ()

    def word_summary(self) -> str:
        """ "matched: red, circle; weak: left"."""
        matched = [w.words for w in self.words if w.matched]
        weak = [w.words for w in self.words if not w.matched]
        return f"matched: {', '.join(matched) or '-'}; weak: {', '.join(weak) or '-'}"

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "score": self.score,
            "words": [dataclasses.asdict(word) for word in self.words],
        }


# ---------------------------------------------------------------------------------------------------------------
# The model and its fingerprint


def model_fingerprint(model: SCTAModel) -> str:
    """sha256 of the model's head settings and weights (not of bookkeeping such as its path or transformers
    version): an index is searched and extended only with the model whose fingerprint it records. This hashes
    every weight, so the command line computes it once, at indexing time, and again only when the weights files'
    sizes or modification times change."""
    settings = {name: getattr(model.config, name) for name in HEAD_SETTINGS}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_model(name_or_path: str, revision: str | None = None, device=None) -> tuple[SCTAModel, SCTAProcessor]:
    """A saved SCTA model and processor, in eval mode on `device` (default: cuda when available, else cpu)."""
    hub_id_form = not os.path.isabs(name_or_path) and not name_or_path.startswith(".") and name_or_path.count("/") <= 1
    if not Path(name_or_path).is_dir() and not hub_id_form:
        raise ValueError(f"--model {name_or_path}: no such model folder (a Hub id has the form owner/name).")
    revision = {"revision": revision} if revision else {}
    try:
        model = SCTAModel.from_pretrained(name_or_path, **revision)
        processor = SCTAProcessor.from_pretrained(name_or_path, **revision)
    except OSError as error:
        raise ValueError(
            f"--model {name_or_path} cannot be loaded as an SCTA model: {str(error).splitlines()[0]}"
        ) from error
    return model.to(resolve_device(device)).eval(), processor


def resolve_device(device) -> torch.device:
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(
            f"--device {device!r} is not a device torch knows (cpu, cuda, cuda:1, mps): {error}"
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
    return resolved


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """`model` in eval mode and without gradients for the block; its training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------
# Encoding image files


def encode_batch(model: SCTAModel, processor: SCTAProcessor, images: list) -> tuple[np.ndarray, np.ndarray]:
    """`(n, T, C)` float16 tokens and `(n, C)` float32 global embeddings of PIL images, on the model's device."""
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    [(tokens, global_embeddings)] = model.encode_image_batches([pixel_values])  # exhausted: the mode is restored
    return tokens.half().cpu().numpy(), global_embeddings.float().cpu().numpy()


def encoded_batches(
    model, processor, paths: list[str], batch_size: int, workers: int = 4, show_progress: bool = True, divert=None
):
    """Read, decode (in `workers` threads, ahead of the model) and encode files; yields `(files, tokens,
    global_embeddings, bad_files)` per batch of at most `batch_size` images and `PIXELS_PER_BATCH` pixels. A file
    for which `divert(file)` is true (e.g. known content under a new name) is not encoded."""
    from tqdm.auto import tqdm

    if not paths:
        return
    side = image_side(processor.image_processor)
    # a bar on a terminal only: in a log file it is kilobytes of escapes
    progress = tqdm(
        total=len(paths), desc="Encoding images", unit="img", disable=not (show_progress and sys.stderr.isatty())
    )
    files, bad, pixels = [], [], 0
    read = read_ahead(paths, workers=workers, window=2 * batch_size, draft_size=(2 * side, 2 * side), reduce_to=side)
    for file in read:
        progress.update(1)
        if file.error is not None:
            bad.append(file)
        elif divert is not None and divert(file):
            continue
        else:
            files.append(file)
            pixels += file.image.width * file.image.height
        if len(files) >= batch_size or pixels >= PIXELS_PER_BATCH:
            yield files, *encode_batch(model, processor, [f.image for f in files]), bad
            files, bad, pixels = [], [], 0
    if files or bad:
        tokens, global_embeddings = encode_batch(model, processor, [f.image for f in files]) if files else (None, None)
        yield files, tokens, global_embeddings, bad
    progress.close()


# ---------------------------------------------------------------------------------------------------------------
# The gallery


class Gallery:
    """An indexed set of images, searchable by text (two-stage) and by image, with a per-word report."""

    def __init__(self, model: SCTAModel, processor: SCTAProcessor, store: IndexStore, temporary=None):
        self.model = model
        self.processor = processor
        self.store = store
        self._temporary = temporary  # the private folder of an in-memory gallery (build without index_dir)
        self._faiss_factory = store.marker.get("faiss_factory")
        self._generation = None
        self.refresh()

    # -- building, loading, updating ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: SCTAModel,
        processor: SCTAProcessor,
        images,
        index_dir=None,
        model_name_or_path=None,
        revision=None,
        batch_size: int = 32,
        exclude=(),
        faiss_factory: str | None = None,
        fingerprint: str | None = None,
    ) -> "Gallery":
        """Index a folder of images into `index_dir` (absent or empty: nothing there is ever replaced); without
        `index_dir`, into a private temporary folder removed with the gallery. `model_name_or_path` / `revision`
        are recorded so that `load` can find the model again."""
        check_batch_size(batch_size)
        paths = list_images(images, exclude)  # before anything is written
        temporary = None
        if index_dir is None:
            temporary = tempfile.TemporaryDirectory(prefix="scta-gallery-")
            index_dir = Path(temporary.name) / "index"
        name = model_name_or_path or getattr(model, "name_or_path", None) or None
        marker = {
            "model": name,
            "revision": revision,
            "fingerprint": fingerprint or model_fingerprint(model),
            "weights_stamps": weights_stamps(name),
            "image_processor": processor.image_processor.to_dict(),
            "num_tokens": model.config.num_patches + int(model.config.vision_has_cls_token),
            "width": model.config.embed_size,
            "faiss_factory": faiss_factory,
        }
        if faiss_factory:
            check_faiss_factory(faiss_factory)
        state = _process_state()
        existed = Path(index_dir).exists()  # an empty folder the user made stays, even when nothing is indexed
        if state.is_main_process:
            store = IndexStore.create(index_dir, marker)
        state.wait_for_everyone()
        if not state.is_main_process:  # the others encode their share; the main process writes
            store = IndexStore.open(index_dir)
        gallery = cls(model, processor, store, temporary)

        def discard() -> None:
            """Nothing of value was written: leave no half-made index behind."""
            gallery.close()
            for path in sorted(Path(index_dir).rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            if not existed and Path(index_dir).exists():
                Path(index_dir).rmdir()

        try:
            gallery._index(images, paths, batch_size)
        except BaseException:
            gallery.refresh()
            if len(gallery) == 0 and not store.skipped():
                discard()
            raise
        if len(gallery) == 0:
            skipped = gallery.store.skipped()
            discard()
            example = next(iter(skipped.items()))
            raise ValueError(
                f"none of the {len(skipped)} image files under {display(str(images))} could be used (e.g. "
                f"{display(example[0])}: {example[1][2]}); no index was written."
            )
        return gallery

    @classmethod
    def load(
        cls,
        index_dir,
        model: SCTAModel | None = None,
        processor: SCTAProcessor | None = None,
        model_name_or_path: str | None = None,
        device=None,
        writable: bool = False,
    ) -> "Gallery":
        """An index saved by `build`, with the model named in its marker, or `model_name_or_path` (a moved model
        folder), or the given `model` and `processor` (hashed once to check they built the index)."""
        store = IndexStore.open(index_dir, writable=writable)
        marker = store.marker
        if model is None:
            name = model_name_or_path or marker.get("model")
            if not name:
                raise ValueError(f"{display(str(index_dir))}'s marker names no model: pass --model.")
            if not model_name_or_path and os.path.isabs(name) and not Path(name).is_dir():
                raise ValueError(
                    f"the model folder {name} that built the index {display(str(index_dir))} no longer exists. If it "
                    "moved, pass --model NEW_PATH (the index checks it is the same model)."
                )
            model, processor = load_model(name, None if model_name_or_path else marker.get("revision"), device)
            stamps = weights_stamps(name)
            if stamps is None or stamps != marker.get("weights_stamps"):
                check_same_model(marker, model_fingerprint(model), index_dir)
                if stamps is not None and store.writable:
                    store.update_marker(weights_stamps=stamps, model=str(Path(name).resolve()))
        else:
            if processor is None:
                raise ValueError("Gallery.load with model= needs processor= too.")
            check_same_model(marker, model_fingerprint(model), index_dir)
        return cls(model, processor, store)

    def update(self, images, batch_size: int = 32, exclude=()) -> dict[str, int]:
        """Re-index a folder: encode new and changed files (size or modification time), reuse the embeddings of
        renamed, moved or copied files (same content hash), forget deleted ones under this folder; entries of other
        folders of the index are kept. Returns the counts."""
        check_batch_size(batch_size)
        paths = list_images(images, exclude)
        return self._index(images, paths, batch_size)

    def _index(self, folder, paths: list[str], batch_size: int) -> dict[str, int]:
        state = _process_state()
        if state.is_main_process and not self.store.writable:
            raise ValueError(f"{display(str(self.store.folder))} was opened read-only; load it with writable=True.")
        root = str(Path(folder).resolve()) if isinstance(folder, (str, os.PathLike)) else None
        scan = Scan(self.store, paths, root)
        stored, counts, todo = scan.stored, scan.counts, scan.todo
        state.wait_for_everyone()  # every process has read the same rows before the main one writes
        if scan.unreadable and state.is_main_process:
            self.store.skip(scan.unreadable)
        by_hash = {sha256: path for path, (_, _, sha256) in stored.items()}

        def reuse(file) -> bool:
            """A new path whose content is indexed already (renamed, moved or copied): reuse its embeddings."""
            source = by_hash.get(file.sha256)
            if source is None or file.path in stored:
                return False
            self.store.reuse(file.path, file.stamp, file.sha256, source)
            counts["renamed"] += 1
            return True

        if state.num_processes > 1:
            batches = _encode_data_parallel(self.model, self.processor, todo, batch_size, state)
            if not state.is_main_process:
                state.wait_for_everyone()  # until the main process has written
                self.refresh()
                return counts
        else:
            batches = encoded_batches(self.model, self.processor, todo, batch_size, divert=reuse)
        for encoded, tokens, global_embeddings, bad in batches:
            if bad:
                self.store.skip(bad)
                counts["skipped"] += len(bad)
            for file in encoded:
                counts["changed" if file.path in stored else "new"] += 1
                by_hash.setdefault(file.sha256, file.path)
            if encoded:
                self.store.add(encoded, tokens, global_embeddings)
        if scan.gone:
            self.store.remove(scan.gone)
        if root is not None:
            self.store.add_folder(root)
        self.store.compact_if_needed()
        if state.num_processes > 1:
            state.wait_for_everyone()
        self.refresh()
        total = sum(counts.values()) - counts["removed"]
        logger.info("Indexed %s: %s", display(str(folder)), counts)
        if total and counts["skipped"] and counts["skipped"] == total:
            logger.warning("None of the files under %s could be used", display(str(folder)))
        return counts

    def refresh(self) -> bool:
        """Re-read the rows when the index changed on disk (another process indexed into it). True if it did."""
        generation = self.store.generation
        if generation == self._generation:
            return False
        self._generation = generation
        self._rows = self.store.rows()  # [(id, path, shard, row)]
        self._paths = [path for _, path, _, _ in self._rows]
        self._locations = [(shard, row) for _, _, shard, row in self._rows]
        self.path_of_id = {image_id: path for image_id, path, _, _ in self._rows}  # stable row ids (the server's)
        self.id_of_path = {path: image_id for image_id, path, _, _ in self._rows}
        self._unit = self._first_stage_unit = None
        self._faiss = None
        return True

    def close(self) -> None:
        self.store.close()
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    # -- what is indexed ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    @property
    def manifest(self) -> dict:
        return self.store.marker

    @property
    def skipped(self) -> dict[str, str]:
        return {path: reason for path, (_, _, reason) in self.store.skipped().items()}

    def tokens(self, rows: list[int]) -> torch.Tensor:
        """Stored image tokens `(len(rows), T, C)` float16 of gallery rows."""
        return torch.from_numpy(self.store.take([self._locations[r] for r in rows], 0))

    # -- the first stage ---------------------------------------------------------------------------------------

    @property
    def faiss_factory(self) -> str | None:
        return self._faiss_factory

    @faiss_factory.setter
    def faiss_factory(self, factory: str | None) -> None:
        if factory:
            check_faiss_factory(factory)
        if factory != self._faiss_factory:
            self._faiss_factory, self._faiss = factory, None  # rebuilt on the next search

    def unit_embeddings(self) -> torch.Tensor:
        """Normalised global embeddings `(n, C)` of the gallery rows."""
        if self._unit is None:
            self._unit = F.normalize(torch.from_numpy(self.store.take(self._locations, 1)), dim=-1)
        return self._unit

    def first_stage_embeddings(self) -> torch.Tensor:
        """First-stage embeddings `(n, C)` of the gallery rows: the model's adapter over their global embeddings
        (`SCTAModel.first_stage_image_embeds`), normalised; the normalised global embeddings without an adapter."""
        if self._first_stage_unit is None:
            global_embeddings = torch.from_numpy(self.store.take(self._locations, 1))
            device = next(self.model.parameters()).device
            with torch.no_grad():
                parts = [
                    self.model.first_stage_image_embeds(global_embeddings[start : start + 65536].to(device))
                    .float()
                    .cpu()
                    for start in range(0, len(global_embeddings), 65536)
                ]
            self._first_stage_unit = torch.cat(parts) if parts else torch.zeros(0, global_embeddings.shape[1])
        return self._first_stage_unit

    def first_stage(self, query: torch.Tensor, k: int) -> list[int]:
        """Rows of the `k` best first-stage cosines with the query's first-stage embedding: FAISS when installed (the
        saved index when it matches the rows and factory, else built and saved), else one exact matrix product."""
        k = min(k, len(self))
        try:
            import faiss
        except ImportError:
            return (self.first_stage_embeddings() @ query.float()).topk(k).indices.tolist()
        if self._faiss is None:
            self._faiss = self._load_or_build_faiss(faiss)
        _, rows = self._faiss.search(query.float().numpy()[None], k)
        return [int(row) for row in rows[0] if row >= 0]

    def _load_or_build_faiss(self, faiss):
        folder = self.store.folder
        # the index holds the first-stage embeddings: it belongs to these rows, this factory and this adapter
        info = {
            "generation": self._generation,
            "factory": self._faiss_factory or "Flat",
            "first_stage_adapter": self.model.config.first_stage_adapter,
        }
        try:
            if json.loads((folder / FAISS_INFO).read_text(encoding="utf-8")) == info:
                index = faiss.read_index(str(folder / FAISS_FILE))
                if index.ntotal == len(self):
                    return index
        except (OSError, ValueError, RuntimeError):
            pass
        index = build_faiss(self.first_stage_embeddings().numpy(), self._faiss_factory)
        if is_writable(folder):  # a read-only index is searched with an index built in memory, never written
            temporary = folder / f".{FAISS_FILE}.tmp-{os.getpid()}"
            faiss.write_index(index, str(temporary))
            os.replace(temporary, folder / FAISS_FILE)
            write_json_atomic(folder / FAISS_INFO, info)
        return index

    # -- search ------------------------------------------------------------------------------------------------

    def encode_query(self, text: str):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"The query must be a non-empty string, got {text!r}.")
        device = next(self.model.parameters()).device
        inputs = self.processor(text=[text], return_tensors="pt").to(device)
        with eval_mode(self.model):
            features = self.model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
            captions = self.model.caption_key_tokens(features.last_hidden_state, inputs["attention_mask"])
            query_first_stage = self.model.first_stage_text_embeds(features.pooler_output)[0].float().cpu()
        inputs["text_tokens"] = features.last_hidden_state
        return captions, query_first_stage, inputs

    def search_text(
        self,
        query: str,
        k: int = 10,
        rerank_top_k: int = DEFAULT_RERANK_TOP_K,
        negative: str | None = None,
        cutoff: float | None = None,
        exclude=(),
        word_report: bool = False,
    ) -> list[SearchResult]:
        """The `k` images best matching `query`, best first, with their scores.

        - Two-stage: the first stage (the model's adapter over the global embeddings, or their plain cosine)
          proposes `max(k, rerank_top_k)` candidates; they are ranked by the fused score `head + fusion_weight x
          first-stage cosine` (`config.fusion_weight`, chosen on dev; 0 or unset: the head alone).
          `rerank_top_k=0` scores every image with the head (exhaustive).
        - `negative`: text to rank down. Each candidate's score becomes `score(query) - score(negative)`, both
          fused: an image that matches the negative text as well as the query falls to about 0.
        - `cutoff` in (0, 1]: keep only results scoring at least `cutoff` x the best result's score (relative to the
          best: the head's scores are not calibrated across queries, so no absolute threshold means the same thing
          for two queries).
        - `exclude`: shell patterns of paths (or file names) never returned.
        - `word_report`: each result carries which of the query's key tokens found a strong match in it.
        """
        check_k(k, "k")
        if rerank_top_k < 0:
            raise ValueError(f"rerank_top_k must be >= 0 (0 = every image), got {rerank_top_k}.")
        if cutoff is not None and not 0 < cutoff <= 1:
            raise ValueError(f"cutoff must be in (0, 1] (a share of the best score), got {cutoff}.")
        self.refresh()
        if len(self) == 0:
            raise ValueError(f"the index {display(str(self.store.folder))} holds no images; index a folder first.")
        captions, query_first_stage, inputs = self.encode_query(query)
        allowed = [r for r, path in enumerate(self._paths) if not excluded(path, exclude)] if exclude else None
        if rerank_top_k == 0:
            candidates = allowed if allowed is not None else list(range(len(self)))
        elif allowed is not None:
            cosines = self.first_stage_embeddings()[allowed] @ query_first_stage
            top = cosines.topk(min(max(k, rerank_top_k), len(allowed))).indices.tolist()
            candidates = [allowed[i] for i in top]
        else:
            candidates = self.first_stage(query_first_stage, max(k, rerank_top_k))
        if not candidates:
            return []
        tokens = self.tokens(candidates)
        scores = self._fused_scores(candidates, tokens, captions, query_first_stage)
        if negative is not None:
            negative_captions, negative_first_stage, _ = self.encode_query(negative)
            scores = scores - self._fused_scores(candidates, tokens, negative_captions, negative_first_stage)
        order = scores.topk(min(k, len(candidates))).indices
        if cutoff is not None and float(scores[order[0]]) > 0:
            order = order[scores[order] >= cutoff * float(scores[order[0]])]
        words = self.word_report(tokens, captions, inputs, order) if word_report else None
        return [
            SearchResult(self._paths[candidates[i]], float(scores[i]), words[n] if words else ())
            for n, i in enumerate(order.tolist())
        ]

    def _fused_scores(self, candidates: list[int], tokens: torch.Tensor, captions, query_first_stage) -> torch.Tensor:
        """`head + fusion_weight x first-stage cosine` of the candidates (the first stage's own embeddings, as
        stored, so that the fused score adds exactly the cosine that chose the candidates)."""
        device = next(self.model.parameters()).device
        with eval_mode(self.model):
            scores = (
                self.model.score_candidates(
                    tokens.to(device), captions, torch.arange(len(tokens))[None, :], torch.zeros(1, 1, dtype=torch.long)
                )[0]
                .float()
                .cpu()
            )
        fusion_weight = self.model.config.fusion_weight or 0.0
        if fusion_weight:
            scores = scores + fusion_weight * (self.first_stage_embeddings()[candidates] @ query_first_stage)
        return scores

    def word_report(self, tokens: torch.Tensor, captions, inputs, order: torch.Tensor) -> list[tuple[WordMatch, ...]]:
        """For the results `order` (rows of `tokens`, the re-ranked candidates): each key token of the query (its
        word slots, named by their top-weighted words; slots of the same words merged; the global token left out) with its best alignment
        in the image, `max_v leaky_relu(u . v)`, which is exactly the term it adds to the score. It counts as
        matched when positive and at least `MATCHED_SHARE` of the best alignment any candidate gives that word slot:
        how well the words are matched is judged against what the gallery's best candidates offer for the same
        words, since the cosines' absolute level differs between word slots."""
        head = self.model.head
        if not isinstance(head, KeyTokenAlignmentHead):  # the global cosine has no word slots
            return [() for _ in order]
        device = next(self.model.parameters()).device
        with eval_mode(self.model):
            text = captions.select(torch.zeros(1, dtype=torch.long))  # (1, J, C)
            state = head.image_key_state(tokens.to(device=device, dtype=text.tokens.dtype), with_basis=False)
            similarities = head.block_similarities(state, text)[:, 0]  # (I, J, V)
            alignment = F.leaky_relu(similarities.max(-1).values, head.negative_slope).float().cpu()  # (I, J)
        names = key_token_names(self.model, self.processor, inputs)
        best = alignment.max(0).values  # (J,) over the candidates
        # one entry per distinct set of words: word slots that mix the same words (common in small models) are
        # reported once, with the strongest of their alignments; the caption's global token is not a word
        groups: dict[frozenset, list[int]] = {}
        for j in range(1, len(names)):
            groups.setdefault(frozenset(names[j].split()), []).append(j)
        report = []
        for i in order.tolist():
            entries = []
            for slots in groups.values():
                j = max(slots, key=lambda slot: float(alignment[i, slot]))
                matched = bool(alignment[i, j] > 0 and alignment[i, j] >= MATCHED_SHARE * best[j])
                entries.append(WordMatch(names[j], round(float(alignment[i, j]), 4), matched))
            report.append(tuple(entries))
        return report

    def search_like(self, image, k: int = 10, exclude=()) -> list[SearchResult]:
        """Images most like `image` (a path or PIL image) by the cosine of their global embeddings, best first; the
        image itself, when indexed, comes first with cosine 1."""
        check_k(k, "k")
        self.refresh()
        if len(self) == 0:
            raise ValueError(f"the index {display(str(self.store.folder))} holds no images; index a folder first.")
        pil = open_image(image)
        _, global_embedding = encode_batch(self.model, self.processor, [pil])
        query = F.normalize(torch.from_numpy(global_embedding[0]), dim=-1)
        cosines = self.unit_embeddings() @ query
        if exclude:
            cosines = cosines.masked_fill(torch.tensor([excluded(p, exclude) for p in self._paths]), float("-inf"))
        top = cosines.topk(min(k, len(self)))
        return [
            SearchResult(self._paths[r], float(s))
            for r, s in zip(top.indices.tolist(), top.values.tolist())
            if s > float("-inf")
        ]

    def search_image(self, image, captions: list[str], k: int | None = None) -> list[tuple[str, float]]:
        """Rank `captions` for one image (a path or a PIL image) by SCTA score, best first (the top `k`)."""
        if not captions:
            raise ValueError("search_image needs at least one caption.")
        if k is not None:
            check_k(k, "k")
        pil = open_image(image)
        device = next(self.model.parameters()).device
        inputs = self.processor(images=[pil], text=list(captions), return_tensors="pt").to(device)
        with eval_mode(self.model):
            scores = self.model(**inputs).logits_per_image[0].float().cpu()
        order = scores.argsort(descending=True)[: k or len(captions)]
        return [(captions[i], float(scores[i])) for i in order.tolist()]

    def duplicates(self, threshold: float = 0.95, block: int = 4096) -> list[list[tuple[str, float]]]:
        """Groups of near-duplicate images: connected components of the pairs whose global-embedding cosine is at
        least `threshold`. Each group lists (path, its best cosine to another member), largest groups first."""
        if not -1 <= threshold <= 1:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold}.")
        self.refresh()
        unit = self.unit_embeddings()
        parent = list(range(len(self)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        best = torch.full((len(self),), -1.0)
        for start in range(0, len(self), block):
            cosines = unit[start : start + block] @ unit.t()  # (b, n)
            rows = torch.arange(start, min(start + block, len(self)))
            cosines[torch.arange(len(rows)), rows] = -2.0  # not itself
            best[rows] = cosines.max(1).values
            for a, b in (cosines >= threshold).nonzero().tolist():
                parent[find(start + a)] = find(b)
        groups: dict[int, list[int]] = {}
        for row in range(len(self)):
            groups.setdefault(find(row), []).append(row)
        found = [sorted(members, key=lambda r: self._paths[r]) for members in groups.values() if len(members) > 1]
        found.sort(key=lambda members: (-len(members), self._paths[members[0]]))
        return [[(self._paths[r], round(float(best[r]), 4)) for r in members] for members in found]


def key_token_names(model: SCTAModel, processor: SCTAProcessor, inputs) -> list[str]:
    """A name for each of a caption's key tokens: the global token, then each word slot's words that carry at least
    half its top weight (special tokens left out unless nothing else is there; LAPS: every token)."""
    from .explain import word_slots

    special = set(processor.tokenizer.all_special_tokens)
    with torch.no_grad():
        slots = word_slots(
            model.head, processor, inputs["input_ids"][0], inputs["text_tokens"], inputs["attention_mask"]
        )
    names = []
    for slot in slots:
        words = [word for word, weight in slot if weight >= 0.5 * slot[0][1]]
        names.append(" ".join([w for w in words if w not in special] or words))
    return names


def open_image(image):

    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise ValueError(f"image {display(str(image))} does not exist or is not a file.")
        file = read_image_file(str(image))
        if file.error:
            raise ValueError(f"image {display(str(image))} {file.error}.")
        return file.image
    return convert_to_rgb(image)


def check_same_model(marker: dict, fingerprint: str, where) -> None:
    if marker.get("fingerprint") != fingerprint:
        raise ValueError(
            f"The index {display(str(where))} was built by another model ({marker.get('model')}, fingerprint "
            f"{str(marker.get('fingerprint'))[:12]}...) than the one given (fingerprint {fingerprint[:12]}...): its "
            "embeddings cannot be mixed or searched with it. Re-index with this model into a new --index folder."
        )


def check_k(value: int, name: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")


def check_batch_size(value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"--batch_size must be a whole number >= 1, got {value!r}.")


def _process_state():
    """accelerate's view of the processes of `accelerate launch` / `torchrun` (one process otherwise)."""
    from accelerate import PartialState

    return PartialState()


def _encode_data_parallel(model, processor, paths: list[str], batch_size: int, state):
    """`encoded_batches` split across the processes of `accelerate launch` / `torchrun`: each encodes a contiguous
    slice of the files; every process gets every batch, in file order (the main one writes them)."""
    from accelerate.utils import gather_object

    from scta_train.distributed import shard_bounds

    start, stop = shard_bounds(len(paths), state.process_index, state.num_processes)
    mine = [
        (files, tokens, global_embeddings, bad)
        for files, tokens, global_embeddings, bad in encoded_batches(
            model, processor, paths[start:stop], batch_size, show_progress=state.is_local_main_process
        )
    ]
    for file in (f for batch in mine for f in batch[0]):
        file.image = None  # pixels are not sent between processes
    parts = gather_object([mine])  # one list per process, in rank order
    return [batch for part in parts for batch in part]
