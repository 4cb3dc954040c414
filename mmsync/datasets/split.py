"""How mmengine's ``DefaultSampler`` splits an epoch into steps per rank.

Every rank must take the same number of steps: a rank that runs out early
leaves the others waiting in a collective (SyncBN, DDP) for ever.
"""
import math
from typing import List


def steps_per_rank(num_samples: int,
                   world_size: int,
                   batch_size: int,
                   drop_last: bool = False,
                   round_up: bool = True) -> List[int]:
    """Steps per epoch of each rank under ``DefaultSampler`` + DataLoader.

    With ``round_up=True`` the sampler repeats samples until every rank holds
    ``ceil(num_samples / world_size)``; with ``round_up=False`` rank r holds
    ``ceil((num_samples - r) / world_size)`` (positions r, r + W, ...), so
    ranks may differ by one sample and, at a batch boundary, by one step.

    Args:
        num_samples (int): Samples in the data set.
        world_size (int): Ranks W.
        batch_size (int): Samples per rank and step.
        drop_last (bool): The DataLoader drops a short last batch.
            Default: False.
        round_up (bool): The sampler's ``round_up``. Default: True.

    Returns:
        list[int]: Steps per epoch of ranks 0..W-1.
    """
    steps = []
    for rank in range(world_size):
        if round_up:
            held = math.ceil(num_samples / world_size)
        else:
            held = max(0, math.ceil((num_samples - rank) / world_size))
        steps.append(held //
                     batch_size if drop_last else math.ceil(held / batch_size))
    return steps
