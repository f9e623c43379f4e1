"""The index on disk: a folder that scta-search recognises by its own marker, never by a file name.

    INDEX/
      scta-index.json      the marker: format name and version, the model (path or Hub id, revision, fingerprint,
                           the weights files' sizes and modification times), the image processor's settings
      rows.sqlite          one row per indexed file (path as bytes, size, mtime, sha256, shard and row of its
                           embeddings), the files that could not be used, the indexed folders, a generation counter
      shards/NNNNNNNN.arrow   the embeddings, appended batch by batch: Arrow IPC stream files with the columns
                           `tokens` (T, C) float16, `global_embedding` (C,) float32 and `sha256`
                           (`datasets.Dataset.from_file` reads them)
      first_stage.faiss    the saved FAISS index of the first-stage embeddings (with faiss-cpu), and
      first_stage.json     the generation, factory string and adapter kind it was built for; rebuilt when one differs

Writes are atomic where a kill can land: a shard is written to a temporary name and renamed, then its rows are
committed in one SQLite transaction. A kill loses at most the batch in flight; the next run re-encodes only what
has no committed row, and removes shard files no row refers to. Nothing else in the folder is ever touched: files a
user put there stay. Only numpy and the standard library are imported here (pyarrow and faiss where used).
"""

import json
import logging
import os
import re
import sqlite3
import time
from pathlib import Path

import numpy as np

from .files import ReadFile, display, stamp_of, under


logger = logging.getLogger(__name__)

FORMAT = "scta-image-index"
VERSION = 2
MARKER = "scta-index.json"
ROWS = "rows.sqlite"
SHARDS = "shards"
FAISS_FILE = "first_stage.faiss"
FAISS_INFO = "first_stage.json"
# deleted rows are compacted away when they are this share of the stored embeddings, or shards this many
COMPACT_DEAD_SHARE = 0.25
COMPACT_MAX_SHARDS = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path BLOB UNIQUE NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    shard INTEGER NOT NULL,
    row INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
