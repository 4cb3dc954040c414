from .sync_bn import BatchNormXd, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ['BatchNormXd', 'convert_sync_batchnorm', 'revert_sync_batchnorm']
