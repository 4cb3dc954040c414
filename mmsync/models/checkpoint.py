"""Load mmengine checkpoints under torch's ``weights_only`` default.

Since torch 2.6 ``torch.load`` unpickles only tensors and allow-listed
globals; a checkpoint written by mmengine's Runner also holds its log history
(``HistoryBuffer`` objects with numpy arrays and bound statistics methods).
"""
from typing import List, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.logging import HistoryBuffer
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint

from ..cnn import revert_sync_batchnorm
from ..registry import MODELS


def checkpoint_safe_globals() -> List:
    """What mmengine's checkpoints pickle besides tensors and containers.

    ``getattr`` rebuilds the bound methods of ``HistoryBuffer``; torch's
    weights-only unpickler still calls nothing that is not in this list.
    """
    return [
        HistoryBuffer,
        getattr,
        np.ndarray,
        np.dtype,
        np.ndarray(0).__reduce__()[0],  # numpy's _reconstruct
        np.float64(0).__reduce__()[0],  # numpy's scalar
    ] + [
        type(np.dtype(name))
        for name in ('float64', 'float32', 'int64', 'int32', 'bool')
    ]


def init_model(config: Union[str, Config],
               checkpoint: str,
               cfg_options: Optional[dict] = None) -> nn.Module:
    """Build ``config``'s model on CPU, as plain BN, with trained weights.

    MMSyncBN layers are reverted to BatchNorm, so the model runs in one
    process without a process group, whatever it was trained with.

    Args:
        config (str | Config): Config file or object with a ``model``.
        checkpoint (str): A checkpoint of tools/train.py (or a state_dict).
        cfg_options (dict, optional): Overrides merged into the config.
            Default: None.

    Returns:
        nn.Module: The model in eval mode.
    """
    cfg = Config.fromfile(config) if isinstance(config, str) else config
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmsync'))
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    return model.eval()
