"""Real models from torchvision, timm and mmpretrain with MMSyncBN.

Each model is converted with ``convert_sync_batchnorm`` (or built from an
mmpretrain config with ``norm_cfg=dict(type='MMSyncBN')``), trained for 3
SGD steps under DDP at world 2 with an unequal split (5 + 11 samples) in
float64, and compared with one process training the same model with plain
BatchNorm on the concatenated batch: losses, parameters and running
statistics. The reverted model's eval outputs must equal the reference's.
Needs torchvision, timm and mmpretrain (the CUDA-torch CI environment).
"""
import os.path as osp
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from dist_utils import run_distributed
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from mmsync.cnn import convert_sync_batchnorm, revert_sync_batchnorm
from mmsync.ops import SyncBatchNorm

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MMPRETRAIN_CONFIG = osp.join(REPO, 'configs', 'mmpretrain',
                             'resnet18-cifar_mmsyncbn_2xb16-5e_digits-png.py')
SPLITS = (5, 11)
STEPS = 3
LR = 0.05
IMAGE = 32
CLASSES = 10


def build_model(name: str, sync: bool) -> nn.Module:
    """The named model in float64, weights from seed 0.

    ``sync``: the model for the distributed run (MMSyncBN), else the plain
    BatchNorm reference.
    """
    torch.manual_seed(0)
    if name.startswith('mmpretrain-resnet18'):
        from mmengine.config import Config
        from mmengine.registry import DefaultScope
        from mmpretrain.registry import MODELS
        cfg = Config.fromfile(MMPRETRAIN_CONFIG)
        if not sync:
            cfg.model.backbone.norm_cfg = dict(type='BN')
        elif name.endswith('with_cp'):
            # Activation checkpointing in every block (torch's reentrant
            # checkpoint); the reference runs without it (BatchNorm2d
            # would count a recomputed forward twice).
            cfg.model.backbone.with_cp = True
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            model = MODELS.build(cfg.model)
        model.init_weights()
        model = ImageClassifierLogits(model)
    elif name == 'torchvision-resnet18':
        import torchvision
        model = torchvision.models.resnet18(num_classes=CLASSES)
    else:
        import timm
        model = timm.create_model(
            name.split('-', 1)[1],
            pretrained=False,
            num_classes=CLASSES,
            drop_rate=0.0)
    model = model.double()
    if sync and not name.startswith('mmpretrain'):
        model = convert_sync_batchnorm(model)
    return model


