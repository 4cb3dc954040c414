from .checkpoint import checkpoint_safe_globals, init_model
from .resnet import BasicBlock, ResNetClassifier

__all__ = [
    'BasicBlock', 'ResNetClassifier', 'checkpoint_safe_globals', 'init_model'
]
