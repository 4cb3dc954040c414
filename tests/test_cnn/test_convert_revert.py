"""convert_sync_batchnorm / revert_sync_batchnorm in one process."""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mmsync.cnn import (BatchNormXd, convert_sync_batchnorm,
                        revert_sync_batchnorm)
from mmsync.ops import SyncBatchNorm

BN_CLASSES = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]


def make_model(norm: type = nn.BatchNorm2d) -> nn.Module:
    """Convolutions and norms, nested, with non-BN norms that must stay."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        norm(4),
        nn.ReLU(),
        nn.Sequential(
            nn.Conv2d(4, 4, 1), norm(4, affine=False), nn.GroupNorm(2, 4),
            nn.InstanceNorm2d(4, affine=True)),
        nn.ModuleDict(dict(head=nn.Conv2d(4, 2, 1), norm=norm(2))),
    )


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model[3](model[2](model[1](model[0](x))))
    return model[4]['norm'](model[4]['head'](x))


def bn_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def trained_model(norm: type = nn.BatchNorm2d) -> nn.Module:
    """A model whose running statistics and affine params are not defaults."""
    torch.manual_seed(0)
    model = make_model(norm).double()
    for _, m in bn_modules(model):
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.num_batches_tracked.fill_(7)
        if m.affine:
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


@pytest.fixture
def x():
    return torch.randn(
        4,
        3,
        5,
        5,
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64) * 3 + 2


class TestConvert:

    def test_not_distributed_here(self):
        # Every test below runs without a process group.
        assert not (dist.is_available() and dist.is_initialized())

    @pytest.mark.parametrize('bn_class', BN_CLASSES)
    def test_every_batchnorm_becomes_mmsyncbn(self, bn_class):
        model = make_model(bn_class)
        before = {n: type(m) for n, m in model.named_modules()}
        converted = convert_sync_batchnorm(model)
        assert converted is model
        for name, m in converted.named_modules():
            if before[name] is bn_class:
                assert type(m) is SyncBatchNorm, name
            else:
                assert type(m) is before[name], name
        assert len([
            m for m in converted.modules() if isinstance(m, SyncBatchNorm)
        ]) == 3

    def test_shares_parameters_buffers_and_flags(self):
        model = trained_model()
        old = dict(bn_modules(model))
        old[''] = model
        old['1'].eval()
        old['4.norm'].weight.requires_grad_(False)
        converted = convert_sync_batchnorm(model)
        for name, m in bn_modules(converted):
            source = old[name]
            assert isinstance(m, SyncBatchNorm)
            for attr in ('weight', 'bias', 'running_mean', 'running_var',
                         'num_batches_tracked'):
                assert getattr(m, attr) is getattr(source, attr), (name, attr)
            for attr in ('num_features', 'eps', 'momentum', 'affine',
                         'track_running_stats', 'training'):
                assert getattr(m, attr) == getattr(source, attr), (name, attr)
            assert m.group is None and m.stats_mode == 'N'
        assert not converted[1].training and converted[3][1].training
        assert not converted[4]['norm'].weight.requires_grad
        assert converted[1].weight.requires_grad

    def test_group_and_stats_mode_and_options_are_passed(self):
        model = nn.Sequential(
            nn.BatchNorm1d(3, eps=1e-3, momentum=None),
            nn.BatchNorm2d(3, affine=False, track_running_stats=False))
        converted = convert_sync_batchnorm(model, stats_mode='default')
        first, second = converted
        assert (first.eps, first.momentum, first.stats_mode) == (1e-3, None,
                                                                 'default')
        assert first.group is None
        assert second.weight is None and second.running_mean is None
        assert not second.affine and not second.track_running_stats
        sentinel = object()  # any group object is only stored
        layer = convert_sync_batchnorm(nn.BatchNorm2d(3), group=sentinel)
        assert layer.group is sentinel
        nested = convert_sync_batchnorm(
            nn.Sequential(nn.Sequential(nn.BatchNorm2d(3))), group_size=2)
        assert nested[0][0].subgroup_size == 2

    def test_top_level_batchnorm_is_returned_converted(self):
        bn = nn.BatchNorm3d(2)
        layer = convert_sync_batchnorm(bn)
        assert isinstance(layer, SyncBatchNorm) and layer is not bn
        assert layer.weight is bn.weight

    def test_existing_mmsyncbn_and_qconfig(self):
        own = SyncBatchNorm(3, stats_mode='N', act='relu')
        assert convert_sync_batchnorm(own, stats_mode='default') is own
        assert own.stats_mode == 'N'
        bn = nn.BatchNorm2d(3)
        bn.qconfig = 'qconfig'
        assert convert_sync_batchnorm(bn).qconfig == 'qconfig'

    def test_invalid_stats_mode_names_it(self):
        with pytest.raises(ValueError, match='stats_mode'):
            convert_sync_batchnorm(nn.Conv2d(1, 1, 1), stats_mode='mean')

    def test_eval_output_unchanged_and_train_matches_batchnorm(self, x):
        model = trained_model()
        reference = trained_model()
        model.eval()
        reference.eval()
        expected = forward(reference, x)
        converted = convert_sync_batchnorm(model)
        torch.testing.assert_close(forward(converted, x), expected)
        converted.train()
        reference.train()
        torch.testing.assert_close(
            forward(converted, x), forward(reference, x))
        for (name,
             m), (_, r) in zip(bn_modules(converted), bn_modules(reference)):
            torch.testing.assert_close(m.running_mean, r.running_mean)
            torch.testing.assert_close(m.running_var, r.running_var)
            assert int(m.num_batches_tracked) == 8, name

    def test_optimizer_built_before_conversion_still_trains(self, x):
        model = trained_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        converted = convert_sync_batchnorm(model)
        weight = converted[1].weight.detach().clone()
        forward(converted, x).square().mean().backward()
        assert converted[1].weight.grad is not None
        optimizer.step()
        assert not torch.equal(converted[1].weight, weight)


class TestRevert:

    @pytest.mark.parametrize('sync_class', [SyncBatchNorm, nn.SyncBatchNorm])
    def test_sync_layers_become_batchnormxd(self, sync_class):
        model = make_model(sync_class)
        model[1].eval()
        reverted = revert_sync_batchnorm(model)
        kinds = [type(m) for _, m in bn_modules(reverted)]
        assert kinds == [BatchNormXd] * 3
        assert not reverted[1].training and reverted[3][1].training
        assert type(reverted[3][2]) is nn.GroupNorm

    @pytest.mark.parametrize('shape', [(6, 3), (4, 3, 5), (2, 3, 4, 4),
                                       (2, 3, 2, 3, 3)])
    def test_runs_without_process_group_on_any_rank(self, shape):
        # torch's SyncBatchNorm refuses to train on CPU without a group.
        layer = revert_sync_batchnorm(nn.SyncBatchNorm(3).double())
        x = torch.randn(shape, dtype=torch.float64)
        expected = F.batch_norm(x, None, None, training=True, eps=1e-5)
        torch.testing.assert_close(layer(x), expected)

    def test_shares_parameters_and_buffers(self):
        model = convert_sync_batchnorm(trained_model())
        old = dict(bn_modules(model))
        reverted = revert_sync_batchnorm(model)
        for name, m in bn_modules(reverted):
            for attr in ('weight', 'bias', 'running_mean', 'running_var',
                         'num_batches_tracked'):
                assert getattr(m, attr) is getattr(old[name], attr)

    def test_fused_relu_is_kept(self, x):
        layer = SyncBatchNorm(3, act='relu').double()
        reverted = revert_sync_batchnorm(layer)
        assert reverted.act == 'relu'
        torch.testing.assert_close(reverted(x), F.relu(layer(x)))
        assert bool((reverted(x) == 0).any())
        back = convert_sync_batchnorm(reverted)
        assert back.act == 'relu'

    def test_batchnormxd_rejects_bad_input_and_act(self):
        with pytest.raises(ValueError, match='at least 2 dimensions'):
            BatchNormXd(3)(torch.randn(3))
        with pytest.raises(ValueError, match='act'):
            BatchNormXd(3, act='gelu')

    def test_plain_model_is_untouched(self):
        model = make_model()
        modules = list(model.modules())
        assert revert_sync_batchnorm(model) is model
        assert list(model.modules()) == modules


class TestRoundTrip:

    @pytest.mark.parametrize('norm', [nn.BatchNorm2d, nn.SyncBatchNorm])
    def test_eval_outputs_identical(self, norm, x):
        model = trained_model(norm).eval()
        reference = trained_model(norm).eval()
        converted = convert_sync_batchnorm(model)
        out_sync = forward(converted, x)
        reverted = revert_sync_batchnorm(converted)
        out_plain = forward(reverted, x)
        if norm is nn.BatchNorm2d:
            assert torch.equal(out_plain, forward(reference, x))
        assert torch.equal(out_sync, out_plain)

    def test_state_dict_loads_both_ways(self):
        bn_model = trained_model()
        sync_model = convert_sync_batchnorm(make_model().double())
        result = sync_model.load_state_dict(bn_model.state_dict())
        assert not result.missing_keys and not result.unexpected_keys
        for key, value in bn_model.state_dict().items():
            assert torch.equal(sync_model.state_dict()[key], value), key

        plain = make_model().double()
        result = plain.load_state_dict(sync_model.state_dict())
        assert not result.missing_keys and not result.unexpected_keys
        reverted = revert_sync_batchnorm(
            convert_sync_batchnorm(make_model().double()))
        result = reverted.load_state_dict(sync_model.state_dict())
        assert not result.missing_keys and not result.unexpected_keys
        assert set(reverted.state_dict()) == set(bn_model.state_dict())


class _BoundHookBN(nn.BatchNorm2d):
    """A BatchNorm subclass registering one of its own methods as a hook."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.seen = []
        self.register_forward_hook(self.remember)

    def remember(self, module, inputs, output):
        self.seen.append(module is self)

    def forward(self, x):
        return super().forward(x)


