"""LoRA adapters merged into their base model, and cloud model dirs copied to local disk.

Shared by the train stage (``train.lora.merge``, and workers loading a previous phase) and the eval
stage (vLLM serves merged weights), so neither stage imports the other.
"""

from __future__ import annotations

import tempfile

from raycat import rundir


def localize(path: str) -> str:
    """A model dir under a cloud run dir (s3://...) is copied to local disk once per call; a local path
    is returned as is."""
    if "://" not in path:
        return path
    import pyarrow.fs as pafs

    local = tempfile.mkdtemp(prefix="raycat-model-")
    pafs.copy_files(path, local)
    return local


def merge_lora(
    base_dir: str, adapter_dir: str, out_dir: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> str:
    """The adapter in ``adapter_dir`` merged into ``base_dir``'s weights, saved (with the adapter's
    tokenizer) as a plain HF model dir at ``out_dir`` (local or cloud); returns ``out_dir``.
    ``revision`` and ``trust_remote_code`` apply to the base model, as when it was trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = localize(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, revision=revision, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        AutoTokenizer.from_pretrained(adapter, trust_remote_code=trust_remote_code).save_pretrained(d)
        rundir.upload_dir(d, out_dir)
    return out_dir