class ImageClassifierLogits(nn.Module):
    """mmpretrain's classifier returning logits (its 'tensor' mode)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x, mode='tensor')


def batches():
    """The global batch of every step (inputs, labels), fixed by a seed."""
    gen = torch.Generator().manual_seed(1)
    total = sum(SPLITS)
    return [(torch.randn(
        total, 3, IMAGE, IMAGE, generator=gen, dtype=torch.float64) * 2 + 0.5,
             torch.randint(0, CLASSES, (total, ), generator=gen))
            for _ in range(STEPS)]


def state_of(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def evaluate(model: nn.Module):
    """Eval-mode outputs on the first batch, and the BatchNorm class names."""
    model.eval()
    with torch.no_grad():
        eval_out = model(batches()[0][0])
    kinds = sorted({
        type(m).__name__
        for m in model.modules() if isinstance(m, _BatchNorm)
    })
    return eval_out, kinds


def train_ddp(rank: int, world_size: int, name: str):
    model = build_model(name, sync=True)
    n_sync = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    total = sum(SPLITS)
    start = sum(SPLITS[:rank])
    losses = []
    collectives = []
    original = dist.all_gather_single
    dist.all_gather_single = lambda *a, **k: (collectives.append(1),
                                              original(*a, **k))[1]
    for x, y in batches():
        x, y = x[start:start + SPLITS[rank]], y[start:start + SPLITS[rank]]
        # DDP averages gradients over the ranks: each rank's share of the
        # global mean loss, times the world size.
        local = F.cross_entropy(ddp(x), y, reduction='sum')
        (local * world_size / total).backward()
        optimizer.step()
        optimizer.zero_grad()
        summed = local.detach().clone()
        dist.all_reduce(summed)
        losses.append(summed.item() / total)
    dist.all_gather_single = original
    eval_out, kinds = evaluate(revert_sync_batchnorm(model))
    return dict(
        losses=losses,
        state=state_of(model),
        eval_out=eval_out,
        n_sync=n_sync,
        collectives=len(collectives),
        reverted_kinds=kinds)


def train_reference(name: str):
    model = build_model(name, sync=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for x, y in batches():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    eval_out, kinds = evaluate(model)
    return dict(
        losses=losses, state=state_of(model), eval_out=eval_out, kinds=kinds)


def assert_rel_close(actual, expected, what, rtol=1e-10, floor=1e-3):
    """Max error relative to the tensor's largest value, or to ``floor``.

    The floor is for tensors that are analytically zero: the bias of a BN
    followed by another BN gets rounding-noise gradients (~1e-16) only.
    """
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(floor)
    error = (actual - expected).abs().max() / scale
    assert error <= rtol, f'{what}: relative error {error.item():.3g}'


MODELS = [
    pytest.param('torchvision-resnet18', id='torchvision-resnet18'),
    pytest.param('timm-resnet10t', id='timm-resnet10t'),
    pytest.param('timm-efficientnet_b0', id='timm-efficientnet_b0'),
    pytest.param('mmpretrain-resnet18', id='mmpretrain-resnet18'),
    pytest.param('mmpretrain-resnet18-with_cp', id='mmpretrain-resnet18-cp'),
]
NEEDS = {
    'torchvision': 'torchvision',
    'timm': 'timm',
    'mmpretrain': 'mmpretrain.models'
}


@pytest.mark.parametrize('name', MODELS)
def test_ddp_equals_one_process_with_plain_bn(name):
    pytest.importorskip(
        NEEDS[name.split('-')[0]], reason=f'needs {name.split("-")[0]}')
    reference = train_reference(name.replace('-with_cp', ''))
    ranks = run_distributed(train_ddp, 2, name, timeout=600, pg_timeout=120)
    assert ranks[0]['n_sync'] > 0
    # One gather each way per layer and step (world 2), checkpointed or
    # not: a recomputed forward runs none.
    assert ranks[0]['collectives'] == 2 * ranks[0]['n_sync'] * STEPS
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(
            torch.tensor(result['losses']),
            torch.tensor(reference['losses']),
            rtol=1e-10,
            atol=0)
        assert result['state'].keys() == reference['state'].keys()
        for key, expected in reference['state'].items():
            assert_rel_close(result['state'][key], expected,
                             f'rank {rank} {key}')
        # The reverted model holds the original classes again (BatchNormXd
        # where the model was built with MMSyncBN) and gives the reference's
        # eval outputs: within 1e-8, as the 1e-10 differences of the
        # parameters and statistics pass through up to 80 layers.
        built_sync = name.startswith('mmpretrain')
        assert result['reverted_kinds'] == (['BatchNormXd'] if built_sync else
                                            reference['kinds'])
        assert_rel_close(
            result['eval_out'],
            reference['eval_out'],
            f'rank {rank} reverted eval output',
            rtol=1e-8)


class TestTimmConversion:
    """timm's BatchNormAct2d (BN + drop + act) converted and reverted."""

    @pytest.fixture
    def model(self):
        timm = pytest.importorskip('timm', reason='needs timm')
        torch.manual_seed(0)
        return timm.create_model(
            'efficientnet_b0', pretrained=False, num_classes=CLASSES).double()

    def test_every_layer_converted_keeping_act_and_drop(self, model):
        from timm.layers import BatchNormAct2d
        originals = {
            n: m
            for n, m in model.named_modules() if isinstance(m, BatchNormAct2d)
        }
        assert len(originals) == 49
        keys = set(model.state_dict())
        converted = convert_sync_batchnorm(model)
        for name, m in converted.named_modules():
            if name in originals:
                assert isinstance(m, SyncBatchNorm), name
                assert isinstance(m, BatchNormAct2d), name
                assert m.act is originals[name].act
                assert m.drop is originals[name].drop
                assert m.stats_mode == 'N'
        assert set(converted.state_dict()) == keys

    def test_converted_model_pickles(self, model):
        import io
        converted = convert_sync_batchnorm(model)
        buffer = io.BytesIO()
        torch.save(converted, buffer)
        loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
        assert type(loaded.bn1) is type(converted.bn1)
        x = torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.float64)
        torch.testing.assert_close(loaded.eval()(x), converted.eval()(x))

    @pytest.mark.parametrize('training', (True, False))
    def test_round_trip_computes_the_same(self, model, training):
        from timm.layers import BatchNormAct2d
        x = torch.randn(4, 3, IMAGE, IMAGE, dtype=torch.float64)
        plain = build_copy(model).train(training)
        expected = plain(x)
        converted = convert_sync_batchnorm(build_copy(model)).train(training)
        torch.testing.assert_close(
            converted(x), expected, rtol=1e-9, atol=1e-9)
        reverted = revert_sync_batchnorm(converted)
        kinds = {
            type(m)
            for m in reverted.modules() if isinstance(m, _BatchNorm)
        }
        assert kinds == {BatchNormAct2d}
        # Same running statistics as the reference after its one step.
        for a, b in zip(reverted.buffers(), plain.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(
            reverted.eval()(x), plain.eval()(x), rtol=1e-9, atol=1e-9)


def build_copy(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model)


class TestCustomSubclasses:
    """Any _BatchNorm subclass keeps what it adds, or fails loudly."""

    class BNThenTanh(nn.BatchNorm2d):
        """A zoo's BN + activation reaching the BN through super()."""

        def __init__(self, num_features):
            super().__init__(num_features)
            self.act = nn.Tanh()
            self.scale = 2.0

        def forward(self, x):
            return self.act(super().forward(x)) * self.scale

    class OwnBatchNorm(nn.BatchNorm2d):
        """A subclass computing its batch norm itself: cannot be synced."""

        def forward(self, x):
            return F.batch_norm(x, self.running_mean, self.running_var,
                                self.weight, self.bias, self.training, 0.1,
                                self.eps)

    def test_super_forward_subclass_round_trip(self):
        layer = self.BNThenTanh(3).double()
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        expected = build_copy(layer)(x)
        converted = convert_sync_batchnorm(layer)
        assert isinstance(converted, SyncBatchNorm)
        assert isinstance(converted, self.BNThenTanh)
        torch.testing.assert_close(converted(x), expected)
        reverted = revert_sync_batchnorm(converted)
        assert type(reverted) is self.BNThenTanh
        assert reverted.act is layer.act and reverted.scale == 2.0
        copied = pickle.loads(pickle.dumps(converted))
        assert type(copied) is type(converted)
        torch.testing.assert_close(copied(x), converted(x))

    def test_unsyncable_subclass_raises_instead_of_a_wrong_answer(self):
        converted = convert_sync_batchnorm(self.OwnBatchNorm(3))
        with pytest.raises(
                RuntimeError, match=r'does not call super\(\)\.forward'):
            converted(torch.randn(4, 3, 2, 2))

    class SyncBNThenTanh(SyncBatchNorm):
        """A subclass of MMSyncBN adding an activation."""

        def forward(self, x):
            return torch.tanh(super().forward(x))

    def test_mmsyncbn_subclass_reverts_to_itself_alone(self):
        SyncBNThenTanh = self.SyncBNThenTanh
        layer = SyncBNThenTanh(3, stats_mode='N').double()
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        reverted = revert_sync_batchnorm(layer)
        assert isinstance(reverted, SyncBNThenTanh)
        assert reverted.group_size == 1
        torch.testing.assert_close(
            reverted(x),
            torch.tanh(F.batch_norm(x, None, None, training=True)))
        copied = pickle.loads(pickle.dumps(reverted))
        assert type(copied) is type(reverted) and copied.group_size == 1
        back = convert_sync_batchnorm(reverted)
        assert type(back) is SyncBNThenTanh
