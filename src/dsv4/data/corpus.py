"""Finding and reading training text: files, folders, globs and .jsonl, plus a stable train/val split.

The default corpus is the Python standard library of the running interpreter, so training works
offline with no download. Everything here is deterministic (sorted listings, hashlib-based split)
so two machines, or a resumed run, see the same documents in the same order.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "BINARY_EXTENSIONS",
    "DataError",
    "DataWarning",
    "Document",
    "default_corpus",
    "find_files",
    "iter_documents",
    "split_files",
    "text_files",
]

# Extensions that are never text; other files are still sniffed for NUL bytes / bad UTF-8 when read.
BINARY_EXTENSIONS = frozenset(
    ".pyc .pyo .pyd .so .dll .dylib .o .a .lib .exe .bin .class .jar .wasm "
    ".png .jpg .jpeg .gif .bmp .ico .tif .tiff .webp .svgz .pdf .psd "
    ".gz .tgz .zip .tar .bz2 .xz .zst .lz4 .7z .rar .whl .egg "
    ".npy .npz .pt .pth .ckpt .safetensors .onnx .pkl .pickle .parquet .arrow .feather .h5 .hdf5 "
    ".db .sqlite .sqlite3 .wav .mp3 .ogg .flac .mp4 .mov .avi .mkv .woff .woff2 .ttf .otf .eot".split()
)

# The stdlib default: *.py only; site-packages (third-party code, 130 MB on a typical install)
# and the test suites (Lib/test alone is ~17 MB, more than the rest of the stdlib, and holds files
# in deliberately broken encodings) are left out.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
SNIFF_BYTES = 8192
MAX_LINE_WARNINGS = 10  # per .jsonl file; the rest are summarised in one warning


class DataError(ValueError):
    """No usable training text: the message names the path and what was looked for."""


class DataWarning(UserWarning):
    """A file or .jsonl line that was skipped; the message names it."""


class Document(NamedTuple):
    """One training document: the file it came from and its text."""

    path: Path
    text: str


def default_corpus() -> Path:
    """The running interpreter's standard-library source folder (found via sysconfig, never hard-coded)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_default(path: Path) -> bool:
    try:
        return path.resolve() == default_corpus().resolve()
    except OSError:
        return False


def _keep_file(path: Path, stdlib: bool) -> bool:
    name = path.name
    if name.startswith("."):
        return False
    if stdlib:
        return name.endswith(".py")
    return path.suffix.lower() not in BINARY_EXTENSIONS


def _walk(root: Path, stdlib: bool) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d
            for d in dirnames
            if d != "__pycache__" and not d.startswith(".") and not (stdlib and d in STDLIB_SKIP_DIRS)
        ]
        for f in filenames:
            p = Path(dirpath) / f
            if _keep_file(p, stdlib) and p.is_file():
                out.append(p)
    return sorted(out)


def find_files(spec: str | Path | None = None) -> list[Path]:
    """List the corpus files named by `spec`, sorted.

    None -> the stdlib (*.py, no site-packages or test dirs); a folder -> every file below it except
    hidden ones, __pycache__ and known binary extensions; a glob ('docs/**/*.md') -> its matches;
    a file -> [it]. Raises DataError when nothing is found.
    """
    if spec is None:
        spec = default_corpus()
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        stdlib = _is_default(path)
        files = _walk(path, stdlib)
        if not files:
            looked = "*.py" if stdlib else "any file not hidden, in __pycache__ or with a binary extension"
            raise DataError(f"no text documents found under {path} (looked for {looked})")
        return files
    text = str(spec)
    if any(c in text for c in "*?["):
        files = set()
        for m in glob.glob(os.path.expanduser(text), recursive=True):
            p = Path(m)
            if p.is_dir():
                files.update(_walk(p, False))
            elif "__pycache__" not in p.parts and _keep_file(p, False):
                files.add(p)
        if not files:
            raise DataError(f"no text documents found: the pattern {text!r} matches no text files")
        return sorted(files)
    raise DataError(f"no such file or directory: {path}")


