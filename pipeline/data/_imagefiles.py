"""Which files are images, and decoding them the same way for training and prediction.

Which files are images: every extension Pillow registers for a format it can open
(`PIL.Image.registered_extensions()`, e.g. .jpg, .jfif, .jpe, .png, .webp, .tif, .bmp, .gif),
except stub formats that need an external handler (BUFR, GRIB, HDF5, WMF) and MPEG video.
Every other regular file under a class folder, and every hidden one, is counted by extension in
one `DataWarning`. A file whose content is another format than its extension says (a WEBP named
.jpg) is used as decoded, with one warning; "unreadable" is kept for files that do not decode.
Warnings Pillow raises while decoding ("Corrupt EXIF data", ...) become one warning per message
naming the files.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import threading
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.core import first_line
from pipeline.data import portable


class DataWarning(UserWarning):
    """A problem in the image folders that does not stop the run (one line, names the files)."""


def _openable_extensions() -> dict[str, str]:
    """Lower-case extension -> Pillow format, for every format Pillow can decode itself."""
    Image.init()
    openable = {"MPO"}  # multi-picture JPEGs: opened by the JPEG opener, so not in Image.OPEN
    for fmt, (factory, _) in Image.OPEN.items():
        stub = inspect.isclass(factory) and issubclass(factory, ImageFile.StubImageFile)
        if not stub and fmt != "MPEG":  # MPEG: video; Pillow reads only its frame size
            openable.add(fmt)
    return {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in openable}


_EXTENSION_FORMAT = _openable_extensions()
IMAGE_EXTENSIONS = tuple(sorted(_EXTENSION_FORMAT))
# Formats that are one family: a camera's multi-picture JPEG named .jpg is not a mismatch.
_SAME_FORMAT = {"MPO": "JPEG", "DIB": "BMP"}


def visible(name: str) -> bool:
    """False for hidden entries (a name starting with '.'), which are never classes or images."""
    return not name.startswith(".")


@dataclass(frozen=True)
class Listing:
    """Every regular file under a folder: the images used, and the files that are not."""

    images: list[Path]
    ignored: list[Path]  # hidden (a part of the path starts with '.') or not an image extension


def list_images(folder: Path) -> Listing:
    """Recursively sort the regular files under `folder` into images and ignored files (sorted)."""
    images: list[Path] = []
    ignored: list[Path] = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            hidden = not all(visible(part) for part in p.relative_to(folder).parts)
            (ignored if hidden or p.suffix.lower() not in _EXTENSION_FORMAT else images).append(p)
    return Listing(images, ignored)


def ignored_kinds(files: list[Path], base: Path) -> str:
    """'.txt: 2, no extension: 1, hidden: 3' for the files not used as images."""

    def kind(p: Path) -> str:
        if not all(visible(part) for part in p.relative_to(base).parts):
            return "hidden"
        return p.suffix.lower() or "no extension"

    return ", ".join(f"{k}: {n}" for k, n in Counter(map(kind, files)).most_common())


def ignored_files_message(base: Path, files: list[Path], examples: int = 3) -> str:
    """One line naming how many files under `base` are not used as images, by extension."""
    shown = ", ".join(str(p.relative_to(base)) for p in files[:examples])
    more = f" and {len(files) - examples} more" if len(files) > examples else ""
    return (
        f"{base}: {len(files)} file(s) not used as images ({ignored_kinds(files, base)}): {shown}{more}; "
        "only files whose extension Pillow opens as an image are used (.jpg, .jfif, .png, .webp, "
        "... see pipeline.data.IMAGE_EXTENSIONS): rename image files, move other files out"
    )


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully into 8-bit RGB, the same way for training and prediction
    (`portable.load_rgb`, which the registered model carries: EXIF orientation applied, palette
    and RGBA composited on white, grayscale, 16-bit and CMYK converted to RGB).

    Raises:
        OSError / PIL.UnidentifiedImageError: the file is not a decodable image.
    """
    return portable.load_rgb(path)


@dataclass(frozen=True)
class ImageCheck:
    """What decoding one file found."""

    reason: str | None  # None: usable; else why not ("empty file", "cannot be decoded (...)")
    format: str | None = None  # Pillow's format of the content (JPEG, PNG, WEBP, ...)
    mismatch: bool = False  # the content is another format than the extension says
    notes: tuple[str, ...] = ()  # one line per warning a library raised while decoding


