from .sync_bn import SyncBatchNorm, SyncBatchNormFunction, sync_subgroup

__all__ = ['SyncBatchNorm', 'SyncBatchNormFunction', 'sync_subgroup']
