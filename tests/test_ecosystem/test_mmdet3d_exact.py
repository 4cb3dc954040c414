"""mmdet3d's PointPillars with MMSyncBN at world 2 equals one process, and
mmdet3d's own ``naiveSyncBN1d/2d`` does not.

The model comes from mmdet3d's installed base config
(``_base_/models/pointpillars_hv_secfpn_kitti.py``), made small (a 20 m x
20 m grid of 0.32 m pillars, narrow SECOND and SECONDFPN), with the norm of
its three BN-bearing parts (PillarFeatureNet's BN1d on (pillars, C, points),
SECOND's and SECONDFPN's BN2d) set by ``norm_cfg``. Four point clouds of
different densities are voxelized by mmcv's CPU voxelization; two gloo
processes hold two clouds each, so their pillar counts differ. The reference
is one process with plain BN on all four. With ``dict(type='MMSyncBN',
stats_mode='N')`` every output of the BN-bearing parts and of the head, the
sum over ranks of every parameter's gradient for a fixed loss, and every
running statistic equal the reference (float64, <= 1e-10 relative).

mmdet3d's ``naiveSyncBN*`` averages per-rank means as if every rank held as
many values, and keeps a biased running variance: the same run in float32
(``naiveSyncBN2d`` takes nothing else) is measured against the float64
reference beside MMSyncBN in float32, whose error is that of rounding alone.
With 2795 and 667 pillars on the two ranks, naiveSyncBN's pillar features are
off by about 10 % of their largest value (``pytest -s`` prints the sizes).
"""
import os.path as osp

import pytest
import torch

pytest.importorskip(
    'mmcv.ops',
    reason="needs mmcv's full build (tools/setup/setup_downstream.sh)")
pytest.importorskip(
    'mmdet3d.models',
    reason='needs mmdet3d and what it imports '
    '(tools/setup/setup_downstream.sh)')

from dist_utils import backward_fixed_loss, run_distributed  # noqa: E402

SPLIT = (2, 2)
CLOUDS = sum(SPLIT)
POINTS = (3000, 2500, 300, 500)  # per cloud: dense on rank 0, sparse on 1
RANGE = [0, -10.24, -3, 20.48, 10.24, 1]
VOXEL = [0.32, 0.32, 4]
RTOL = 1e-10


def norm(kind: str, dim: int) -> dict:
    """mmdet3d's own eps and momentum for PointPillars' norm layers."""
    if kind == 'MMSyncBN':
        cfg = dict(type='MMSyncBN', stats_mode='N')
    elif kind == 'naive':
        cfg = dict(type=f'naiveSyncBN{dim}d')
    else:
        cfg = dict(type=f'BN{dim}d')
    return dict(cfg, eps=1e-3, momentum=0.01)


def model_config(kind: str):
    """PointPillars from mmdet3d's base config, small, ``kind`` norms."""
    import mmdet3d
    from mmengine.config import Config
    path = osp.join(
        osp.dirname(mmdet3d.__file__), '.mim', 'configs', '_base_', 'models',
        'pointpillars_hv_secfpn_kitti.py')
    cfg = Config.fromfile(path).model
    cfg.data_preprocessor.voxel_layer.update(
        point_cloud_range=RANGE, voxel_size=VOXEL, max_num_points=16)
    cfg.voxel_encoder.update(
        feat_channels=[16],
        voxel_size=VOXEL,
        point_cloud_range=RANGE,
        norm_cfg=norm(kind, 1))
    cfg.middle_encoder.update(in_channels=16, output_shape=[64, 64])
    cfg.backbone.update(
        in_channels=16,
        layer_nums=[1, 2, 2],
        out_channels=[16, 32, 32],
        norm_cfg=norm(kind, 2))
    cfg.neck.update(
        in_channels=[16, 32, 32],
        out_channels=[16, 16, 16],
        norm_cfg=norm(kind, 2))
    cfg.bbox_head.update(in_channels=48, feat_channels=48)
    for ranges in cfg.bbox_head.anchor_generator.ranges:
        ranges[:2], ranges[3:5] = RANGE[:2], RANGE[3:5]
    return cfg


