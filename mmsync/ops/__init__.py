from .sync_bn import SyncBatchNorm, SyncBatchNormFunction

__all__ = ['SyncBatchNorm', 'SyncBatchNormFunction']
