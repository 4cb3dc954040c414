from .digits import DigitsDataset
from .metrics import Accuracy
from .split import steps_per_rank

__all__ = ['Accuracy', 'DigitsDataset', 'steps_per_rank']