def _one_line(message: object) -> str:
    return re.sub(r"\s+", " ", str(message)).strip()


_thread = threading.local()  # `caught`: the list of the decode running in this thread
_routing = threading.Event()  # set while `per_thread_warnings` is on


@contextlib.contextmanager
def per_thread_warnings() -> Iterator[None]:
    """While on, `decode_image` may run in many threads at once: each one's warnings go to its
    own list. (`warnings.catch_warnings` swaps process-wide state, so it cannot be nested across
    threads.) Warnings of other threads meanwhile are shown as usual."""
    shown = warnings.showwarning

    def route(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        caught = getattr(_thread, "caught", None)
        if caught is None:
            shown(message, category, filename, lineno, file, line)
        else:
            caught.append(_one_line(message))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = route
        _routing.set()
        try:
            yield
        finally:
            _routing.clear()


@contextlib.contextmanager
def _recorded() -> Iterator[list[str]]:
    """Collect the warnings raised inside (Pillow's "Corrupt EXIF data", ...) as one line each,
    so the caller can name the file they came from instead of letting them reach stderr raw."""
    notes: list[str] = []
    if _routing.is_set():
        _thread.caught = []
        try:
            yield notes
        finally:
            notes += list(dict.fromkeys(_thread.caught))
            _thread.caught = None
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield notes
    notes += list(dict.fromkeys(_one_line(w.message) for w in caught))


def decode_image(path: Path) -> tuple[Image.Image | None, ImageCheck]:
    """Fully decode one file with `load_rgb`, the check every image gets in training and predict.

    Returns:
        (RGB image or None when unusable, what the check found).
    """
    path = Path(path)
    image, fmt = None, None
    with _recorded() as notes:
        try:
            if path.stat().st_size == 0:
                return None, ImageCheck("empty file")
            with Image.open(path) as img:
                fmt = img.format
            image = load_rgb(path)
        except UnidentifiedImageError:
            return None, ImageCheck("not an image file")
        except Exception as err:  # noqa: BLE001  Pillow's plugins raise many types on corrupt data
            return None, ImageCheck(f"cannot be decoded ({first_line(err)})", fmt)
    expected = _EXTENSION_FORMAT.get(path.suffix.lower())
    mismatch = bool(expected and fmt and _SAME_FORMAT.get(fmt, fmt) != _SAME_FORMAT.get(expected, expected))
    return image, ImageCheck(None, fmt, mismatch, tuple(notes))


def check_image(path: Path) -> str | None:
    """Fully decode one file; return None when it is usable, else the reason (one phrase)."""
    return decode_image(path)[1].reason


class Findings:
    """Collects per-file checks and words them as one-line warnings (`messages`) and one error
    (`unreadable`), the same for the pre-flight scan and `sweep predict`."""

    def __init__(self) -> None:
        self.bad: list[tuple[str, str]] = []  # (name, reason)
        self.mismatched: list[tuple[str, str, str]] = []  # (name, content format, extension)
        self.notes: dict[str, list[str]] = defaultdict(list)  # library message -> names

    def add(self, name: str, check: ImageCheck, extension: str) -> None:
        if check.reason:
            self.bad.append((name, check.reason))
            return
        if check.mismatch:
            self.mismatched.append((name, str(check.format), extension))
        for note in check.notes:
            self.notes[note].append(name)

    def messages(self, where: str, examples: int = 5) -> list[str]:
        """Warnings about usable files: mismatched extensions, then one per library message."""

        def names(items: list[str]) -> str:
            more = f" and {len(items) - examples} more" if len(items) > examples else ""
            return ", ".join(items[:examples]) + more

        out = []
        if self.mismatched:
            listed = [f"{n} is {fmt}" for n, fmt, _ in self.mismatched]
            out.append(
                f"{where}: {len(listed)} image(s) hold another format than their extension says "
                f"and are used as decoded: {names(listed)}; rename them to their format's "
                "extension to silence this"
            )
        for note, files in self.notes.items():
            out.append(
                f'{where}: while decoding {len(files)} image(s) Pillow warned "{note}": '
                f"{names(files)}; the decoded images are used"
            )
        return out

    def unreadable(self, where: str) -> str:
        """The pre-flight error: every undecodable file and its reason, one per line."""
        listing = "\n  ".join(f"{name}: {why}" for name, why in self.bad)
        return f"{len(self.bad)} unreadable image(s) under {where}:\n  {listing}"
