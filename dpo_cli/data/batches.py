"""Examples -> token batches: every unique (prompt, completion) sequence of a batch appears once.

A batch holds the unique sequences of its examples (right-padded; labels of prompt and padding tokens are
-100) and `index`, the (B, K) row of each example's k-th completion: the paper's App. B form, so a
completion shared by several pairs (4 samples -> 6 pairs per prompt) is scored once and the pairs are
gathered by index. Training order: `batch_order` shuffles (by prompt, packed whole with `pack_groups`)
and `train_batches` collates it for a rank; `training_data` is what the training loop gets (this rank's
micro-batches from the step it starts at); `make_batches` gives the fixed held-out batches.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from dpo_cli import distributed
from dpo_cli.config import largest_divisor
from dpo_cli.data import Example
from dpo_cli.data.tokenized import TokenizedExample, TokenizedSet, encode_examples, say_long_prompts
from dpo_cli.errors import ConfigError

Sequence = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, completion ids): a batch row's key
Batch = dict[str, torch.Tensor]  # what collate returns, as the models and losses read it


def sequence_digest(sequence: Sequence) -> bytes:
    """16 bytes naming a sequence's token ids exactly (the prompt's length is hashed, so the same ids cut
    elsewhere differ): what the reference cache keys by, whatever the sequence's length."""
    prompt, completion = sequence
    ids = np.asarray([len(prompt), *prompt, *completion], dtype=np.int64)
    return hashlib.blake2b(ids.tobytes(), digest_size=16).digest()


class RefTable(Mapping):
    """Precomputed reference log-probs: sequence -> log pi_ref(completion | prompt), held by
    `sequence_digest` (a sequence or its digest looks a value up; two tables are equal when they hold the
    same values for the same sequences)."""

    def __init__(self, by_digest: dict[bytes, float] | None = None):
        self.by_digest = by_digest or {}

    @classmethod
    def of(cls, sequences: Iterable[Sequence], logps: Iterable[float]) -> RefTable:
        return cls({sequence_digest(s): v for s, v in zip(sequences, logps, strict=True)})

    def __getitem__(self, key: Sequence | bytes) -> float:
        return self.by_digest[key if isinstance(key, bytes) else sequence_digest(key)]

    def __contains__(self, key: object) -> bool:
        return (key if isinstance(key, bytes) else sequence_digest(key)) in self.by_digest

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.by_digest)

    def __len__(self) -> int:
        return len(self.by_digest)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.by_digest == {k if isinstance(k, bytes) else sequence_digest(k): other[k] for k in other}


def tokenize_examples(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length_tokens: int,
    max_length_tokens: int,
    name: str = "",
) -> list[TokenizedExample]:
    """`encode_examples`, with a note on the prompts it cut; `name` (training / held-out) is what the note
    calls them."""
    budgets = {"max_prompt_length_tokens": max_prompt_length_tokens, "max_length_tokens": max_length_tokens}
    encoded, cut = encode_examples(examples, tokenizer, **budgets)
    long_prompts = {ex[0] for ex, c in zip(examples, cut, strict=True) if c}
    say_long_prompts(len(long_prompts), max_prompt_length_tokens, name)
    return encoded


def collate(
    examples: list[TokenizedExample],
    pad_token_id: int,
    ref_logps: RefTable | None = None,
    *,
    share_prompts: bool = False,
) -> dict[str, torch.Tensor]:
    """The batch of `examples`; with `ref_logps` (precomputed reference log-probs by sequence), also
    `ref_logps`, the reference log-prob of each unique row; with `share_prompts`, also the rows'
    `shared_prompt_layout`, which the models run instead of `input_ids` (see `logps.model_token_logps`)."""
    rows: dict[Sequence, int] = {}
    index = [[rows.setdefault((ex.prompt_ids, c), len(rows)) for c in ex.completion_ids] for ex in examples]
    num_completions = max(len(i) for i in index)
    length = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[row, :n] = torch.tensor(prompt + completion)
        labels[row, len(prompt) : n] = torch.tensor(completion)
        attention_mask[row, :n] = 1
    # Ragged K (rankings of different lengths) pads `index` with row 0 and masks it out.
    index_mask = torch.tensor([[k < len(i) for k in range(num_completions)] for i in index])
    index_tensor = torch.tensor([i + [0] * (num_completions - len(i)) for i in index])
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "index": index_tensor,
        "index_mask": index_mask,
    }
    if examples[0].desirable is not None:
        batch["desirable"] = torch.tensor([ex.desirable for ex in examples])
    if ref_logps is not None:
        batch["ref_logps"] = torch.tensor([ref_logps[row] for row in rows], dtype=torch.float32)
    if share_prompts:
        batch |= shared_prompt_layout(list(rows), pad_token_id)
    return batch