def build_model(kind: str, dtype, state=None) -> torch.nn.Module:
    """The model from mmdet3d's registry, in train mode."""
    from mmdet3d.registry import MODELS
    from mmdet3d.utils import register_all_modules
    from mmengine.registry import DefaultScope

    import mmsync  # noqa: F401  (a config's custom_imports)
    register_all_modules(init_default_scope=False)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet3d'):
        model = MODELS.build(model_config(kind))
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.to(dtype).train()


def clouds():
    """Four point clouds (x, y, z, intensity) of different densities, each
    voxelized by mmcv's CPU voxelization as the model's data preprocessor
    does: (voxels, points per voxel, voxel coordinates) per cloud."""
    from mmcv.ops import Voxelization
    layer = Voxelization(VOXEL, RANGE, max_num_points=16, max_voxels=20000)
    g = torch.Generator().manual_seed(2)
    low = torch.tensor(RANGE[:3] + [0.0])
    high = torch.tensor(RANGE[3:] + [1.0])
    out = []
    for n in POINTS:
        # Denser near a few centres, as objects make a lidar scan.
        centres = low[:2] + torch.rand(4, 2, generator=g) * (high - low)[:2]
        points = low + torch.rand(n, 4, generator=g) * (high - low)
        near = torch.rand(n, generator=g) < 0.6
        pick = centres[torch.randint(0, 4, (n, ), generator=g)]
        points[near, :2] = (
            pick[near] + torch.randn(int(near.sum()), 2, generator=g)).clamp(
                low[:2], high[:2] - 1e-3)
        out.append(layer(points))
    return out


def batch(voxelized, dtype):
    """The clouds as one batch: their voxels concatenated, the batch index
    first in each voxel's coordinates."""
    voxels = torch.cat([v for v, _, _ in voxelized]).to(dtype)
    num_points = torch.cat([n for _, _, n in voxelized])
    coors = torch.cat([
        torch.nn.functional.pad(c, (1, 0), value=i)
        for i, (_, c, _) in enumerate(voxelized)
    ])
    return voxels, num_points, coors, len(voxelized)


def forward(model, voxels, num_points, coors, batch_size):
    """Every output of the BN-bearing parts and of the head: the pillars'
    features (pillars along dim 0), then maps with the clouds along dim 0.
    PillarFeatureNet (``legacy=True``, its default) writes into the voxels
    it is given: each forward gets a copy."""
    pillars = model.voxel_encoder(voxels.clone(), num_points, coors)
    canvas = model.middle_encoder(pillars, coors, batch_size)
    feats = model.backbone(canvas)
    neck = model.neck(feats)
    cls_scores, bbox_preds, dir_preds = model.bbox_head(neck)
    return [pillars, *feats, *neck, *cls_scores, *bbox_preds, *dir_preds]


def share(tensor, rank, pillars):
    """Rank ``rank``'s rows: pillars by the clouds' pillar counts, maps by
    cloud."""
    rows = pillars if tensor.shape[0] == sum(pillars) else [1] * CLOUDS
    first = sum(SPLIT[:rank])
    start = sum(rows[:first])
    return tensor[start:start + sum(rows[first:first + SPLIT[rank]])]


def step(model, inputs, weights):
    """Outputs, gradients of the fixed loss and the running statistics."""
    return backward_fixed_loss(model, forward(model, *inputs), weights)


def ranked_step(rank, world_size, state, voxelized, weights):
    """This rank's clouds through the model with MMSyncBN in float64 and in
    float32, and with mmdet3d's naiveSyncBN in float32."""
    from mmdet3d.models.layers.norm import (NaiveSyncBatchNorm1d,
                                            NaiveSyncBatchNorm2d)

    from mmsync.ops import SyncBatchNorm
    first = sum(SPLIT[:rank])
    mine = voxelized[first:first + SPLIT[rank]]
    pillars = [len(v) for v, _, _ in voxelized]
    my_weights = [share(w, rank, pillars) for w in weights]
    out = {}
    for name, kind, dtype, cls in [
        ('mmsync', 'MMSyncBN', torch.float64, SyncBatchNorm),
        ('mmsync32', 'MMSyncBN', torch.float32, SyncBatchNorm),
        ('naive32', 'naive', torch.float32, (NaiveSyncBatchNorm1d,
                                             NaiveSyncBatchNorm2d)),
    ]:
        model = build_model(kind, dtype, state)
        layers = sum(isinstance(m, cls) for m in model.modules())
        outputs, grads, stats = step(model, batch(mine, dtype), my_weights)
        out[name] = dict(
            outputs=outputs, grads=grads, stats=stats, layers=layers)
    return out


