"""mmpose's top-down heatmap model with MMSyncBN at world 2 equals one process.

The model comes from mmpose's own config (installed under the package's
``.mim/configs``): ``td-hm_res50_8xb64-210e_coco-256x192.py``, a
TopdownPoseEstimator with a ResNet backbone and a HeatmapHead, made small
(ResNet-18, narrow deconvolutions, no pretrained weights). The backbone's
``norm_cfg`` becomes ``dict(type='MMSyncBN', stats_mode='N')``; HeatmapHead
has no ``norm_cfg`` (it builds ``nn.BatchNorm2d`` after each deconvolution
itself), so its layers are converted by ``mmsync.cnn.convert_sync_batchnorm``,
as ``sync_bn='mmsync'`` of MMSyncRunner does. Two gloo processes hold 1 and 3
of 4 float64 images; the reference is one process with plain BN on all 4,
from the same weights. The loss is a fixed weighted sum of every output of
the BN-bearing parts (the backbone's feature map, the head's heatmaps),
which must equal the reference, as must the sum over ranks of every
parameter's gradient and every running statistic (<= 1e-10 relative).
Needs mmpose 1.3, mmcv's full build and torchvision (.ci/mmpose_env.sh).
"""
import os.path as osp

import pytest
import torch

pytest.importorskip(
    'mmcv.ops',
    reason="needs mmcv's full build (tools/setup/setup_downstream.sh, "
    '.ci/mmpose_env.sh)')
pytest.importorskip(
    'mmpose.models',
    reason='needs mmpose, mmdet and torchvision (.ci/mmpose_env.sh)')

from dist_utils import backward_fixed_loss, run_distributed  # noqa: E402

SPLIT = (1, 3)
IMAGES = sum(SPLIT)
# (height, width): the config's 256x192 aspect at a quarter of its size.
SIZE = (64, 48)
CONFIG = ('body_2d_keypoint/topdown_heatmap/coco/'
          'td-hm_res50_8xb64-210e_coco-256x192.py')
SYNC_NORM = dict(type='MMSyncBN', stats_mode='N')
RTOL = 1e-10


def model_config(sync: bool):
    """mmpose's config's model, small, with MMSyncBN in the backbone where
    ``sync``."""
    import mmpose
    from mmengine.config import Config
    path = osp.join(
        osp.dirname(mmpose.__file__), '.mim', 'configs', *CONFIG.split('/'))
    cfg = Config.fromfile(path).model
    assert 'norm_cfg' not in cfg.head, 'HeatmapHead takes a norm_cfg now'
    cfg.backbone.update(depth=18, norm_eval=False, init_cfg=None)
    if sync:
        cfg.backbone.norm_cfg = SYNC_NORM
    cfg.head.update(in_channels=512, deconv_out_channels=(32, 32, 32))
    return cfg


def build_model(sync: bool, state=None) -> torch.nn.Module:
    """The model from mmpose's registry, float64, in train mode; the head's
    BatchNorm2d layers converted to MMSyncBN where ``sync``."""
    from mmengine.registry import DefaultScope
    from mmpose.registry import MODELS
    from mmpose.utils import register_all_modules

    import mmsync  # noqa: F401  (a config's custom_imports)
    from mmsync.cnn import convert_sync_batchnorm
    register_all_modules(init_default_scope=False)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmpose'):
        model = MODELS.build(model_config(sync))
    if sync:
        model.head = convert_sync_batchnorm(model.head, stats_mode='N')
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.double().train()


def forward(model, images):
    """The backbone's feature maps and the head's heatmaps."""
    feats = model.extract_feat(images)
    return [*feats, model.head(feats)]


def loss_weights(outputs, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outputs
    ]


def share(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank ``rank``'s images of a batch."""
    start = sum(SPLIT[:rank])
    return tensor[start:start + SPLIT[rank]]


def step(model, images, weights):
    """Outputs, gradients of the fixed loss and the running statistics."""
    return backward_fixed_loss(model, forward(model, images), weights)


def synced_step(rank, world_size, state, images, weights):
    from mmsync.ops import SyncBatchNorm
    model = build_model(True, state)
    synced = {
        n: type(m).__name__
        for n, m in model.named_modules() if isinstance(m, SyncBatchNorm)
    }
    mine = [share(w, rank) for w in weights]
    outputs, grads, stats = step(model, share(images, rank), mine)
    return dict(outputs=outputs, grads=grads, stats=stats, synced=synced)


def assert_close(name, value, ref):
    scale = max(float(ref.abs().max()), 1e-30)
    error = float((value - ref).abs().max() / scale)
    assert error <= RTOL, f'{name}: relative error {error:.3e} > {RTOL}'


def test_topdown_heatmap_world2_equals_one_process_with_bn():
    reference = build_model(False)
    plain = sorted(n for n, m in reference.named_modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    # ResNet-18's 20 and the head's 3 (one after each deconvolution).
    assert len(plain) == 23 and sum(n.startswith('head.')
                                    for n in plain) == 3, plain
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    images = torch.randn(IMAGES, 3, *SIZE, generator=g, dtype=torch.float64)
    with torch.no_grad():  # eval: the running statistics stay as they are
        weights = loss_weights(forward(reference.eval(), images))
    ref_out, ref_grads, ref_stats = step(reference.train(), images, weights)
    ranks = run_distributed(
        synced_step, len(SPLIT), state, images, weights, timeout=300)
    for r in ranks:
        assert sorted(r['synced']) == plain, r['synced']
    for i, ref in enumerate(ref_out):
        assert_close(f'output {i}',
                     torch.cat([r['outputs'][i] for r in ranks]), ref)
    assert sorted(ranks[0]['grads']) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        assert_close(f'grad of {name}', sum(r['grads'][name] for r in ranks),
                     ref)
    assert sorted(ranks[0]['stats']) == sorted(ref_stats)
    for name, ref in ref_stats.items():
        for rank, r in enumerate(ranks):
            assert_close(f'rank {rank} {name}', r['stats'][name], ref)