def shared_prompt_layout(sequences: list[Sequence], pad_token_id: int) -> Batch:
    """The sequences packed one prompt a row: the prompt once, then each of its completions.

    A completion attends to its prompt and to itself only (`prompt_attention`, (R, 1, T, T), True where a
    query may see a key) and its positions restart where the prompt ends, so each completion's log-probs
    are those of prompt + completion alone, while the prompt's tokens go through the model once instead
    of once per completion (a pair's prompt: 2x -> 1x; 4 sentiment samples: 4x -> 1x).
    `label_source` gives, for every label token in the row-major order of `labels[:, 1:] != -100`,
    the flat (row * T + position) index of the position whose output predicts it: the prompt's last token
    for a completion's first token, else the token before.
    """
    groups: dict[tuple[int, ...], list[tuple[int, ...]]] = defaultdict(list)
    for prompt, completion in sequences:
        groups[prompt].append(completion)
    length = max(len(prompt) + sum(map(len, completions)) for prompt, completions in groups.items())
    input_ids = torch.full((len(groups), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), length), dtype=torch.long)
    segment = torch.full((len(groups), length), -1)  # -1 padding, 0 prompt, k the k-th completion
    where: dict[Sequence, tuple[int, int]] = {}  # sequence -> (row, offset of its completion)
    for row, (prompt, completions) in enumerate(groups.items()):
        input_ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        position_ids[row, : len(prompt)] = torch.arange(len(prompt))
        segment[row, : len(prompt)] = 0
        offset = len(prompt)
        for k, completion in enumerate(completions, start=1):
            span = slice(offset, offset + len(completion))
            input_ids[row, span] = torch.tensor(completion, dtype=torch.long)
            position_ids[row, span] = torch.arange(len(prompt), len(prompt) + len(completion))
            segment[row, span] = k
            where[(prompt, completion)] = (row, offset)
            offset += len(completion)
    label_source = []
    for prompt, completion in sequences:
        row, offset = where[(prompt, completion)]
        # Sequence position j >= 1 (the label shift drops j = 0) holds completion token j - len(prompt);
        # it is predicted from sequence position j - 1: prompt positions are the same in the packed row,
        # completion positions move by `offset - len(prompt)`.
        for j in range(max(len(prompt), 1), len(prompt) + len(completion)):
            source = j - 1 if j - 1 < len(prompt) else offset + j - 1 - len(prompt)
            label_source.append(row * length + source)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    key, query = segment[:, None, :], segment[:, :, None]
    visible = causal & (key >= 0) & ((key == 0) | (key == query))
    # Every query keeps itself, so a padding row of the mask is never empty (no NaN from softmax).
    visible |= torch.eye(length, dtype=torch.bool)
    return {
        "shared_input_ids": input_ids,
        "shared_position_ids": position_ids,
        "prompt_attention": visible.unsqueeze(1),
        "label_source": torch.tensor(label_source, dtype=torch.long),
    }


def make_batches(
    examples: list[TokenizedExample],
    batch_size: int,
    pad_token_id: int,
    ref_logps: RefTable | None = None,
    *,
    share_prompts: bool = False,
) -> list[Batch]:
    """Fixed, in-order batches (eval): the same examples in the same batches at every eval point."""
    return [
        collate(examples[i : i + batch_size], pad_token_id, ref_logps, share_prompts=share_prompts)
        for i in range(0, len(examples), batch_size)
    ]


