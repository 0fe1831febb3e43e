"""The GPU check: bf16-mixed DPO steps on random-init Llama-architecture models of about 0.5B and 1.5B
parameters, with ours (dpo_cli's objective and single-process backend, trainer.precision=bf16-mixed) and
with TRL's DPOTrainer (bf16=True: fp32 weights under autocast) on the same token ids; per side tokens/s
(non-pad tokens of the pairs), MFU and peak GPU memory. FlashAttention-2 when `flash_attn` imports (ours
then runs the padding-free layout, TRL its padding_free=True), else sdpa.

MFU = 8 * N * tokens per step (6N for the policy's forward and backward, 2N for the reference's forward;
N = parameters, the tied LM head once) / seconds per step / peak. Peak: the H200's dense bf16, 989.4 TFLOP/s.

--dry-run: two tiny models on the CPU in fp32 for 2 steps, the same code path (tests/test_gpu_check.py runs
it); TRL's side is skipped when trl is not installed. Run through scripts/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time

H200_BF16_DENSE_FLOPS = 989.4e12
# name -> (hidden, intermediate, layers, heads, kv heads, vocabulary): Qwen2.5-0.5B / 1.5B's shapes.
SIZES = {
    "0.5B": (896, 4864, 24, 14, 2, 151936),
    "1.5B": (1536, 8960, 28, 12, 2, 151936),
    "tiny-a": (32, 96, 2, 4, 2, 300),
    "tiny-b": (48, 128, 2, 4, 2, 300),
}


def build_model(size: str, attention: str, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads, vocab = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        attn_implementation=attention,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def token_pairs(
    vocab: int, pairs: int, prompt_tokens: int, completion_tokens: int, seed: int = 0
) -> list[dict]:
    """Random prompt / chosen / rejected ids (ids >= 3: none is a special token), the same for both sides."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    return [
        {
            "prompt_ids": ids(prompt_tokens),
            "chosen_ids": ids(completion_tokens),
            "rejected_ids": ids(completion_tokens),
        }
        for _ in range(pairs)
    ]


def peak_memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's peak RSS (KiB)


def ours(a: argparse.Namespace, size: str, rows: list[dict], device) -> dict:
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dpo_cli.config import conf_dir, validate
    from dpo_cli.data.batches import TokenizedExample, collate
    from dpo_cli.engine.backends import SingleProcess
    from dpo_cli.engine.loop import to_device
    from dpo_cli.objective import make_objective

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        overrides = ["stage=dpo", "model=tiny", "logger=none", f"trainer.precision={a.precision}",
                     f"trainer.batch_size_examples={a.pairs}", "trainer.optimizer=adamw",
                     "trainer.lr_warmup_steps=0", "lr=1e-6", f"trainer.device={device.type}"]  # fmt: skip
        cfg = compose("config", overrides)
    validate(cfg)
    policy = build_model(size, a.attention).to(device)
    reference = build_model(size, a.attention).to(device).eval().requires_grad_(False)
    backend = SingleProcess(cfg, policy, None, device)
    objective = make_objective(cfg.loss, cfg.beta, reference)
    examples = [
        TokenizedExample(tuple(r["prompt_ids"]), (tuple(r["chosen_ids"]), tuple(r["rejected_ids"])))
        for r in rows
    ]
    micro = cfg.trainer.microbatch_size_examples
    batches = [
        collate(examples[i : i + micro], 0, share_prompts=True) for i in range(0, len(examples), micro)
    ]
    seconds = []
    for _ in range(a.steps):
        started = time.perf_counter()
        for batch in batches:
            with backend.autocast():
                loss, _ = objective(backend.module, to_device(batch, device))
            backend.backward(loss)
        backend.step(apply=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return {"seconds": seconds, "loss": loss.item(), "peak_memory_gib": peak_memory_gib(device)}


def trl(a: argparse.Namespace, size: str, rows: list[dict], device) -> dict | None:
    try:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return None
    import torch
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    from dpo_cli.models import tiny_tokenizer

    seconds: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - self.started)

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already token ids

    tokenizer: PreTrainedTokenizerFast = tiny_tokenizer()  # ids only: never used to encode
    config = DPOConfig(
        output_dir=a.output_dir, per_device_train_batch_size=a.pairs, max_steps=a.steps, learning_rate=1e-6,
        lr_scheduler_type="constant", warmup_steps=0, beta=0.1, loss_type=["sigmoid"], max_length=None,
        bf16=a.precision == "bf16-mixed", use_cpu=device.type == "cpu", gradient_checkpointing=False,
        padding_free=a.attention == "flash_attention_2", logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, optim="adamw_torch_fused", max_grad_norm=10.0,
    )  # fmt: skip
    policy, reference = build_model(size, a.attention), build_model(size, a.attention)
    trainer = Trainer(policy, reference, config, train_dataset=Dataset.from_list(rows * a.steps),
                      processing_class=tokenizer, callbacks=[Timer()])  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"seconds": seconds, "peak_memory_gib": peak_memory_gib(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models, CPU, fp32, 2 steps")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--completion-tokens", type=int, default=256)
    parser.add_argument(
        "--steps", type=int, default=6, help="optimizer steps per side (the first is warm-up)"
    )
    parser.add_argument("--output-dir", default=os.environ.get("OUT", "/tmp") + "/gpu_check_trl")
    a = parser.parse_args()
    import torch

    if a.dry_run:
        sizes, device, a.precision = ["tiny-a", "tiny-b"], torch.device("cpu"), "32-true"
        a.steps, a.prompt_tokens, a.completion_tokens, a.pairs = 2, 8, 8, 4
    else:
        sizes, device, a.precision = ["0.5B", "1.5B"], torch.device("cuda"), "bf16-mixed"
    try:
        import flash_attn  # noqa: F401

        a.attention = "flash_attention_2" if device.type == "cuda" else "sdpa"
    except ImportError:
        a.attention = "sdpa"
    print(f"gpu_check: device {device}, precision {a.precision}, attention {a.attention}", flush=True)
    for size in sizes:
        rows = token_pairs(SIZES[size][-1], a.pairs, a.prompt_tokens, a.completion_tokens)
        parameters = sum(p.numel() for p in build_model(size, "sdpa").parameters())
        tokens = a.pairs * (
            a.prompt_tokens * 2 + a.completion_tokens * 2
        )  # a pair: two prompt + completion rows
        for side, run in (("ours", ours), ("trl", trl)):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            result = run(a, size, rows, device)
            if result is None:
                print(f"gpu_check: {size} {side}: skipped (trl or datasets not installed)", flush=True)
                continue
            timed = result["seconds"][1:] or result["seconds"]
            per_step = sum(timed) / len(timed)
            line = {
                "size": size,
                "side": side,
                "parameters": parameters,
                "tokens_per_second": round(tokens / per_step, 1),
                "mfu": float(f"{8 * parameters * tokens / per_step / H200_BF16_DENSE_FLOPS:.4g}"),
                "peak_memory_gib": round(result["peak_memory_gib"], 2),
                "seconds_per_step": round(per_step, 4),
            }
            print("gpu_check: " + json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
