"""Every choice a config key can take, as an Enum: the one list of stages, losses, data adapters, ...

Each member's name is its value (tests/test_config.py checks it): OmegaConf turns `key=name`, an override or
a YAML value, into a member by name and refuses any other value at compose time. The members are strings,
so `cfg.trainer.engine == "deepspeed"`, f-strings and JSON see the plain value. A YAML file must quote
`"on"` and `"off"` (YAML reads them as booleans); on the command line `trainer.lean_memory=on` works.
"""

from __future__ import annotations

from enum import Enum

try:
    from enum import StrEnum
except ImportError:  # Python 3.10

    class StrEnum(str, Enum):  # type: ignore[no-redef]
        """enum.StrEnum of Python 3.11: str() and format() give the value."""

        __str__ = str.__str__
        __format__ = str.__format__


class Stage(StrEnum):
    """`dpo-run <stage>`; each has conf/stage/<stage>.yaml and an entry in dpo_cli.cli.STAGES."""

    sft = "sft"
    dpo = "dpo"
    prefs = "prefs"
    eval = "eval"
    winrate = "winrate"
    rm = "rm"
    ppo = "ppo"


class Loss(StrEnum):
    """`loss=<name>`; each has conf/loss/<name>.yaml and an entry in dpo_cli.losses.LOSSES."""

    sft = "sft"
    dpo = "dpo"
    ipo = "ipo"
    cdpo = "cdpo"
    hinge = "hinge"
    robust = "robust"
    exo_pair = "exo_pair"
    nca_pair = "nca_pair"
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    aot = "aot"
    aot_unpaired = "aot_unpaired"
    apo_zero = "apo_zero"
    apo_down = "apo_down"
    discopop = "discopop"
    sigmoid_norm = "sigmoid_norm"
    simpo = "simpo"
    orpo = "orpo"
    dpop = "dpop"
    preferred_ft = "preferred_ft"
    unlikelihood = "unlikelihood"
    plackett_luce = "plackett_luce"
    kto = "kto"


class PeftName(StrEnum):
    """`peft=<name>`: conf/peft/<name>.yaml."""

    none = "none"
    lora = "lora"
    qlora = "qlora"


class DataName(StrEnum):
    """`data=<name>`: the adapters of dpo_cli.data.ADAPTERS."""

    sentiment = "sentiment"
    jsonl = "jsonl"
    hh = "hh"
    tldr = "tldr"
    shp = "shp"
    imdb = "imdb"
    ultrafeedback = "ultrafeedback"
    hub = "hub"


HUB_DATASETS = frozenset(
    {DataName.hh, DataName.tldr, DataName.shp, DataName.imdb, DataName.ultrafeedback, DataName.hub}
)
"""The adapters that read a Hugging Face dataset (dpo_cli.data.hub.HUB_ADAPTERS)."""


class TinyArchitecture(StrEnum):
    """`model.tiny_architecture`: the transformers model type of the random-init `tiny` model."""

    llama = "llama"
    qwen2 = "qwen2"
    mistral = "mistral"
    gemma2 = "gemma2"
    gemma3_text = "gemma3_text"
    phi3 = "phi3"
    gpt_neox = "gpt_neox"  # Pythia, the paper's HH model
    gptj = "gptj"  # GPT-J, the paper's TL;DR model
    gpt2 = "gpt2"  # GPT-2, the paper's IMDb model


class DataFormat(StrEnum):
    """`data.format`: how a hub adapter that can give either renders its dialogues."""

    text = "text"
    chat = "chat"


class Engine(StrEnum):
    single = "single"
    deepspeed = "deepspeed"


class Optimizer(StrEnum):
    rmsprop = "rmsprop"
    adamw = "adamw"


class LeanMemory(StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


class LrSchedule(StrEnum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


# trainer.precision (Lightning's names, which are not Python identifiers: a plain tuple, checked in
# TrainerConfig.problems): the weights' dtype, and the dtype forward passes compute in.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")


class NanPolicy(StrEnum):
    stop = "stop"
    skip_batch = "skip_batch"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Offload(StrEnum):
    none = "none"
    cpu = "cpu"


class LoggerName(StrEnum):
    wandb = "wandb"
    tensorboard = "tensorboard"
    none = "none"


class LoggerMode(StrEnum):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


class RewardName(StrEnum):
    vader = "vader"
    hf_classifier = "hf_classifier"
    model = "model"


class PPOAlgorithm(StrEnum):
    """`dpo-run ppo ppo.algorithm=...`."""

    ppo = "ppo"
    rloo = "rloo"


class JudgeName(StrEnum):
    openai = "openai"
    reward = "reward"


class JudgeTemplate(StrEnum):
    auto = "auto"
    summary = "summary"
    dialogue = "dialogue"


class Method(StrEnum):
    """`dpo-run winrate method=...`."""

    policy = "policy"
    best_of_n = "best_of_n"
