"""Reference log-probs, computed once per unique sequence and cached on disk (`ref.precompute=true`).

The reference is frozen and runs in eval mode (no dropout), so log pi_ref(y|x) of a sequence is a
constant of the reference weights and the token ids. Before training, every unique sequence the run will
see (its training examples in data order, and the held-out ones) is looked up in the cache and the
missing ones are scored once, in length-sorted batches (little padding; with shared prompts, each prompt
once). The cache is `ref.cache_dir/<key>/part-*.pt`, `key` hashing the reference checkpoint's files and
the numerics (dtype, device, engine); entries are keyed by a 16-byte digest of the exact token ids
(`sequence_digest`), so another dataset, tokenizer or length budget simply misses, and another checkpoint
is another directory: a stale value is never read. A part holds its digests sorted and their values,
20 bytes a sequence; it is memory-mapped and only the entries the run looks up are read from it.
Training never runs the reference, and every job of a beta sweep after the first reads the cache instead
of scoring. Each part carries a sha256 of its digests and values: a part that does not load or does not
match (rewritten, truncated, garbage) is named, removed, and its sequences scored again.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dpo_cli import distributed
from dpo_cli.checkpoints import torch_save_atomically
from dpo_cli.data.batches import RefTable, Sequence, TokenizedExample, collate, sequence_digest
from dpo_cli.logps import model_token_logps

CACHE_FORMAT = 3  # bump when the scoring or the part format changes meaning (3: digests, not token ids)
CHUNK_SEQUENCES = 65536  # sequences looked up and scored at a time: what a run holds in memory at once


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


def _checksum(digests: np.ndarray, logps: torch.Tensor) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(digests).tobytes())
    digest.update(logps.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_cache(directory: Path, wanted: list[bytes]) -> dict[bytes, float]:
    """The values of the `wanted` digests that the cache `directory` holds, read from each verified part
    (memory-mapped: the rest of a part stays on disk). A damaged part is reported and removed (rank 0), so
    that its sequences count as missing and are scored again."""
    found: dict[bytes, float] = {}
    keys = np.array(wanted, dtype="S16")
    for part in sorted(directory.glob("part-*.pt")):
        try:
            entry = torch.load(part, weights_only=True, mmap=True)
            digests = entry["digests"].numpy().view("S16").ravel()
            intact = entry["sha256"] == _checksum(digests, entry["logps"])
        except Exception as err:  # truncated, garbage, another format: all mean "not this cache's part"
            intact, why = False, f"unreadable: {type(err).__name__}"
        else:
            why = "its checksum does not match its contents"
        if not intact:
            print(f"reference: cache part {part} is damaged ({why}); its sequences are scored again")
            if distributed.is_main():
                part.unlink(missing_ok=True)
            continue
        if not len(keys) or not len(digests):
            continue
        # 16-byte strings of equal length compare as their bytes: the sorted digests are searched.
        at = np.minimum(np.searchsorted(digests, keys), len(digests) - 1)
        hit = digests[at] == keys
        # By position in `wanted`: numpy drops a digest's trailing zero bytes when it hands one back.
        values = entry["logps"][torch.from_numpy(at[hit])].tolist()
        found.update(zip((wanted[i] for i in np.flatnonzero(hit)), values, strict=True))
    return found


def _write_part(directory: Path, digests: list[bytes], logps: torch.Tensor) -> None:
    order = np.argsort(np.array(digests, dtype="S16"), kind="stable")
    keys = np.array(digests, dtype="S16")[order]
    values = logps[torch.from_numpy(order)].contiguous()
    table = torch.from_numpy(keys.view(np.uint8).reshape(-1, 16).copy())
    entry = {"digests": table, "logps": values, "sha256": _checksum(keys, values)}
    name = "part-" + hashlib.sha256(keys.tobytes()).hexdigest()[:16] + ".pt"
    torch_save_atomically(entry, directory / name)


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
    examples: Iterable[TokenizedExample],
    *,
    directory: Path,
    pad_token_id: int,
    device: torch.device,
    share_prompts: bool = False,
) -> RefTable:
    """log pi_ref of every unique sequence of `examples`: read from the reference's cache `directory`
    (`cache_dir_for`), the missing ones scored with `load_reference()` (called only when some are missing)
    and added to it, `CHUNK_SEQUENCES` at a time. Under DeepSpeed every rank scores (a ZeRO-3 reference
    needs all of them) and rank 0 writes."""
    table, reference = RefTable(), None
    total = scored = 0
    for sequences in _chunks(examples):
        digests = [sequence_digest(s) for s in sequences]
        cached = read_cache(directory, digests)
        missing = [i for i, d in enumerate(digests) if d not in cached]
        table.by_digest.update(cached)
        total, scored = total + len(sequences), scored + len(missing)
        if distributed.all_true(not missing):
            continue
        if reference is None:
            reference = load_reference()
        logps = score_sequences(
            reference, [sequences[i] for i in missing], pad_token_id, device, share_prompts=share_prompts
        )
        missing_digests = [digests[i] for i in missing]
        if distributed.is_main() and missing:
            _write_part(directory, missing_digests, logps)
        distributed.barrier()
        table.by_digest.update(zip(missing_digests, logps.tolist(), strict=True))
    if not scored:
        print(f"reference: all {total} sequences' log-probs read from {directory}")
    else:
        print(
            f"reference: scored {scored} of {total} sequences once ({total - scored} cached); cache: "
            f"{directory}"
        )
    return table


def _chunks(examples: Iterable[TokenizedExample]) -> Iterator[list[Sequence]]:
    """The unique sequences of `examples`, in order, `CHUNK_SEQUENCES` at a time."""
    seen: set[bytes] = set()
    chunk: list[Sequence] = []
    for example in examples:
        for completion in example.completion_ids:
            sequence = (example.prompt_ids, completion)
            digest = sequence_digest(sequence)
            if digest not in seen:
                seen.add(digest)
                chunk.append(sequence)
        if len(chunk) >= CHUNK_SEQUENCES:
            yield chunk
            chunk = []
    yield chunk