class TestHooksAndLazy:

    def test_hooks_follow_the_converted_and_reverted_layer(self):
        """A plain hook and a subclass's bound-method hook run on the new
        layer (bound to it), and a handle taken before still removes its
        hook (torch's convert drops them all)."""
        model = nn.Sequential(nn.BatchNorm2d(3), _BoundHookBN(3))
        calls = []
        handle = model[0].register_forward_hook(
            lambda m, i, o: calls.append(type(m).__name__))
        pre = model[0].register_forward_pre_hook(
            lambda m, i: calls.append('pre'))
        model = convert_sync_batchnorm(model)
        x = torch.randn(4, 3, 2, 2)
        model(x)
        assert calls == ['pre', 'SyncBatchNorm']
        assert model[1].seen == [True]
        handle.remove()
        model(x)
        assert calls == ['pre', 'SyncBatchNorm', 'pre']
        model = revert_sync_batchnorm(model)
        model(x)
        assert calls[-1] == 'pre' and len(calls) == 4
        assert model[1].seen == [True, True, True]
        pre.remove()
        model(x)
        assert len(calls) == 4

    @pytest.mark.parametrize('lazy', [nn.LazyBatchNorm1d, nn.LazyBatchNorm2d])
    def test_lazy_batchnorm_becomes_lazy_mmsyncbn(self, lazy):
        """A lazy BatchNorm not yet run converts to a lazy MMSyncBN that
        takes its channels from the first input and then trains like
        BatchNorm (it used to become SyncBatchNorm(0) and fail)."""
        torch.manual_seed(0)
        source = lazy(momentum=0.3)
        layer = convert_sync_batchnorm(source)
        shape = (6, 5) if lazy is nn.LazyBatchNorm1d else (6, 5, 3, 3)
        x = torch.randn(shape, dtype=torch.float64)
        ref = lazy(momentum=0.3).double()
        y = layer.double()(x)
        assert type(layer) is SyncBatchNorm and layer.num_features == 5
        assert layer.stats_mode == 'N' and layer.momentum == 0.3
        torch.testing.assert_close(y, ref(x))
        torch.testing.assert_close(layer.running_var, ref.running_var)
        run = lazy()
        run(torch.randn(shape))  # initialized: a plain BatchNorm now
        assert type(convert_sync_batchnorm(run)) is SyncBatchNorm


