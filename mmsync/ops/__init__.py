from .sync_bn import (LazySyncBatchNorm, SyncBatchNorm, SyncBatchNormFunction,
                      sync_subgroup)

__all__ = [
    'LazySyncBatchNorm', 'SyncBatchNorm', 'SyncBatchNormFunction',
    'sync_subgroup'
]
