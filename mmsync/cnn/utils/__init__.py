from .runner import MMSyncRunner, sync_bn_options
from .sync_bn import BatchNormXd, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = [
    'BatchNormXd', 'MMSyncRunner', 'convert_sync_batchnorm',
    'revert_sync_batchnorm', 'sync_bn_options'
]
