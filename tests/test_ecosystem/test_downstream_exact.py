"""mmseg's and mmdet's models with MMSyncBN at world 2 equal one process.

Each model comes from its codebase's own base config (installed under the
package's ``.mim/configs``), made small (ResNet-18, narrow heads, no
pretrained weights, no dropout) with ``norm_cfg=dict(type='MMSyncBN',
stats_mode='N')`` wherever the config puts its norm layer: mmseg's
DeepLabV3 EncoderDecoder (ResNetV1c-18, ASPPHead, auxiliary FCNHead: every
``SyncBN`` of the config), mmdet's RetinaNet and Faster R-CNN (ResNet-18 and
FPN; the norm also in FPN and in the heads that take one: RetinaHead's convs,
Faster R-CNN's Shared4Conv1FCBBoxHead on mmcv's RoIAlign). Two gloo
processes hold 1 and 3 of 4 float64 images; the reference is one process
with plain BN on all 4, from the same weights. Detection losses are
normalized per rank, so the loss here is a fixed weighted sum of what BN
determines: every output of the BN-bearing parts (feature maps, head
outputs), which must equal the reference, as must the sum over ranks of
every parameter's gradient and every running statistic (<= 1e-10 relative).
"""
import os.path as osp

import pytest
import torch

pytest.importorskip(
    'mmcv.ops',
    reason="needs mmcv's full build (tools/setup/setup_downstream.sh)")
pytest.importorskip('mmseg.models', reason='needs mmsegmentation')
pytest.importorskip('mmdet.models', reason='needs mmdet')

from dist_utils import backward_fixed_loss, run_distributed  # noqa: E402

SPLIT = (1, 3)
IMAGES = sum(SPLIT)
SIZE = 64
NUM_CLASSES = 3
ROIS_PER_IMAGE = 4
SYNC_NORM = dict(type='MMSyncBN', stats_mode='N')
PLAIN_NORM = dict(type='BN', requires_grad=True)
RTOL = 1e-10


def base_config(package: str, name: str):
    """A model config of mmseg or mmdet, as the package installs it."""
    from mmengine.config import Config
    module = __import__(package)
    path = osp.join(
        osp.dirname(module.__file__), '.mim', 'configs', '_base_', 'models',
        name)
    return Config.fromfile(path).model


def with_norm(cfg, norm_cfg, names=('SyncBN', 'BN')):
    """``cfg`` with every ``norm_cfg`` of a type in ``names`` replaced."""
    if isinstance(cfg, dict):
        out = {}
        for key, value in cfg.items():
            if (key == 'norm_cfg' and isinstance(value, dict)
                    and value.get('type') in names):
                out[key] = dict(norm_cfg)
            else:
                out[key] = with_norm(value, norm_cfg, names)
        return out
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(with_norm(v, norm_cfg, names) for v in cfg)
    return cfg


def small_backbone(backbone: dict) -> dict:
    backbone.update(depth=18, norm_eval=False, init_cfg=None)
    return backbone


def model_config(kind: str, norm_cfg: dict):
    """The small model ``kind`` with ``norm_cfg`` in its norm layers."""
    from mmengine.config import ConfigDict
    if kind == 'deeplabv3':
        cfg = base_config('mmseg', 'deeplabv3_r50-d8.py')
        cfg.pretrained = None
        cfg.backbone.depth = 18
        cfg.decode_head.update(
            in_channels=512,
            channels=32,
            dropout_ratio=0,
            num_classes=NUM_CLASSES)
        cfg.auxiliary_head.update(
            in_channels=256,
            channels=16,
            dropout_ratio=0,
            num_classes=NUM_CLASSES)
        return ConfigDict(with_norm(cfg.to_dict(), norm_cfg))
    neck = dict(in_channels=[64, 128, 256, 512], out_channels=32)
    if kind == 'retinanet':
        cfg = base_config('mmdet', 'retinanet_r50_fpn.py')
        small_backbone(cfg.backbone)
        cfg.neck.update(neck, norm_cfg=PLAIN_NORM)
        cfg.bbox_head.update(
            in_channels=32,
            feat_channels=32,
            stacked_convs=2,
            num_classes=NUM_CLASSES,
            norm_cfg=PLAIN_NORM)
    elif kind == 'faster_rcnn':
        cfg = base_config('mmdet', 'faster-rcnn_r50_fpn.py')
        small_backbone(cfg.backbone)
        cfg.neck.update(neck, norm_cfg=PLAIN_NORM)
        cfg.rpn_head.update(in_channels=32, feat_channels=32)
        cfg.roi_head.bbox_roi_extractor.out_channels = 32
        cfg.roi_head.bbox_head.update(
            type='Shared4Conv1FCBBoxHead',
            in_channels=32,
            conv_out_channels=32,
            fc_out_channels=64,
            num_classes=NUM_CLASSES,
            norm_cfg=PLAIN_NORM)
    else:
        raise ValueError(f'unknown model kind {kind!r}')
    return ConfigDict(with_norm(cfg.to_dict(), norm_cfg))