class TestReviewFindings:
    """Issue 29: what a second review of convert/revert found."""

    @pytest.mark.filterwarnings('ignore:Using a non-full backward hook')
    @pytest.mark.parametrize('legacy', [False, True])
    def test_backward_hooks_survive_convert_and_revert(self, legacy):
        """Finding 4: a full backward hook (and a legacy one) kept running
        on the new layer; it used to be dropped silently."""
        model = nn.Sequential(nn.BatchNorm2d(3))
        calls = []

        def hook(module, grad_input, grad_output):
            calls.append(type(module).__name__)

        if legacy:
            model[0].register_backward_hook(hook)
        else:
            model[0].register_full_backward_hook(hook)
        x = torch.randn(4, 3, 2, 2, requires_grad=True)
        model = convert_sync_batchnorm(model)
        model(x).sum().backward()
        assert calls == ['SyncBatchNorm']
        model = revert_sync_batchnorm(model)
        model(x).sum().backward()
        assert calls == ['SyncBatchNorm', 'BatchNorm2d']

    def test_revert_a_lazy_layer_that_has_not_run(self):
        """Finding 5: reverting a converted lazy layer before its first
        forward gives a lazy local BatchNorm that runs (it crashed with
        num_features=0, and would have become synchronizing again), and
        the source lazy layer stays usable."""
        source = nn.LazyBatchNorm2d(momentum=0.3)
        layer = convert_sync_batchnorm(source)
        reverted = revert_sync_batchnorm(layer)
        x = torch.randn(4, 5, 2, 2, dtype=torch.float64)
        y = reverted.double()(x)
        assert not isinstance(reverted, SyncBatchNorm)
        assert type(reverted) is nn.BatchNorm2d
        assert reverted.num_features == 5 and reverted.momentum == 0.3
        ref = nn.BatchNorm2d(5, momentum=0.3).double()
        torch.testing.assert_close(y, ref(x))
        torch.testing.assert_close(reverted.running_var, ref.running_var)
        assert type(source.double()(x)) is torch.Tensor
        assert source.num_features == 5
        mine = convert_sync_batchnorm(nn.LazyBatchNorm2d())
        assert type(revert_sync_batchnorm(mine)) is nn.LazyBatchNorm2d

    def test_lazy_affine_false_keeps_dtype_and_device(self):
        """Finding 6: without a weight, dtype and device come from the
        running buffers (a float64 layer became float32, 'meta' became
        cpu)."""
        source = nn.LazyBatchNorm2d(affine=False, dtype=torch.float64)
        layer = convert_sync_batchnorm(source)
        layer(torch.randn(4, 3, 2, 2, dtype=torch.float64))
        assert layer.running_mean.dtype == torch.float64
        assert layer.running_var.dtype == torch.float64
        meta = convert_sync_batchnorm(
            nn.LazyBatchNorm2d(affine=False, device='meta'))
        assert meta.running_mean.device.type == 'meta'
        assert meta.nonfinite_batches.device.type == 'meta'

    def test_a_layer_shared_by_two_parents_stays_one(self):
        """Item 4: one BatchNorm held by two parents becomes one MMSyncBN
        (it became two, each updating its own running statistics), and
        reverts to one."""
        bn = nn.BatchNorm2d(3)
        model = nn.Sequential(nn.Sequential(bn), nn.Sequential(bn))
        model = convert_sync_batchnorm(model)
        assert type(model[0][0]) is SyncBatchNorm
        assert model[0][0] is model[1][0]
        model = revert_sync_batchnorm(model)
        assert type(model[0][0]) is nn.BatchNorm2d
        assert model[0][0] is model[1][0]

    def test_converted_layers_count_nonfinite_batches(self):
        """Item 2: every converted layer (torch's, a subclass) counts the
        batches its running statistics skipped; reverting drops the
        counter from a subclass that gets its own class back."""
        model = nn.Sequential(nn.BatchNorm2d(3), _BoundHookBN(3))
        model = convert_sync_batchnorm(model)
        bad = torch.randn(4, 3, 2, 2)
        bad[1, 2, 0, 0] = float('inf')
        model(bad)
        for layer in model:
            assert int(layer.nonfinite_batches) == 1
            assert int(layer.num_batches_tracked) == 0
            assert torch.equal(layer.running_var, torch.ones(3))
        model = revert_sync_batchnorm(model)
        assert type(model[1]) is _BoundHookBN
        assert 'nonfinite_batches' not in dict(model[1].named_buffers())
        assert 'nonfinite_batches' not in dict(model[0].named_buffers())
