"""Deterministic bucketed batches: the data position is (epoch, batch index), so a resumed run
sees exactly the batches the uninterrupted run would have seen."""

from __future__ import annotations

import random
from collections import defaultdict


def epoch_batches(buckets: list[tuple[int, int]], batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """Batches of item indices for one rank in one epoch.

    ``buckets[i]`` is item i's (width, height). Items are shuffled with (seed, epoch), grouped
    by bucket so each batch has one size, cut into batches (a bucket's last short batch is
    kept), and the batches shuffled again; rank r takes batches r, r+world, ... and every rank
    gets the same number (the remainder is dropped), as DDP needs.
    """
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(buckets)))
    rng.shuffle(order)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in order:
        groups[tuple(buckets[i])].append(i)
    batches = [idx[s:s + batch_size] for _, idx in sorted(groups.items()) for s in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    per_rank = len(batches) // world
    return batches[rank::world][:per_rank]


def batches_per_epoch(buckets: list[tuple[int, int]], batch_size: int, world: int) -> int:
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for b in buckets:
        counts[tuple(b)] += 1
    return sum(-(-n // batch_size) for n in counts.values()) // world


def position(step_micro: int, per_epoch: int) -> tuple[int, int]:
    """(epoch, batch index in the epoch) of the ``step_micro``-th micro-batch of a rank."""
    if per_epoch <= 0:
        raise ValueError("no full batch per rank: fewer batches than workers; lower train.batch_size or scaling.num_workers")
    return divmod(step_micro, per_epoch)