def _sniff(path: Path) -> str | None:
    """Why the file is not text, judged from its first SNIFF_BYTES (None: it looks like UTF-8 text)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    if b"\x00" in head:
        return "binary"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut multi-byte tail is fine
    except UnicodeDecodeError as e:
        return f"not UTF-8 at byte {e.start}"
    return None


def text_files(files: Sequence[str | Path], show: int = 3) -> list[Path]:
    """The files that look like text (by their first SNIFF_BYTES), checked before anything reads them
    whole; the others are reported in ONE DataWarning that counts them and names the first `show`."""
    files = [Path(p) for p in files]
    why = {p: r for p in files if (r := _sniff(p)) is not None}
    if why:
        names = "; ".join(f"{p} ({r})" for p, r in list(why.items())[:show])
        more = f"; and {len(why) - show} more" if len(why) > show else ""
        _warn(f"skipping {len(why)} of {len(files)} files that are not UTF-8 text: {names}{more}", stacklevel=2)
    return [p for p in files if p not in why]


def _warn(msg: str, stacklevel: int = 3) -> None:
    warnings.warn(msg, DataWarning, stacklevel=stacklevel)


def _read_text(path: Path) -> str | None:
    """The file's text, or None (with one warning) if it is binary or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        _warn(f"skipping {path}: cannot read ({e.strerror or e})")
        return None
    if b"\x00" in data[:SNIFF_BYTES]:
        _warn(f"skipping {path}: binary file (NUL bytes in the first {SNIFF_BYTES} bytes)")
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        _warn(f"skipping {path}: not UTF-8 text (bad byte at offset {e.start})")
        return None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    """One Document per line's `text_field`; bad lines are skipped with a warning naming file:line."""
    bad = 0
    try:
        f = path.open("rb")
    except OSError as e:
        _warn(f"skipping {path}: cannot read ({e.strerror or e})")
        return
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            problem = None
            try:
                obj = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
            except UnicodeDecodeError:
                problem = "not UTF-8"
            except json.JSONDecodeError as e:
                problem = f"invalid JSON ({e.msg})"
            else:
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    problem = f"no string field {text_field!r}"
                elif obj[text_field]:
                    yield Document(path, obj[text_field])
            if problem:
                bad += 1
                if bad <= MAX_LINE_WARNINGS:
                    _warn(f"{path}:{lineno}: skipping line: {problem}")
    if bad > MAX_LINE_WARNINGS:
        _warn(f"{path}: {bad - MAX_LINE_WARNINGS} more bad lines skipped ({bad} in all)")


def iter_documents(files: Iterable[str | Path], text_field: str = "text") -> Iterator[Document]:
    """Yield the documents of `files` in order: a text file is one document, a .jsonl file one per line.

    Binary / non-UTF-8 files are skipped with one DataWarning each; empty documents are dropped.
    Raises DataError at the end if nothing at all was readable.
    """
    files = [Path(p) for p in files]
    n = 0
    for path in files:
        if path.suffix.lower() == ".jsonl":
            for doc in _iter_jsonl(path, text_field):
                n += 1
                yield doc
            continue
        text = _read_text(path)
        if text:
            n += 1
            yield Document(path, text)
    if n == 0:
        where = _common_root(files) if files else "(no files given)"
        raise DataError(
            f"no text documents found under {where} ({len(files)} files: all empty, binary, "
            f"not UTF-8 or without a string {text_field!r} field)"
        )


def _common_root(files: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(Path(p).absolute().parent) for p in files]))


def _score(rel: str) -> float:
    """A stable uniform number in [0, 1) for a relative path (sha256, so identical on every machine)."""
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_files(
    files: Sequence[str | Path], val_fraction: float = 0.05, root: str | Path | None = None
) -> tuple[list[Path], list[Path]]:
    """Split files into (train, val) by a sha256 of each path relative to `root`.

    `root` defaults to the files' common folder, so the split does not depend on where the corpus is
    installed. With >= 2 files and val_fraction > 0 both sides get at least one file; the two lists
    are disjoint and keep the input order. val_fraction = 0 puts everything in train.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = list(dict.fromkeys(Path(p) for p in files))
    if not files:
        return [], []
    base = Path(root).absolute() if root is not None else _common_root(files)
    scores = {p: _score(Path(os.path.relpath(p.absolute(), base)).as_posix()) for p in files}
    val = {p for p in files if scores[p] < val_fraction}
    if len(files) >= 2 and val_fraction > 0:
        if not val:
            val.add(min(files, key=lambda p: (scores[p], str(p))))
        if len(val) == len(files):
            val.discard(max(files, key=lambda p: (scores[p], str(p))))
    return [p for p in files if p not in val], [p for p in files if p in val]
