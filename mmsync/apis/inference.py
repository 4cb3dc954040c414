"""A trained model from its config and checkpoint, for use outside a run."""
from typing import Optional, Union

import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint

from ..cnn import revert_sync_batchnorm
from ..engine import checkpoint_loading, load_checkpoint_file
from ..registry import MODELS


def init_model(config: Union[str, Config],
               checkpoint: str,
               cfg_options: Optional[dict] = None,
               trust: bool = False) -> nn.Module:
    """Build ``config``'s model on CPU, as plain BN, with trained weights.

    MMSyncBN layers are reverted to BatchNorm, so the model runs in one
    process without a process group, whatever it was trained with.

    Args:
        config (str | Config): Config file or object with a ``model``.
        checkpoint (str): A checkpoint of tools/train.py (or a state_dict).
        cfg_options (dict, optional): Overrides merged into the config.
            Default: None.
        trust (bool): Load the checkpoint with full unpickling.
            Default: False.

    Returns:
        nn.Module: The model in eval mode.

    Raises:
        CheckpointError: The checkpoint cannot be loaded (see
            :func:`mmsync.engine.load_checkpoint_file`).
    """
    cfg = Config.fromfile(config) if isinstance(config, str) else config
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmsync'))
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    load_checkpoint_file(checkpoint, trust, check_only=True)
    with checkpoint_loading(trust):
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    return model.eval()