def batch_order(
    examples: Sequence_[TokenizedExample], microbatch_size: int, *, seed: int, by_prompt: bool
) -> Iterator[list[int]]:
    """Endless shuffled micro-batches of example indices, epoch after epoch; the last partial micro-batch
    of an epoch is dropped. The order depends on `seed` alone.

    With `by_prompt`, prompts are shuffled and packed whole into micro-batches (`pack_groups`), so the
    pairs of one prompt share a batch and their common completions are scored once (the paper's App. B
    batching: 4 completions make 6 pairs, 4 sequences instead of 12). Prompts are told apart by the
    table's `prompt_key` column, so no example is read to order them.
    """
    generator = torch.Generator().manual_seed(seed)
    keys = TokenizedSet.of(examples).prompt_keys() if by_prompt else np.arange(len(examples))
    # Groups in order of first appearance, each its members in order.
    _, first, group_of = np.unique(keys, return_index=True, return_inverse=True)
    rank_of_group = np.argsort(np.argsort(first))
    order = np.argsort(rank_of_group[group_of], kind="stable")
    sizes = np.bincount(rank_of_group[group_of], minlength=len(first))
    members = [m.tolist() for m in np.split(order, np.cumsum(sizes)[:-1])]
    while True:
        yield from pack_groups(
            [members[g] for g in torch.randperm(len(members), generator=generator)], microbatch_size
        )


def pack_groups(groups: list[list[int]], size: int, lookahead: int = 64) -> Iterator[list[int]]:
    """Micro-batches of exactly `size` items that split as few groups as possible: each batch takes the
    next group plus whole groups among the next `lookahead` that fill it exactly (a small subset sum), or
    else fills up first-fit and splits one group. Every item appears once; a last partial batch is
    dropped."""
    pending = [list(g) for g in groups]
    batch: list[int] = []
    while pending:
        chosen = _exact_fill([len(g) for g in pending[:lookahead]], size - len(batch))
        if chosen is not None:
            batch += [i for k in chosen for i in pending[k]]
            pending = [g for k, g in enumerate(pending) if k not in chosen]
        else:
            space = size - len(batch)
            fit = next((k for k, g in enumerate(pending[:lookahead]) if len(g) <= space), None)
            if fit is None:
                batch += pending[0][:space]
                pending[0] = pending[0][space:]
            else:
                batch += pending.pop(fit)
        if len(batch) == size:
            yield batch
            batch = []


def _exact_fill(sizes: list[int], space: int) -> list[int] | None:
    """Indices of groups, the first included, whose sizes sum to `space`; None if there are none."""
    if not sizes or sizes[0] > space:
        return None
    # reach[total] = indices summing to total (first found), over groups 1.. after group 0.
    reach: dict[int, list[int]] = {sizes[0]: [0]}
    for k in range(1, len(sizes)):
        if space in reach:
            break
        for total, picked in list(reach.items()):
            if total + sizes[k] <= space and total + sizes[k] not in reach:
                reach[total + sizes[k]] = [*picked, k]
    return reach.get(space)


def train_batches(
    examples: list[TokenizedExample],
    microbatch_size: int,
    pad_token_id: int,
    *,
    seed: int,
    by_prompt: bool,
    skip: int = 0,
    rank: int = 0,
    world_size: int = 1,
    ref_logps: RefTable | None = None,
    share_prompts: bool = False,
) -> Iterator[Batch]:
    """The micro-batches of `batch_order`, collated; `skip` drops that many without building them (resume).

    Each batch carries `example_ids`, its examples' indices, to name them when something goes wrong.
    With several ranks, every rank walks the same order and takes every `world_size`-th micro-batch
    (from its `rank`-th on), so one optimizer step sees the examples one process would.
    With `ref_logps` (precomputed reference log-probs), each batch carries its rows' `ref_logps`;
    with `share_prompts`, its shared-prompt layout (`collate`).
    """
    examples = TokenizedSet.of(examples)
    order = batch_order(examples, microbatch_size, seed=seed, by_prompt=by_prompt)
    for position, ids in enumerate(itertools.islice(order, skip, None)):
        if position % world_size == rank:
            batch = collate(examples.take(ids), pad_token_id, ref_logps, share_prompts=share_prompts)
            yield batch | {"example_ids": torch.tensor(ids)}