def build_model(kind: str, norm_cfg: dict, state=None) -> torch.nn.Module:
    """The model from its codebase's registry, float64, in train mode."""
    from mmengine.registry import DefaultScope
    if kind == 'deeplabv3':
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
        scope = 'mmseg'
    else:
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        scope = 'mmdet'
    import mmsync  # noqa: F401  (a config's custom_imports)
    register_all_modules(init_default_scope=False)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(model_config(kind, norm_cfg))
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.double().train()


def boxes() -> torch.Tensor:
    """Fixed boxes (x1, y1, x2, y2) in every image, for the RoI head."""
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(IMAGES, ROIS_PER_IMAGE, 2, generator=g) * SIZE * 0.6
    wh = 8 + torch.rand(IMAGES, ROIS_PER_IMAGE, 2, generator=g) * SIZE * 0.3
    return torch.cat([xy, (xy + wh).clamp(max=SIZE - 1)], 2).double()


def forward(kind: str, model, images, image_boxes):
    """Every output of the BN-bearing parts, each with the images (or their
    RoIs, image by image) along dim 0."""
    feats = model.extract_feat(images)
    if kind == 'deeplabv3':
        return [*feats, model.decode_head(feats), model.auxiliary_head(feats)]
    if kind == 'retinanet':
        cls_scores, bbox_preds = model.bbox_head(feats)
        return [*feats, *cls_scores, *bbox_preds]
    from mmdet.structures.bbox import bbox2roi
    rpn_scores, rpn_deltas = model.rpn_head(feats)
    rois = bbox2roi(list(image_boxes))
    extractor = model.roi_head.bbox_roi_extractor
    roi_feats = extractor(feats[:extractor.num_inputs], rois)
    cls_score, bbox_pred = model.roi_head.bbox_head(roi_feats)
    return [*feats, *rpn_scores, *rpn_deltas, cls_score, bbox_pred]


def loss_weights(outputs, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outputs
    ]


def share(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a tensor laid out image by image."""
    per_image = tensor.shape[0] // IMAGES
    start = sum(SPLIT[:rank]) * per_image
    return tensor[start:start + SPLIT[rank] * per_image]


def step(kind, model, images, image_boxes, weights):
    """Outputs, gradients of the fixed loss and the running statistics."""
    return backward_fixed_loss(model, forward(kind, model, images,
                                              image_boxes), weights)


def synced_step(rank, world_size, kind, state, images, image_boxes, weights):
    from mmsync.ops import SyncBatchNorm
    model = build_model(kind, SYNC_NORM, state)
    synced = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
    assert synced, 'no MMSyncBN layer was built'
    mine = [share(w, rank) for w in weights]
    outputs, grads, stats = step(kind, model, share(images, rank),
                                 share(image_boxes, rank), mine)
    return dict(outputs=outputs, grads=grads, stats=stats, synced=len(synced))


def assert_close(name, value, ref, scale=None):
    """``value`` within RTOL of ``ref``, relative to ``ref``'s largest
    magnitude or to ``scale`` where that is larger."""
    scale = max(float(ref.abs().max()), scale or 0.0, 1e-30)
    error = float((value - ref).abs().max() / scale)
    assert error <= RTOL, f'{name}: relative error {error:.3e} > {RTOL}'


@pytest.mark.parametrize('kind', ['deeplabv3', 'retinanet', 'faster_rcnn'])
def test_world2_equals_one_process_with_bn(kind):
    reference = build_model(kind, PLAIN_NORM)
    plain = sum(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for m in reference.modules())
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    images = torch.randn(
        IMAGES, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    image_boxes = boxes()
    with torch.no_grad():  # eval: the running statistics stay as they are
        weights = loss_weights(
            forward(kind, reference.eval(), images, image_boxes))
    ref_out, ref_grads, ref_stats = step(kind, reference.train(), images,
                                         image_boxes, weights)
    ranks = run_distributed(
        synced_step,
        len(SPLIT),
        kind,
        state,
        images,
        image_boxes,
        weights,
        timeout=300)
    assert all(r['synced'] == plain
               for r in ranks), (plain, ranks[0]['synced'])
    for i, ref in enumerate(ref_out):
        assert_close(f'output {i}',
                     torch.cat([r['outputs'][i] for r in ranks]), ref)
    assert sorted(ranks[0]['grads']) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        assert_close(f'grad of {name}', sum(r['grads'][name] for r in ranks),
                     ref)
    assert sorted(ranks[0]['stats']) == sorted(ref_stats)
    for name, ref in ref_stats.items():
        # A mean is compared on the scale of its channel's deviation: a
        # layer fed by a BN's zero-mean output through a linear map (e.g.
        # RetinaNet's P7 on a 1x1 P6) has a mean of zero up to roundoff.
        std = None
        if name.endswith('running_mean'):
            var = name[:-len('running_mean')] + 'running_var'
            std = float(ref_stats[var].sqrt().max())
        for rank, r in enumerate(ranks):
            assert_close(f'rank {rank} {name}', r['stats'][name], ref, std)
