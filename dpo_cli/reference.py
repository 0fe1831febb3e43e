"""Reference log-probs, computed once per unique sequence and cached on disk (`ref.precompute=true`).

The reference is frozen and runs in eval mode (no dropout), so log pi_ref(y|x) of a sequence is a
constant of the reference weights and the token ids. Before training, every unique sequence the run will
see (its training examples in data order, and the held-out ones) is looked up in the cache and the
missing ones are scored once, in length-sorted batches (little padding; with shared prompts, each prompt
once). The cache is `ref.cache_dir/<key>/part-*.pt`, `key` hashing the reference checkpoint's files and
the numerics (dtype, device, engine); entries are keyed by the exact token ids, so another dataset,
tokenizer or length budget simply misses, and another checkpoint is another directory: a stale value is
never read. Training never runs the reference, and every job of a beta sweep after the first reads the
cache instead of scoring. Each part carries a sha256 of its sequences and values: a part that does not
load or does not match (rewritten, truncated, garbage) is named, removed, and its sequences scored again.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpo_cli import distributed
from dpo_cli.checkpoints import torch_save_atomically
from dpo_cli.data.batches import RefTable, Sequence, TokenizedExample, collate
from dpo_cli.logps import model_token_logps

CACHE_FORMAT = 2  # bump when the scoring or the part format changes meaning (2: a checksum per part)


def unique_sequences(examples: list[TokenizedExample]) -> list[Sequence]:
    return list(dict.fromkeys((ex.prompt_ids, c) for ex in examples for c in ex.completion_ids))


def checkpoint_fingerprint(checkpoint: Path) -> str:
    """sha256 over the checkpoint dir's file names and contents (~1 s for a 135M-parameter model)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(checkpoint).rglob("*") if p.is_file()):
        digest.update(path.relative_to(checkpoint).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def cache_dir_for(cache_root: Path, fingerprint: str, numerics: str) -> Path:
    key = hashlib.sha256(f"{CACHE_FORMAT}|{fingerprint}|{numerics}".encode()).hexdigest()[:24]
    return Path(cache_root) / key


def _checksum(sequences: list, logps: torch.Tensor) -> str:
    digest = hashlib.sha256(json.dumps(sequences).encode())
    digest.update(logps.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_cache(directory: Path) -> RefTable:
    """Every verified entry of the cache `directory`; a damaged part is reported and removed (rank 0), so
    that its sequences count as missing and are scored again."""
    table: RefTable = {}
    for part in sorted(directory.glob("part-*.pt")):
        try:
            entry = torch.load(part, weights_only=True)
            intact = entry["sha256"] == _checksum(entry["sequences"], entry["logps"])
        except Exception as err:  # truncated, garbage, another format: all mean "not this cache's part"
            intact, why = False, f"unreadable: {type(err).__name__}"
        else:
            why = "its checksum does not match its contents"
        if not intact:
            print(f"reference: cache part {part} is damaged ({why}); its sequences are scored again")
            if distributed.is_main():
                part.unlink(missing_ok=True)
            continue
        table.update(zip(map(_as_sequence, entry["sequences"]), entry["logps"].tolist(), strict=True))
    return table


def _as_sequence(row: list | tuple) -> Sequence:
    prompt, completion = row
    return tuple(prompt), tuple(completion)


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module,
    sequences: list[Sequence],
    pad_token_id: int,
    device: torch.device,
    batch_size_sequences: int = 16,
    *,
    share_prompts: bool = False,
) -> torch.Tensor:
    """(N,) float32 log pi(completion | prompt) of every sequence, summed over completion tokens.

    Batches of about `batch_size_sequences` sequences in length order (little padding); with
    `share_prompts`, a prompt's sequences share a batch, where the prompt goes through the model once
    (`collate`).
    """
    groups: dict[object, list[int]] = defaultdict(list)
    for i, (prompt, _) in enumerate(sequences):
        groups[prompt if share_prompts else i].append(i)
    order = sorted(groups.values(), key=lambda g: max(len(sequences[i][0]) + len(sequences[i][1]) for i in g))
    batches: list[list[int]] = []
    for group in order:
        if not batches or len(batches[-1]) >= batch_size_sequences:
            batches.append([])
        batches[-1] += group
    out = torch.empty(len(sequences), dtype=torch.float32)
    for ids in tqdm(batches, desc="reference log-probs", unit="batch", leave=False, disable=None):
        examples = [TokenizedExample(sequences[i][0], (sequences[i][1],)) for i in ids]
        batch = collate(examples, pad_token_id, share_prompts=share_prompts)
        per_token, mask = model_token_logps(model, {k: v.to(device) for k, v in batch.items()})
        # The sequences are unique, so row index[i, 0] holds sequence ids[i].
        out[ids] = (per_token * mask).sum(-1)[batch["index"][:, 0].to(device)].float().cpu()
    return out


def precomputed_table(
    load_reference,
    examples: list[TokenizedExample],
    *,
    directory: Path,
    pad_token_id: int,
    device: torch.device,
    share_prompts: bool = False,
) -> RefTable:
    """log pi_ref of every unique sequence of `examples`: read from the reference's cache `directory`
    (`cache_dir_for`), the missing ones scored with `load_reference()` (called only when some are missing)
    and added to it. Under DeepSpeed every rank scores (a ZeRO-3 reference needs all of them) and rank 0
    writes."""
    sequences = unique_sequences(examples)
    cached = read_cache(directory)
    missing = [s for s in sequences if s not in cached]
    if distributed.all_true(not missing):
        print(f"reference: all {len(sequences)} sequences' log-probs read from {directory}")
        return {s: cached[s] for s in sequences}
    logps = score_sequences(load_reference(), missing, pad_token_id, device, share_prompts=share_prompts)
    if distributed.is_main():
        name = "part-" + hashlib.sha256(repr(missing).encode()).hexdigest()[:16] + ".pt"
        sequences_rows = [list(map(list, s)) for s in missing]
        entry = {"sequences": sequences_rows, "logps": logps, "sha256": _checksum(sequences_rows, logps)}
        torch_save_atomically(entry, directory / name)
    distributed.barrier()
    print(
        f"reference: scored {len(missing)} of {len(sequences)} sequences once "
        f"({len(sequences) - len(missing)} cached); cache: {directory}"
    )
    return {s: cached[s] for s in sequences if s in cached} | dict(zip(missing, logps.tolist(), strict=True))