CREATE TABLE IF NOT EXISTS skipped (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY, rows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS folders (path BLOB PRIMARY KEY);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class IndexFolderError(ValueError):
    """A folder that is not a usable index, with what to do about it."""


def rebuild_hint(folder) -> str:
    return (
        f"rebuild it: scta-search index --model MODEL --images FOLDER --index NEW_FOLDER (then remove "
        f"{display(str(folder))} yourself)"
    )


def read_marker(folder: Path) -> dict | None:
    """The marker of an index folder, None when `folder` is not an index at all; a broken or foreign-version index
    is an error that says how to rebuild it."""
    marker_path = folder / MARKER
    if not marker_path.is_file():
        if (folder / "manifest.json").is_file() and (folder / "images").is_dir():
            try:
                old = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = {}
            if old.get("format") == 1 and "model_fingerprint" in old:
                raise IndexFolderError(
                    f"{display(str(folder))} is an index of an older scta-search (format 1); {rebuild_hint(folder)}."
                )
        return None
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise IndexFolderError(
            f"{display(str(marker_path))} cannot be read ({error}); {rebuild_hint(folder)}."
        ) from error
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise IndexFolderError(
            f"{display(str(marker_path))} is not an scta-search index marker; {rebuild_hint(folder)}."
        )
    if marker.get("version") != VERSION:
        raise IndexFolderError(
            f"{display(str(folder))} is an scta-search index of format version {marker.get('version')!r}; this "
            f"version reads {VERSION}; {rebuild_hint(folder)}."
        )
    missing = [key for key in ("model", "fingerprint", "num_tokens", "width") if key not in marker]
    if missing or not (folder / ROWS).is_file():
        what = f"its marker lacks {', '.join(missing)}" if missing else f"{ROWS} is missing"
        raise IndexFolderError(f"{display(str(folder))} is a damaged index ({what}); {rebuild_hint(folder)}.")
    return marker


def write_json_atomic(path: Path, payload: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    os.replace(temporary, path)


class IndexStore:
    """Rows, shards and the first-stage index of one index folder."""

    def __init__(self, folder: Path, marker: dict, writable: bool):
        self.folder = folder
        self.marker = marker
        self.writable = writable
        uri = f"file:{folder / ROWS}?mode={'rw' if writable else 'ro'}"
        try:
            self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self.db.execute("SELECT count(*) FROM images").fetchone()
        except sqlite3.DatabaseError as error:
            raise IndexFolderError(
                f"{display(str(folder / ROWS))} cannot be read ({error}); {rebuild_hint(folder)}."
            ) from error
        self._shard_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if writable:
            self._remove_leftovers()

    # -- opening and creating ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder, writable: bool = False) -> "IndexStore":
        folder = Path(folder)
        if not folder.exists():
            raise IndexFolderError(f"no index at {display(str(folder))}: build one with scta-search index.")
        if not folder.is_dir():
            raise IndexFolderError(f"{display(str(folder))} is a file, not an index folder.")
        marker = read_marker(folder)
        if marker is None:
            raise IndexFolderError(
                f"{display(str(folder))} is not an scta-search index (no {MARKER}): build one with scta-search index."
            )
        if writable:
            check_writable(folder)
        return cls(folder, marker, writable)

    @classmethod
    def create(cls, folder, marker: dict) -> "IndexStore":
        """A new, empty index in `folder`, which must be absent or an empty folder: nothing a user keeps there is
        ever replaced."""
        folder = Path(folder)
        if folder.exists():
            if not folder.is_dir():
                raise IndexFolderError(f"--index {display(str(folder))} is a file: choose a folder for the index.")
            if any(folder.iterdir()):
                raise IndexFolderError(
                    f"--index {display(str(folder))} exists, holds other files and is not an scta-search index: "
                    "refusing to write into it. Choose a new or empty folder."
                )
        else:
            parent = folder.parent
            if parent.exists() and not parent.is_dir():
                raise IndexFolderError(
                    f"--index {display(str(folder))}: {display(str(parent))} is a file, not a folder."
                )
            try:
                folder.mkdir(parents=True)
            except OSError as error:
                raise IndexFolderError(
                    f"cannot create the index folder {display(str(folder))} ({error.strerror})."
                ) from error
        check_writable(folder)
        (folder / SHARDS).mkdir(exist_ok=True)
        db = sqlite3.connect(folder / ROWS)
        db.executescript(SCHEMA)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', '0')")
        db.commit()
        db.close()
        marker = {"format": FORMAT, "version": VERSION, **marker, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(folder / MARKER, marker)  # last: a folder without it is not an index yet
        return cls(folder, marker, writable=True)

    def update_marker(self, **changes) -> None:
        self.marker = {**self.marker, **changes}
        write_json_atomic(self.folder / MARKER, self.marker)

    def _remove_leftovers(self) -> None:
        """Temporary files of a killed run and shard files that no committed row refers to."""
        referenced = {shard for (shard,) in self.db.execute("SELECT id FROM shards")}
        for path in (self.folder / SHARDS).iterdir():
            match = re.fullmatch(r"(\d{8})\.arrow", path.name)
            if path.name.startswith(".") or (match and int(match.group(1)) not in referenced):
                path.unlink(missing_ok=True)
        for path in self.folder.glob(".*.tmp-*"):
            path.unlink(missing_ok=True)

    # -- reading -----------------------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def rows(self) -> list[tuple[int, str, int, int]]:
        """(id, path, shard, row) of every indexed image, by id."""
        return [
            (image_id, os.fsdecode(path), shard, row)
            for image_id, path, shard, row in self.db.execute("SELECT id, path, shard, row FROM images ORDER BY id")
        ]

    def stamps(self) -> dict[str, tuple[int, int, str]]:
        return {
            os.fsdecode(path): (size, mtime_ns, sha256)
            for path, size, mtime_ns, sha256 in self.db.execute("SELECT path, size, mtime_ns, sha256 FROM images")
        }

    def skipped(self) -> dict[str, tuple[int | None, int | None, str]]:
        return {
            os.fsdecode(path): (size, mtime_ns, reason)
            for path, size, mtime_ns, reason in self.db.execute("SELECT path, size, mtime_ns, reason FROM skipped")
        }

    def folders(self) -> list[str]:
        return [os.fsdecode(path) for (path,) in self.db.execute("SELECT path FROM folders ORDER BY path")]

    def shard_arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """`(tokens (n, T, C) float16, global embeddings (n, C) float32)` of one shard, memory-mapped."""
        if shard not in self._shard_cache:
            import pyarrow as pa

            path = self.folder / SHARDS / f"{shard:08d}.arrow"
            try:
                table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
            except (OSError, pa.ArrowInvalid) as error:
                raise IndexFolderError(
                    f"the index's shard {display(str(path))} cannot be read ({error}); {rebuild_hint(self.folder)}."
                ) from error
            num_tokens, width = self.marker["num_tokens"], self.marker["width"]
            tokens = table.column("tokens").combine_chunks().flatten().flatten().to_numpy()
            global_embeddings = table.column("global_embedding").combine_chunks().flatten().to_numpy()
            self._shard_cache[shard] = (
                tokens.reshape(len(table), num_tokens, width),
                global_embeddings.reshape(len(table), width),
            )
        return self._shard_cache[shard]

    def take(self, locations: list[tuple[int, int]], column: int) -> np.ndarray:
        """Tokens `(n, T, C)` (`column=0`) or global embeddings `(n, C)` (`column=1`) of the given (shard, row)
        locations, in order: one fancy index per shard."""
        shape = (self.marker["num_tokens"], self.marker["width"]) if column == 0 else (self.marker["width"],)
        output = np.zeros((len(locations), *shape), np.float16 if column == 0 else np.float32)
        by_shard: dict[int, tuple[list[int], list[int]]] = {}
        for position, (shard, row) in enumerate(locations):
            positions, rows = by_shard.setdefault(shard, ([], []))
            positions.append(position)
            rows.append(row)
        for shard, (positions, rows) in by_shard.items():
            output[positions] = self.shard_arrays(shard)[column][rows]
        return output

    # -- writing -----------------------------------------------------------------------------------------------

    def _next_shard_id(self) -> int:
        (largest,) = self.db.execute("SELECT max(id) FROM shards").fetchone()
        return (largest or 0) + 1

    def _write_shard(self, tokens: np.ndarray, global_embeddings: np.ndarray, sha256: list[str]) -> int:
        import pyarrow as pa

        shard = self._next_shard_id()
        count, num_tokens, width = tokens.shape
        token_column = pa.FixedSizeListArray.from_arrays(
            pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(tokens, np.float16).reshape(-1)), width),
            num_tokens,
        )  # (n, T, C)
        global_column = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(global_embeddings, np.float32).reshape(-1)), width
        )  # (n, C)
        table = pa.table({"tokens": token_column, "global_embedding": global_column, "sha256": pa.array(sha256)})
        final = self.folder / SHARDS / f"{shard:08d}.arrow"
        temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(temporary, final)
        return shard

    def add(self, files, tokens: np.ndarray, global_embeddings: np.ndarray) -> None:
        """One batch of encoded files (`ReadFile`s): its shard, then its rows in one transaction."""
        shard = self._write_shard(tokens, global_embeddings, [file.sha256 for file in files])
        with self.db:
            self.db.execute("INSERT INTO shards VALUES (?, ?)", (shard, len(files)))
            self.db.executemany(
                "INSERT OR REPLACE INTO images (path, size, mtime_ns, sha256, shard, row) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (os.fsencode(f.path), f.stamp.size, f.stamp.mtime_ns, f.sha256, shard, row)
                    for row, f in enumerate(files)
                ],
            )
            self.db.executemany("DELETE FROM skipped WHERE path = ?", [(os.fsencode(f.path),) for f in files])
            self._bump()

    def reuse(self, path: str, stamp, sha256: str, source_path: str) -> None:
        """Index `path` with the embeddings stored for `source_path` (same content: a renamed, moved or copied
        file)."""
        with self.db:
            shard, row = self.db.execute(
                "SELECT shard, row FROM images WHERE path = ?", (os.fsencode(source_path),)
            ).fetchone()
            self.db.execute(
                "INSERT OR REPLACE INTO images (path, size, mtime_ns, sha256, shard, row) VALUES (?, ?, ?, ?, ?, ?)",
                (os.fsencode(path), stamp.size, stamp.mtime_ns, sha256, shard, row),
            )
            self.db.execute("DELETE FROM skipped WHERE path = ?", (os.fsencode(path),))
            self._bump()

    def skip(self, files) -> None:
        """Remember files that cannot be used, with their stamps: they are not decoded again until they change."""
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO skipped VALUES (?, ?, ?, ?)",
                [
                    (
                        os.fsencode(f.path),
                        f.stamp.size if f.stamp else None,
                        f.stamp.mtime_ns if f.stamp else None,
                        f.error,
                    )
                    for f in files
                ],
            )
            self.db.executemany("DELETE FROM images WHERE path = ?", [(os.fsencode(f.path),) for f in files])
            self._bump()

    def remove(self, paths: list[str]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM images WHERE path = ?", [(os.fsencode(p),) for p in paths])
            self.db.executemany("DELETE FROM skipped WHERE path = ?", [(os.fsencode(p),) for p in paths])
            self._bump()

    def add_folder(self, folder: str) -> None:
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO folders VALUES (?)", (os.fsencode(folder),))

    def _bump(self) -> None:
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def compact_if_needed(self) -> bool:
        """Rewrite the live embeddings into one shard when deleted rows or small shards pile up."""
        (stored,) = self.db.execute("SELECT coalesce(sum(rows), 0) FROM shards").fetchone()
        (shards,) = self.db.execute("SELECT count(*) FROM shards").fetchone()
        (live,) = self.db.execute("SELECT count(DISTINCT shard || ':' || row) FROM images").fetchone()
        dead = stored - live
        if stored == 0 or (dead < COMPACT_DEAD_SHARE * stored and shards <= COMPACT_MAX_SHARDS):
            return False
        locations = sorted({(shard, row) for shard, row in self.db.execute("SELECT shard, row FROM images")})
        old = [shard for (shard,) in self.db.execute("SELECT id FROM shards")]
        if locations:
            tokens = self.take(locations, 0)
            global_embeddings = self.take(locations, 1)
            hashes = {(s, r): h for s, r, h in self.db.execute("SELECT shard, row, sha256 FROM images")}
            new_shard = self._write_shard(tokens, global_embeddings, [hashes[location] for location in locations])
        new_row = {location: row for row, location in enumerate(locations)}
        with self.db:
            if locations:
                self.db.execute("INSERT INTO shards VALUES (?, ?)", (new_shard, len(locations)))
                updates = [
                    (new_shard, new_row[(s, r)], image_id)
                    for image_id, s, r in self.db.execute("SELECT id, shard, row FROM images")
                ]
                self.db.executemany("UPDATE images SET shard = ?, row = ? WHERE id = ?", updates)
            self.db.executemany("DELETE FROM shards WHERE id = ?", [(shard,) for shard in old])
            self._bump()
        self._shard_cache.clear()
        for shard in old:
            (self.folder / SHARDS / f"{shard:08d}.arrow").unlink(missing_ok=True)
        logger.info("Compacted %d stored embeddings in %d shards into %d live ones", stored, shards, len(locations))
        return True

    def close(self) -> None:
        self.db.close()
        self._shard_cache.clear()


def weights_stamps(model_path: str | None) -> dict | None:
    """Sizes and modification times of a local model folder's weight files, None for a Hub id."""
    if not model_path or not Path(model_path).is_dir():
        return None
    files = sorted(Path(model_path).glob("*.safetensors")) + sorted(Path(model_path).glob("*.bin"))
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


class Scan:
    """What re-indexing a folder has to do, from the files' stats and the stored rows alone (no model, no torch):
    `todo` (new or changed files to read), `unreadable` (newly unreadable: dangling symlinks, loops, vanished),
    `gone` (indexed or skipped paths under the folder that no longer exist), and the counts."""

    def __init__(self, store: "IndexStore", paths: list[str], root: str | None):
        self.stored, self.skipped = store.stamps(), store.skipped()
        self.counts = {"unchanged": 0, "new": 0, "changed": 0, "renamed": 0, "removed": 0, "skipped": 0}
        self.todo, self.unreadable = [], []
        for path in paths:
            try:
                stamp = stamp_of(path)
            except OSError as error:  # a dangling symlink, a link loop, a file deleted since the walk
                reason = (
                    "vanished or a dangling symlink"
                    if isinstance(error, FileNotFoundError)
                    else "a symlink loop"
                    if error.errno == 40
                    else f"cannot be read ({error.strerror or error})"
                )
                self.counts["skipped"] += 1
                if self.skipped.get(path, (None, None, None))[2] != reason:  # already recorded: nothing to write
                    self.unreadable.append(ReadFile(path, None, None, error=reason))
                continue
            if path in self.stored and self.stored[path][:2] == (stamp.size, stamp.mtime_ns):
                self.counts["unchanged"] += 1
            elif path in self.skipped and self.skipped[path][:2] == (stamp.size, stamp.mtime_ns):
                self.counts["skipped"] += 1  # undecodable and unchanged: not decoded again
            else:
                self.todo.append(path)
        present = set(paths)
        self.gone = (
            [] if root is None else [p for p in [*self.stored, *self.skipped] if under(p, root) and p not in present]
        )
        self.counts["removed"] = sum(p in self.stored for p in self.gone)

    @property
    def nothing_to_do(self) -> bool:
        return not (self.todo or self.unreadable or self.gone)


def is_writable(folder: Path) -> bool:
    """Whether this process may write into `folder`: it can, and the folder's write permission was not removed for
    everyone (a user's way of marking it read-only, which the superuser could otherwise write through)."""
    return os.access(folder, os.W_OK | os.X_OK) and bool(folder.stat().st_mode & 0o222)


def check_writable(folder: Path) -> None:
    """Refuse a folder `is_writable` says no to."""
    if not is_writable(folder):
        raise IndexFolderError(
            f"the index folder {display(str(folder))} is not writable: indexing needs write access there (queries "
            "do not). Choose another --index folder or fix its permissions."
        )


# ---------------------------------------------------------------------------------------------------------------
# The first stage with FAISS


def check_faiss_factory(factory: str) -> None:
    """A bad FAISS factory string is refused before any image is encoded (needs faiss-cpu)."""
    try:
        import faiss
    except ImportError as error:
        raise ValueError(f"--faiss_factory {factory!r} needs faiss-cpu: pip install faiss-cpu") from error
    try:
        faiss.index_factory(8, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(
            f"--faiss_factory {factory!r} is not a FAISS index-factory string (for example Flat, HNSW32, IVF256,Flat): "
            f"{str(error).strip().splitlines()[-1]}"
        ) from error


def build_faiss(unit_embeddings: np.ndarray, factory: str | None):
    """A FAISS inner-product index over normalised embeddings: exact (`Flat`) by default, or from an index-factory
    string. Factories that need training (IVF, PQ) are trained on the gallery itself. A bad string or a gallery too
    small for the factory is a ValueError saying so."""
    import faiss

    factory = factory or "Flat"
    count, width = unit_embeddings.shape
    try:
        index = faiss.index_factory(width, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(
            f"--faiss_factory {factory!r} is not a FAISS index-factory string this faiss understands (for example "
            f"Flat, HNSW32, IVF256,Flat): {str(error).strip().splitlines()[-1]}"
        ) from error
    if not index.is_trained:
        lists = re.search(r"IVF(\d+)", factory)
        needed = int(lists.group(1)) if lists else 256
        if count < needed:
            raise ValueError(
                f"--faiss_factory {factory!r} needs at least {needed} images to train, the gallery has {count}: use a "
                f"smaller factory (e.g. IVF{max(1, count // 39)},Flat) or the exact default."
            )
        try:
            index.train(unit_embeddings)
        except RuntimeError as error:
            raise ValueError(f"--faiss_factory {factory!r} could not be trained on {count} images: {error}") from error
    index.add(unit_embeddings)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, 16)  # faiss's default of 1 list misses neighbours across cell borders
    return index
