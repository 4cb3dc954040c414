from .resnet import BasicBlock, ResNetClassifier

__all__ = ['BasicBlock', 'ResNetClassifier']
