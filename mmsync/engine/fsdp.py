"""Keep batch norms in float32 under FSDP's mixed precision.

A bf16 parameter policy casts every parameter of a sharded unit, the affine
weight and bias of its BatchNorms included, while their running statistics
stay float32: torch's BatchNorm then fails ("Expected running_mean to have
type BFloat16 but got Float", torchtitan#674); MMSyncBN runs, but learns its
weight and bias through bf16 copies and bf16 gradient reductions. The
remedy of both FSDP versions is to give each norm its own unit without the
cast:

- FSDP1 (``FullyShardedDataParallel``) does it by itself for
  ``MixedPrecision._module_classes_to_ignore`` (``_BatchNorm``, which
  MMSyncBN is), but only with an ``auto_wrap_policy``: without one, pass
  :func:`norm_wrap_policy`, which wraps nothing else.
- FSDP2 (``fully_shard``) has no such rule: call :func:`fully_shard_norms`
  before sharding the blocks that hold the norms.
"""
from typing import List

import torch.nn as nn
from mmengine.registry import FUNCTIONS
from torch.nn.modules.batchnorm import _BatchNorm


def norm_wrap_policy(module: nn.Module, recurse: bool,
                     nonwrapped_numel: int) -> bool:
    """FSDP1 ``auto_wrap_policy`` that wraps no module by itself.

    With a ``MixedPrecision`` whose ``_module_classes_to_ignore`` holds
    ``_BatchNorm`` (its default), FSDP then wraps exactly the norms, each
    in its own float32 unit (inputs cast to float32, outputs back), and
    keeps the rest in the unit of the module it wraps. A config names it as
    ``auto_wrap_policy='norm_wrap_policy'``.
    """
    return recurse


FUNCTIONS.register_module(module=norm_wrap_policy, force=True)


def fully_shard_norms(module: nn.Module, **kwargs) -> List[nn.Module]:
    """Apply FSDP2's ``fully_shard`` to every BatchNorm of ``module`` on its
    own, with a mixed precision policy that casts nothing.

    Call it before ``fully_shard`` on the blocks and the root, with the
    same ``mesh`` (and other keyword arguments but ``mp_policy``): the norms'
    weight and bias stay in their own dtype (float32) in forward, backward
    and the gradient reduction, while the blocks around them take the
    blocks' policy. MMSyncBN takes the bf16 activations as they are
    (accumulating in float32) and returns bf16, so no cast is added.

    Args:
        module (nn.Module): The model or block whose norms to shard.
        **kwargs: Passed to ``fully_shard`` (``mesh``,
            ``reshard_after_forward``, ...); not ``mp_policy``.

    Returns:
        list[nn.Module]: The norms sharded.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if 'mp_policy' in kwargs:
        raise TypeError('fully_shard_norms keeps the norms in their own '
                        'dtype: it takes no mp_policy')
    norms = [
        m for m in module.modules() if isinstance(m, _BatchNorm)
        and next(m.parameters(recurse=False), None) is not None
    ]
    for norm in norms:
        fully_shard(norm, mp_policy=MixedPrecisionPolicy(), **kwargs)
    return norms