@dataclass
class TrainData:
    """What the training loop consumes (engine/loop.py)."""

    batches: Iterator[Batch]
    """This rank's micro-batches, endless, from the first step the run has still to do."""
    eval_batches: list[Batch]
    """The held-out batches, the same at every eval point (every rank runs all of them)."""
    num_steps: int
    """Optimizer steps of the whole run."""
    examples: Sequence_[TokenizedExample]
    """The training examples, by the ids batches carry in `example_ids` (to name them in errors)."""

    def state_dict(self) -> None:
        """Nothing to keep in a checkpoint: the order is the seed's, and a resumed run skips to its step."""
        return None

    def load_state_dict(self, state: None) -> None:
        pass


def fit_batch_to_data(cfg: DictConfig, num_examples: int) -> None:
    """A batch larger than the whole training set (a file of a few records) shrinks to the set: to the
    largest multiple of the ranks that fits, its micro-batch to the largest divisor of its per-rank share
    not above the configured one. Said in one line; config.yaml records the batch the run trains with."""
    t, ranks = cfg.trainer, distributed.expected_world_size(cfg)
    if num_examples >= t.batch_size_examples or num_examples < ranks:
        return
    batch = num_examples - num_examples % ranks
    per_rank = batch // ranks
    micro = largest_divisor(per_rank, t.microbatch_size_examples)
    print(
        f"data: {num_examples} training examples, fewer than trainer.batch_size_examples="
        f"{t.batch_size_examples}: batches of {batch} (micro-batches of {micro})"
    )
    t.batch_size_examples, t.microbatch_size_examples = batch, micro


def total_steps(t: DictConfig, num_examples: int) -> int:
    """Optimizer steps of the run: trainer.max_steps, else trainer.num_epochs epochs."""
    steps_per_epoch = num_examples // t.batch_size_examples
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{num_examples} training examples cannot fill one batch of "
            f"trainer.batch_size_examples={t.batch_size_examples}"
        )
    return t.max_steps or t.num_epochs * steps_per_epoch


def visited_examples(examples: Sequence_[TokenizedExample], cfg: DictConfig) -> Iterator[TokenizedExample]:
    """The training examples a run of `cfg` will see, in its data order (all ranks together), read a
    micro-batch at a time."""
    t = cfg.trainer
    examples = TokenizedSet.of(examples)
    microbatches = total_steps(t, len(examples)) * (t.batch_size_examples // t.microbatch_size_examples)
    order = batch_order(examples, t.microbatch_size_examples, seed=cfg.seed, by_prompt=t.batch_by_prompt)
    for ids in itertools.islice(order, microbatches):
        yield from examples.take(ids)


def training_data(
    cfg: DictConfig,
    train: list[TokenizedExample],
    eval_batches: list[Batch],
    pad_token_id: int,
    *,
    start_step: int = 0,
    ref_logps: RefTable | None = None,
    share_prompts: bool = False,
) -> TrainData:
    """The loop's data for a run of `cfg` that has done `start_step` steps: every rank walks the same order
    and takes its share of each step's micro-batches (`train_batches`)."""
    t = cfg.trainer
    batches = train_batches(
        train,
        t.microbatch_size_examples,
        pad_token_id,
        seed=cfg.seed,
        by_prompt=t.batch_by_prompt,
        skip=start_step * (t.batch_size_examples // t.microbatch_size_examples),
        rank=distributed.rank(),
        world_size=distributed.world_size(),
        ref_logps=ref_logps,
        share_prompts=share_prompts,
    )
    return TrainData(batches, eval_batches, total_steps(t, len(train)), train)
