"""LoRA adapters merged into their base model (``train.lora.merge``), as a Ray task.

The merge loads the whole base model, so it runs where the cluster has room for it (a task asking
for the memory the weights need), in the training dtype, never on the driver.
"""

from __future__ import annotations

import tempfile

from raycat.storage import models, rundir

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def merge_lora(
    base: str,
    adapter: str,
    out_dir: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
) -> str:
    """The adapter at ``adapter`` merged into ``base``'s weights, saved (with the adapter's tokenizer)
    as a plain HF model dir at ``out_dir`` (local or URI); returns ``out_dir``. ``base`` and ``adapter``
    may be hub ids, local dirs, URIs or registry names (fetched on this node); ``revision`` and
    ``trust_remote_code`` apply to the base model, as when it was trained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_adapter = models.local(adapter)
    model = AutoModelForCausalLM.from_pretrained(
        models.local(base), revision=revision, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype)
    )
    model = PeftModel.from_pretrained(model, local_adapter).merge_and_unload()
    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        AutoTokenizer.from_pretrained(local_adapter, trust_remote_code=trust_remote_code).save_pretrained(tmp_dir)
        rundir.replace_dir(tmp_dir, out_dir)
    return out_dir


def merge_remote(base: str, adapter: str, out_dir: str, *, dtype: str, params: int, num_cpus: float, **kw) -> str:
    """``merge_lora`` as a Ray task that reserves the memory of two copies of the weights in ``dtype``
    (the base model, and the merged one being written)."""
    import ray

    memory = int(2 * params * _DTYPE_BYTES[dtype])
    task = ray.remote(num_cpus=num_cpus, memory=memory)(merge_lora)
    return ray.get(task.remote(base, adapter, out_dir, dtype=dtype, **kw))
