"""ResNetClassifier: norm layers from norm_cfg, exact loss, predictions,
and init_model (MMSyncBN reverted, weights loaded)."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from mmsync.apis import init_model
from mmsync.models import ResNetClassifier
from mmsync.ops import SyncBatchNorm
from mmsync.registry import MODELS

SYNC_CFG = dict(type='MMSyncBN', stats_mode='N')


def norm_types(model):
    return Counter(
        type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm))


def test_norm_layers_come_from_norm_cfg():
    # Scoped names: a Runner built by another test may leave mmengine's
    # default scope current, which bare names would resolve in.
    sync = MODELS.build(
        dict(type='mmsync.ResNetClassifier', norm_cfg=SYNC_CFG))
    plain = MODELS.build(dict(type='mmsync.ResNetClassifier'))
    # stem, two blocks of two, one shortcut
    assert norm_types(sync) == {'SyncBatchNorm': 6}
    assert all(m.stats_mode == 'N' for m in sync.modules()
               if isinstance(m, SyncBatchNorm))
    assert norm_types(plain) == {'BatchNorm2d': 6}
    # Checkpoints move between BN and MMSyncBN models.
    assert sync.state_dict().keys() == plain.state_dict().keys()


def test_loss_is_the_batch_mean_in_one_process():
    torch.manual_seed(0)
    model = ResNetClassifier(norm_cfg=SYNC_CFG, dtype='float64')
    inputs = torch.rand(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    losses = model(inputs, labels, mode='loss')
    reference = F.cross_entropy(model(inputs), labels)
    torch.testing.assert_close(losses['loss'], reference)
    torch.testing.assert_close(losses['batch_loss'], reference.detach())
    loss, log_vars = model.parse_losses(losses)
    assert loss is losses['loss']
    assert list(log_vars) == ['loss']
    grads = torch.autograd.grad(loss, model.fc.weight)[0]
    torch.testing.assert_close(
        grads,
        torch.autograd.grad(reference, model.fc.weight)[0])


def test_predict_and_dtype():
    model = ResNetClassifier(
        widths=(8, 16, 16), blocks=(1, 2, 1), dtype='float64').eval()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    inputs = torch.rand(5, 1, 8, 8)  # float32 input, cast by the model
    logits = model(inputs)
    assert logits.shape == (5, 10) and logits.dtype == torch.float64
    preds = model(inputs, torch.arange(5), mode='predict')
    assert [p['pred_label'] for p in preds] == logits.argmax(1).tolist()
    assert [p['gt_label'] for p in preds] == list(range(5))
    torch.testing.assert_close(
        torch.tensor([p['pred_score'] for p in preds]),
        logits.float().softmax(1).max(1).values)


@pytest.mark.parametrize('kwargs,match', [
    (dict(dtype='float16'), 'dtype must be one of'),
    (dict(widths=(8, 16), blocks=(1, )), 'same length'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNetClassifier(**kwargs)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be 'tensor'"):
        ResNetClassifier()(torch.rand(2, 1, 8, 8), mode='train')


def test_init_model_reverts_mmsyncbn_and_loads_weights(tmp_path):
    torch.manual_seed(0)
    trained = ResNetClassifier(norm_cfg=SYNC_CFG)
    trained.train()
    for _ in range(3):  # move running statistics away from their init
        trained(torch.rand(16, 1, 8, 8))
    checkpoint = tmp_path / 'model.pth'
    torch.save(dict(state_dict=trained.state_dict()), checkpoint)
    config = tmp_path / 'config.py'
    config.write_text("model = dict(type='ResNetClassifier', "
                      "norm_cfg=dict(type='MMSyncBN', stats_mode='N'))\n")
    model = init_model(str(config), str(checkpoint))
    assert not model.training
    assert not any(isinstance(m, SyncBatchNorm) for m in model.modules())
    assert sum(norm_types(model).values()) == 6
    inputs = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(model(inputs), trained.eval()(inputs))
