from .digits import DigitsDataset
from .metrics import Accuracy
from .split import max_even_world_size, rank_steps, steps_per_rank

__all__ = [
    'Accuracy', 'DigitsDataset', 'max_even_world_size', 'rank_steps',
    'steps_per_rank'
]
