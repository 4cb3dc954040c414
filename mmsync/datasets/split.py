"""How mmengine's ``DefaultSampler`` splits an epoch into steps per rank.

Every rank must take the same number of steps: a rank that runs out early
leaves the others waiting in a collective (SyncBN, DDP) for ever.
"""
import math
from typing import List


def rank_steps(num_samples: int,
               world_size: int,
               batch_size: int,
               rank: int,
               drop_last: bool = False,
               round_up: bool = True) -> int:
    """Steps per epoch of one rank under ``DefaultSampler`` + DataLoader.

    With ``round_up=True`` the sampler repeats samples until every rank holds
    ``ceil(num_samples / world_size)``; with ``round_up=False`` rank r holds
    ``ceil((num_samples - r) / world_size)`` (positions r, r + W, ...), so
    later ranks may hold one sample less and, at a batch boundary, take one
    step less.

    Args:
        num_samples (int): Samples in the data set.
        world_size (int): Ranks W.
        batch_size (int): Samples per rank and step.
        rank (int): The rank, 0..W-1.
        drop_last (bool): The DataLoader drops a short last batch.
            Default: False.
        round_up (bool): The sampler's ``round_up``. Default: True.

    Returns:
        int: Steps per epoch of ``rank``.
    """
    if round_up:
        held = math.ceil(num_samples / world_size)
    else:
        held = max(0, math.ceil((num_samples - rank) / world_size))
    return held // batch_size if drop_last else math.ceil(held / batch_size)


def steps_per_rank(num_samples: int,
                   world_size: int,
                   batch_size: int,
                   drop_last: bool = False,
                   round_up: bool = True) -> List[int]:
    """Steps per epoch of ranks 0..W-1; see :func:`rank_steps`."""
    return [
        rank_steps(num_samples, world_size, batch_size, rank, drop_last,
                   round_up) for rank in range(world_size)
    ]


def max_even_world_size(num_samples: int,
                        world_size: int,
                        batch_size: int,
                        drop_last: bool = False,
                        round_up: bool = True) -> int:
    """The most ranks, up to ``world_size``, that take equal steps (> 0).

    Steps never grow with the rank, so rank 0 and the last rank decide.

    Returns:
        int: That number of ranks, or 0 if not even one rank takes a step.
    """
    for n in range(world_size, 0, -1):
        first, last = (
            rank_steps(num_samples, n, batch_size, rank, drop_last, round_up)
            for rank in (0, n - 1))
        if first == last > 0:
            return n
    return 0
