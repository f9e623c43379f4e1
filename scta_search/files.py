"""The image files of a gallery: walking folders, reading a file once (stamp, content hash, pixels), decoding ahead
of the model in a thread pool, and naming paths that are not valid UTF-8.

Only the standard library and numpy at import time: `scta-search --help` must not pay for torch.
"""

import concurrent.futures
import dataclasses
import fnmatch
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def display(path: str) -> str:
    """`path` printable on any terminal: bytes that are not UTF-8 (a name from another system's encoding) are shown
    as `\\xNN` escapes instead of making `print` fail."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclasses.dataclass(frozen=True)
class Stamp:
    """What says a file is unchanged: its size and modification time (nanoseconds), taken before it is read."""

    size: int
    mtime_ns: int


def stamp_of(path: str) -> Stamp:
    stat = os.stat(path)  # follows symlinks: a dangling one or a loop raises OSError
    return Stamp(stat.st_size, stat.st_mtime_ns)


def excluded(path: str, patterns: Iterable[str]) -> bool:
    """Whether `path` matches one of the shell patterns (`fnmatch`) by its full path or by its file name."""
    name = os.path.basename(path)
    return any(fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(name, pattern) for pattern in patterns)


def list_images(folder: str | os.PathLike, exclude: Iterable[str] = ()) -> list[str]:
    """The image files under `folder` (recursively, symlinked folders not followed, so a link loop cannot trap the
    walk), as sorted absolute paths, without those matching `exclude`. Names that are not valid UTF-8 are kept
    (Python's surrogate escapes). A missing folder or one with no image is a ValueError."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--images {display(str(root))} is not a folder: give the folder of images to index.")
    root = root.resolve()  # once: the walk below then yields absolute paths without a syscall per file
    exclude = list(exclude)
    paths = sorted(
        path
        for directory, _, names in os.walk(root)
        for name in names
        if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
        and not excluded(path := os.path.join(directory, name), exclude)
    )
    if not paths:
        raise ValueError(
            f"{display(str(root))} holds no image files ({', '.join(IMAGE_SUFFIXES)})"
            + (f" that do not match --exclude {' '.join(exclude)}" if exclude else "")
            + "."
        )
    return paths


def under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclasses.dataclass
class ReadFile:
    """One file read for indexing: its stamp (taken before reading), content hash, and either the decoded RGB
    image or why it cannot be used."""

    path: str
    stamp: Stamp | None
    sha256: str | None
    image: object = None  # PIL.Image.Image
    error: str | None = None


def read_image_file(path: str, draft_size: tuple[int, int] | None = None, reduce_to: int | None = None) -> ReadFile:
    """Stamp, hash and decode one file. Never raises for a bad file: a vanished file, a dangling symlink, an
    unreadable or undecodable file comes back with `error` set. The stamp is taken *before* reading, so a file
    replaced while it is read is seen as changed by the next update rather than kept with a stale embedding."""
    from processing_scta import convert_to_rgb, decode_image

    try:
        stamp = stamp_of(path)
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return ReadFile(path, None, None, error="vanished or a dangling symlink")
    except OSError as error:
        return ReadFile(path, None, None, error=f"cannot be read ({error.strerror or error})")
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        image = convert_to_rgb(decode_image(data, draft_size))
    except ValueError as error:
        return ReadFile(path, stamp, sha256, error=str(error))
    if reduce_to is not None and min(image.size) >= 4 * reduce_to:
        # a large non-JPEG (or a JPEG that draft could not shrink): halve while both sides stay >= 2x the
        # processor's input, so memory per image in flight stays bounded whatever the resolution
        factor = 1
        while min(image.size) // (2 * factor) >= 2 * reduce_to:
            factor *= 2
        image = image.reduce(factor)
    return ReadFile(path, stamp, sha256, image=image)


def read_ahead(paths: list[str], workers: int, window: int, **read_kwargs) -> Iterator[ReadFile]:
    """`read_image_file` of every path, in order, decoded by `workers` threads at most `window` files ahead of the
    consumer (Pillow releases the GIL while decoding, so the model encodes one batch while the next decodes)."""
    if workers <= 1:
        yield from (read_image_file(path, **read_kwargs) for path in paths)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        queue = iter(paths)
        for path in queue:
            pending.append(pool.submit(read_image_file, path, **read_kwargs))
            if len(pending) >= window:
                break
        while pending:
            yield pending.pop(0).result()
            following = next(queue, None)
            if following is not None:
                pending.append(pool.submit(read_image_file, following, **read_kwargs))