def relative_error(value, ref, scale=None):
    """Largest difference relative to ``ref``'s largest magnitude (or to
    ``scale`` where that is larger)."""
    scale = max(float(ref.abs().max()), scale or 0.0, 1e-30)
    return float((value - ref).abs().max() / scale)


def errors(ranks, ref_out, ref_grads, ref_stats):
    """The largest relative error of each kind: outputs (the ranks'
    concatenated), gradients (summed over ranks), running statistics (every
    rank's)."""
    worst = dict(outputs=(0.0, ''), grads=(0.0, ''), stats=(0.0, ''))

    def note(kind, name, error):
        if error >= worst[kind][0]:
            worst[kind] = (error, name)

    for i, ref in enumerate(ref_out):
        note('outputs', f'output {i}',
             relative_error(torch.cat([r['outputs'][i] for r in ranks]), ref))
    assert sorted(ranks[0]['grads']) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        note('grads', name,
             relative_error(sum(r['grads'][name] for r in ranks), ref))
    assert sorted(ranks[0]['stats']) == sorted(ref_stats)
    for name, ref in ref_stats.items():
        std = None
        if name.endswith('running_mean'):
            var = name[:-len('running_mean')] + 'running_var'
            std = float(ref_stats[var].sqrt().max())
        for r in ranks:
            note('stats', name, relative_error(r['stats'][name], ref, std))
    return worst


def test_pointpillars_world2_unequal_pillars():
    reference = build_model('BN', torch.float64)
    plain = sum(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for m in reference.modules())
    assert plain == 12, plain  # 1 in the PFN, 8 in SECOND, 3 in the FPN
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    voxelized = clouds()
    pillars = [len(v) for v, _, _ in voxelized]
    per_rank = [sum(pillars[:2]), sum(pillars[2:])]
    assert per_rank[0] != per_rank[1], pillars
    inputs = batch(voxelized, torch.float64)
    with torch.no_grad():  # eval: the running statistics stay as they are
        g = torch.Generator().manual_seed(5)
        weights = [
            torch.randn(o.shape, generator=g, dtype=torch.float64)
            for o in forward(reference.eval(), *inputs)
        ]
    ref = step(reference.train(), inputs, weights)
    ranks = run_distributed(
        ranked_step, len(SPLIT), state, voxelized, weights, timeout=400)

    results = {}
    for name in ('mmsync', 'mmsync32', 'naive32'):
        got = [r[name] for r in ranks]
        assert all(g['layers'] == plain for g in got), (name, got[0]['layers'])
        results[name] = errors(got, *ref)
    print(f'\npillars per rank {per_rank}, per cloud {pillars}')
    for name, worst in results.items():
        print(
            name, ', '.join(f'{k} {e:.2e} ({where})'
                            for k, (e, where) in worst.items()))
    for kind, (error, where) in results['mmsync'].items():
        assert error <= RTOL, f'MMSyncBN {kind}: {where} {error:.3e} > {RTOL}'
    # naiveSyncBN's statistics are not those of the whole batch: beside
    # float32's own error (MMSyncBN in float32 against the same float64
    # reference), its errors are orders of magnitude larger. Gradients get
    # the smallest margin: BN's backward cancels most of what reaches a
    # layer's input, which float32 resolves to ~1e-2 of the result here.
    margins = dict(outputs=1000, stats=100, grads=10)
    for kind, margin in margins.items():
        naive, where = results['naive32'][kind]
        rounding = results['mmsync32'][kind][0]
        assert naive > margin * rounding, (
            f'naiveSyncBN {kind}: {where} {naive:.3e} is within {margin}x of '
            f'float32 rounding ({rounding:.3e})')
