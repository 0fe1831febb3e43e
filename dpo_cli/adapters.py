"""LoRA and QLoRA (peft): the trainable adapter, the reference it leaves behind, and the merged export.

With `peft=lora` a stage trains a new LoRA adapter on the model it starts from (the preset for `sft`, the
SFT checkpoint for `dpo`), whose weights stay frozen. That frozen model is exactly DPO's reference, so
the reference is the policy with its adapter disabled (`ReferenceView`): no second copy of the weights,
and the first DPO loss is log 2. `peft=qlora` loads the frozen base in 4-bit NF4 (bitsandbytes) and
trains the adapter in `peft.compute_dtype`; its export merges the adapter into the base in full
precision, loaded anew from the checkpoint it started from (merging into the dequantised 4-bit weights
loses accuracy).

`final/` is a plain merged Hugging Face model dir, so every later stage loads it as before; the adapter
itself is in `final/adapter/` (`PeftModel.from_pretrained(<the model the stage started from>, ...)`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_cli.errors import ConfigError


def wanted(cfg: DictConfig) -> bool:
    return cfg.peft.name != "none"


def lora_config(p: DictConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        # peft's "all-linear": every linear layer but the LM head.
        target_modules=list(p.target_modules) if p.target_modules else "all-linear",
        modules_to_save=list(p.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def quantization(cfg: DictConfig):
    """The quantization config `models.load_model` loads the base with: bitsandbytes' 4-bit NF4 for
    peft=qlora (refused in one line where bitsandbytes is missing), else None."""
    if cfg.peft.name != "qlora":
        return None
    p = cfg.peft
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise ConfigError(
            "peft=qlora needs bitsandbytes (pip install -c scripts/constraints.txt -e '.[qlora]'); "
            f"it could not be imported here: {err}"
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=p.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, p.compute_dtype),
    )


def wrap(model: PreTrainedModel, cfg: DictConfig) -> PreTrainedModel:
    """`model` with a new LoRA adapter (its own weights frozen); prints the trainable parameters."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.peft.name == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(cfg.peft))
    trainable, total = count_parameters(model)
    print(f"peft={cfg.peft.name}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.2%})")
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, tied weights counted once (ZeRO-3's partitioned ones at full size)."""
    params = {id(p): p for p in model.parameters()}.values()
    size = {id(p): getattr(p, "ds_numel", p.numel()) for p in params}
    return sum(size[id(p)] for p in params if p.requires_grad), sum(size.values())


def is_adapted(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(getattr(model, "module", model), PeftModel)


class ReferenceView(torch.nn.Module):
    """The frozen model under a LoRA policy: every forward runs with the adapter disabled. Shares the
    policy's weights (nothing is copied); `logps.model_token_logps` reaches its transformer through
    `transformer()` and `disabled()`, so the chunked LM head serves it too."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy  # a PeftModel, or the DeepSpeed engine around one

    def peft_model(self):
        return getattr(self.policy, "module", self.policy)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The frozen model: adapter off, and in eval mode (no dropout) as a reference must be."""
        model = self.peft_model()
        training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                yield
        finally:
            model.train(training)

    def transformer(self) -> PreTrainedModel:
        return self.peft_model().get_base_model()

    def forward(self, **inputs):
        with torch.no_grad(), self.disabled():
            return self.policy(**inputs)

    def generate(self, **kwargs):
        with self.disabled():
            return self.peft_model().generate(**kwargs)

    @property
    def config(self):
        return self.transformer().config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer().dtype


def merged_writer(
    model: torch.nn.Module,
    adapter_state: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    load_base: Callable[[], PreTrainedModel],
) -> Callable[[Path], None]:
    """What `checkpoints.write_atomically` writes as `final/`: the adapter merged into the base it was
    trained on, loaded anew in full precision by `load_base()`, as a plain model dir, and the adapter
    itself in `adapter/`."""
    from peft import get_peft_model, set_peft_model_state_dict

    peft_config = getattr(model, "module", model).peft_config["default"]

    def write(tmp: Path) -> None:
        fresh = get_peft_model(load_base(), peft_config)
        set_peft_model_state_dict(fresh, adapter_state)
        fresh.save_pretrained(tmp / "adapter")
        tokenizer.save_pretrained(tmp / "adapter")
        fresh.merge_and_unload().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write
