"""Splitting work across the processes of `accelerate launch` / `torchrun`: the one shard formula."""


def shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """`[start, stop)` of process `rank`'s contiguous share of `total` items: shares differ by at most one item and
    concatenate, in rank order, to the whole."""
    return total * rank // world_size, total * (rank + 1) // world_size
