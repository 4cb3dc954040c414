"""MMSyncBN under the conditions of a real training step, at world 2 with an
unequal split (3 + 5 samples), against one process holding the 8 samples
with plain BatchNorm: activation checkpointing (both modes, nested, a layer
used twice, mmengine's ``activation_checkpointing``), gradient accumulation
with mmengine's optimizer wrapper, autocast, DDP variants, two forwards
before one backward, and double backward."""
import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from dist_utils import run_distributed
from sync_bn_cases import CollectiveCounter
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from mmsync.cnn import convert_sync_batchnorm
from mmsync.ops import SyncBatchNorm, sync_bn_comm
from mmsync.ops.sync_bn_recompute import records_of

BOUNDS = (0, 3, 8)  # rank 0 holds samples 0-2, rank 1 samples 3-7


class Block(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN, optionally checkpointed as a
    whole, per half (nested inside the whole), or with its first BN used
    twice (once in each half)."""

    def __init__(self, mode=None, reentrant=True, shared=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.mode, self.reentrant, self.shared = mode, reentrant, shared

    def _cp(self, fn, x):
        return checkpoint(fn, x, use_reentrant=self.reentrant)

    def first(self, x):
        return self.bn1(self.conv1(x)).relu()

    def second(self, x):
        y = self.bn2(self.conv2(x))
        return self.bn1(y) if self.shared else y

    def body(self, x):
        if self.mode == 'nested':
            return self._cp(self.second, self._cp(self.first, x))
        return self.second(self.first(x))

    def forward(self, x):
        if self.mode in ('whole', 'nested'):
            return self._cp(self.body, x)
        if self.mode == 'halves':
            return self._cp(self.second, self._cp(self.first, x))
        return self.body(x)


def _data(dtype=torch.float64, samples=BOUNDS[-1]):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 3, 6, 6, generator=gen, dtype=dtype) * 2 + 1
    target = torch.randn(samples, 4, 6, 6, generator=gen, dtype=dtype)
    return x, target


def _model(**kwargs):
    torch.manual_seed(0)
    return Block(**kwargs).double()


def _step(model, x, target):
    """One forward and backward; what BN determines, and the counts."""
    x = x.clone().requires_grad_()  # a reentrant checkpoint needs one
    model.zero_grad(set_to_none=True)
    with CollectiveCounter() as counter:
        y = model(x)
        ((y * target).sum()).backward()
    bns = [
        m for m in model.modules()
        if isinstance(m, nn.BatchNorm2d) or isinstance(m, SyncBatchNorm)
    ]
    return dict(
        y=y.detach(),
        grads={
            n: p.grad.clone()
            for n, p in model.named_parameters()
        },
        running=[(m.running_mean.clone(), m.running_var.clone(),
                  int(m.num_batches_tracked)) for m in bns],
        collectives=counter.count,
        unused=sum(not r.used for m in bns for r in records_of(m)),
        records=sum(len(records_of(m)) for m in bns))


CASES = [
    dict(mode=None),
    dict(mode='whole', reentrant=True),
    dict(mode='whole', reentrant=False),
    dict(mode='halves', reentrant=True),
    dict(mode='halves', reentrant=False),
    dict(mode='nested', reentrant=True),
    dict(mode='nested', reentrant=False),
    dict(mode=None, shared=True),
    dict(mode='halves', reentrant=True, shared=True),
    dict(mode='halves', reentrant=False, shared=True),
]


def _checkpoint_world(rank, world_size):
    x, target = _data()
    mine = slice(BOUNDS[rank], BOUNDS[rank + 1])
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch's use_reentrant advice
        for case in CASES:
            model = convert_sync_batchnorm(_model(**case))
            steps = [_step(model, x[mine], target[mine]) for _ in range(2)]
            out.append(steps)
    return out


def _reference(case, x, target, steps=2):
    """One process, BatchNorm2d, no checkpointing (torch's BatchNorm counts
    a recomputed forward twice)."""
    model = _model(shared=case.get('shared', False))
    return [_step(model, x, target) for _ in range(steps)]


def test_activation_checkpointing_world_two():
    """Checkpointed (reentrant and not, per half, nested, a layer used in
    two segments) training steps equal the step without checkpointing bit
    for bit, run the same number of collectives (two per BN call: one each
    way) and update the running statistics once per call; all equal one
    process with BatchNorm2d on the concatenated batch."""
    results = run_distributed(_checkpoint_world, 2)
    x, target = _data()
    for i, case in enumerate(CASES):
        plain = CASES.index(
            dict(mode=None, shared=True) if case.get('shared') else dict(
                mode=None))
        reference = _reference(case, x, target)
        for rank in range(2):
            mine = slice(BOUNDS[rank], BOUNDS[rank + 1])
            for step, (got, want) in enumerate(
                    zip(results[rank][i], results[rank][plain])):
                where = f'{case} rank {rank} step {step}'
                assert got['collectives'] == want['collectives'], where
                calls = 3 if case.get('shared') else 2
                assert got['collectives'] == 2 * calls, where
                assert torch.equal(got['y'], want['y']), where
                for name, grad in got['grads'].items():
                    if case.get('shared'):
                        # bn1's two uses add into .grad in another order
                        torch.testing.assert_close(
                            grad, want['grads'][name], rtol=1e-13, atol=0)
                    else:
                        assert torch.equal(grad, want['grads'][name]), where
                for mine_, plain_ in zip(got['running'], want['running']):
                    assert mine_[2] == plain_[2], where
                    assert torch.equal(mine_[0], plain_[0]), where
                    assert torch.equal(mine_[1], plain_[1]), where
                # Every record was used, and none outlives the next step.
                assert got['unused'] == 0, where
                assert got['records'] <= 3, where
                ref = reference[step]
                assert torch.allclose(got['y'], ref['y'][mine], atol=1e-12)
                for name, grad in got['grads'].items():
                    # BN weights: the group's sum / 2; conv: this rank's part.
                    if 'bn' in name:
                        torch.testing.assert_close(
                            grad * 2,
                            ref['grads'][name],
                            rtol=1e-10,
                            atol=1e-10)
                uses = (2, 1) if case.get('shared') else (1, 1)
                for mine_, ref_, use in zip(got['running'], ref['running'],
                                            uses):
                    assert mine_[2] == ref_[2] == (step + 1) * use, where
                    torch.testing.assert_close(
                        mine_[0], ref_[0], rtol=1e-10, atol=1e-12)
                    torch.testing.assert_close(
                        mine_[1], ref_[1], rtol=1e-10, atol=1e-12)


def _grad_sum_world(rank, world_size, case):
    """Conv gradients summed over the ranks (BN determines them)."""
    x, target = _data()
    mine = slice(BOUNDS[rank], BOUNDS[rank + 1])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = convert_sync_batchnorm(_model(**case))
        got = _step(model, x[mine], target[mine])
    grads = {}
    for name, grad in got['grads'].items():
        if 'conv' in name:
            dist.all_reduce(grad)
        grads[name] = grad
    return grads


def test_checkpointed_gradients_equal_the_global_batch():
    """The conv gradients of a nested checkpointed step, summed over the
    ranks, equal one process's on the whole batch (BN's backward is
    exact)."""
    case = dict(mode='nested', reentrant=False)
    x, target = _data()
    want = _reference(case, x, target, steps=1)[0]['grads']
    for got in run_distributed(_grad_sum_world, 2, case):
        for name, grad in got.items():
            scale = 2 if 'bn' in name else 1
            torch.testing.assert_close(
                grad * scale, want[name], rtol=1e-10, atol=1e-10)


def _mmengine_cp_world(rank, world_size):
    from mmengine.runner import turn_on_activation_checkpointing
    x, target = _data()
    mine = slice(BOUNDS[rank], BOUNDS[rank + 1])
    out = []
    for on in (False, True):
        model = convert_sync_batchnorm(_model())
        if on:
            turn_on_activation_checkpointing(model, ['conv1', 'bn1', 'bn2'])
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            out.append(_step(model, x[mine], target[mine]))
    return out


def test_mmengine_activation_checkpointing_world_two():
    """mmengine's ``activation_checkpointing=[...]`` (reentrant checkpoint of
    each named module's forward, BN layers included): same step, same
    collectives, one running-stat update."""
    for plain, checkpointed in run_distributed(_mmengine_cp_world, 2):
        assert checkpointed['collectives'] == plain['collectives'] == 4
        assert torch.equal(checkpointed['y'], plain['y'])
        for name, grad in plain['grads'].items():
            assert torch.equal(checkpointed['grads'][name], grad)
        for a, b in zip(checkpointed['running'], plain['running']):
            assert a[2] == b[2] == 1
            assert torch.equal(a[1], b[1])


def _accumulation_world(rank, world_size, accumulate):
    from mmengine.optim import OptimWrapper
    x, target = _data(samples=2 * BOUNDS[-1])
    model = DDP(convert_sync_batchnorm(_model()))
    before = copy.deepcopy(model.module.state_dict())
    wrapper = OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=1.0),
        accumulative_counts=accumulate)
    # micro-batch j: samples j*8 + [0, 3) on rank 0, j*8 + [3, 8) on rank 1
    for j in range(accumulate):
        mine = slice(j * 8 + BOUNDS[rank], j * 8 + BOUNDS[rank + 1])
        with wrapper.optim_context(model):
            y = model(x[mine])
        wrapper.update_params((y * target[mine]).sum())
    after = model.module.state_dict()
    return {
        k: (after[k] - before[k]) if after[k].is_floating_point() else after[k]
        for k in after
    }


def _accumulation_reference(accumulate):
    x, target = _data(samples=2 * BOUNDS[-1])
    model = _model()
    for j in range(accumulate):
        y = model(x[j * 8:(j + 1) * 8])
        (y * target[j * 8:(j + 1) * 8]).sum().backward()
    return model


@pytest.mark.parametrize('accumulate', [1, 2])
def test_gradient_accumulation_world_two(accumulate):
    """mmengine's OptimWrapper(accumulative_counts=k) under DDP (no_sync
    for k-1 micro-batches): the SGD update (lr 1, DDP's mean over ranks,
    the wrapper's 1/k) is the global gradient / (2k), and the running
    statistics saw every micro-batch's global batch."""
    ref = _accumulation_reference(accumulate)
    params = dict(ref.named_parameters())
    buffers = dict(ref.named_buffers())
    for got in run_distributed(_accumulation_world, 2, accumulate):
        for name, delta in got.items():
            if name in params:
                torch.testing.assert_close(
                    -delta * 2 * accumulate,
                    params[name].grad,
                    rtol=1e-10,
                    atol=1e-10)
            elif 'num_batches' in name:
                assert int(delta) == int(buffers[name]) == accumulate
            else:
                torch.testing.assert_close(
                    delta + _model().state_dict()[name],
                    buffers[name],
                    rtol=1e-10,
                    atol=1e-12)


def _autocast(dtype):
    """mmengine's autocast (what AmpOptimWrapper runs the model in) for
    bfloat16; it refuses float16 on CPU, which torch.autocast runs."""
    from mmengine.runner.amp import autocast
    if dtype == torch.bfloat16:
        return autocast(device_type='cpu', dtype=dtype)
    return torch.autocast('cpu', dtype=dtype)


def _autocast_world(rank, world_size, dtype):
    x, target = _data(torch.float32)
    mine = slice(BOUNDS[rank], BOUNDS[rank + 1])
    torch.manual_seed(0)
    model = DDP(convert_sync_batchnorm(Block()))
    with _autocast(dtype):
        y = model(x[mine])
        bn_in = model.module.conv1(x[mine])
        seen = (bn_in.dtype, model.module.bn1(bn_in).dtype)
    (y.float() * target[mine]).sum().backward()
    return dict(
        y=y.detach(),
        seen=seen,
        grads={
            n: p.grad * 2
            for n, p in model.module.named_parameters()
        },
        running=model.module.bn2.running_var.clone(),
        param_dtypes={p.dtype
                      for p in model.module.parameters()})


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_world_two(dtype):
    """mmengine's autocast on CPU (what AmpOptimWrapper runs in; the wrapper
    itself asserts CUDA): MMSyncBN takes the low-precision conv output with
    float32 parameters and returns what BatchNorm2d returns under the same
    autocast; its gradients and running statistics are as close to the
    float64 oracle as BatchNorm2d's on the whole batch (at most 2x its
    error); float16 through torch.autocast."""
    x, target = _data(torch.float32)
    torch.manual_seed(0)
    ref = Block()
    oracle = copy.deepcopy(ref).double()
    with _autocast(dtype):
        ref_y = ref(x)
        ref_seen = (ref.conv1(x).dtype, ref.bn1(ref.conv1(x)).dtype)
    (ref_y.float() * target).sum().backward()
    oracle_y = oracle(x.double())
    (oracle_y * target.double()).sum().backward()
    oracle_grads = dict(oracle.named_parameters())
    for rank, got in enumerate(run_distributed(_autocast_world, 2, dtype)):
        assert got['seen'] == ref_seen == (dtype, dtype)
        assert got['y'].dtype == ref_y.dtype
        assert got['param_dtypes'] == {torch.float32}
        mine = slice(BOUNDS[rank], BOUNDS[rank + 1])
        ours = (got['y'].double() - oracle_y[mine]).abs().max()
        theirs = (ref_y.double() - oracle_y).abs().max()
        assert ours <= 2 * theirs + 1e-6
        ours = (got['running'].double() - oracle.bn2.running_var).abs().max()
        theirs = (ref.bn2.running_var.double() -
                  oracle.bn2.running_var).abs().max()
        assert ours <= 2 * theirs + 1e-6
        for name, param in ref.named_parameters():
            if 'bn' not in name:
                continue  # conv gradients: this rank's part only
            want = oracle_grads[name].grad
            ours = (got['grads'][name].double() - want).abs().max()
            theirs = (param.grad.double() - want).abs().max()
            assert ours <= 2 * theirs + 1e-6 * want.abs().max(), name


DDP_VARIANTS = [
    dict(),
    dict(broadcast_buffers=False),
    dict(static_graph=True),
    dict(find_unused_parameters=True),
]


def _ddp_world(rank, world_size, twice):
    x, target = _data(samples=2 * BOUNDS[-1])
    out = []
    for kwargs in DDP_VARIANTS:
        if twice and kwargs.get('static_graph'):
            continue  # a static graph holds one forward per backward
        model = DDP(convert_sync_batchnorm(_model()), **kwargs)
        for _ in range(2):  # static_graph checks its graph at step 2
            model.zero_grad()
            loss = 0
            for j in range(2 if twice else 1):
                mine = slice(j * 8 + BOUNDS[rank], j * 8 + BOUNDS[rank + 1])
                loss = loss + (model(x[mine]) * target[mine]).sum()
            loss.backward()
        out.append(
            dict(
                grads={
                    n: p.grad * 2
                    for n, p in model.module.named_parameters()
                },
                buffers={
                    n: b.clone()
                    for n, b in model.module.named_buffers()
                }))
    return out


@pytest.mark.parametrize('twice', [False, True])
def test_ddp_variants_world_two(twice):
    """DDP with its defaults (broadcast_buffers=True), without buffer
    broadcast, with static_graph and find_unused_parameters, one or two
    forwards before one backward (torch's SyncBatchNorm fails there,
    pytorch/pytorch#22095): two steps equal one process with BatchNorm2d."""
    x, target = _data(samples=2 * BOUNDS[-1])
    ref = _model()
    for _ in range(2):
        ref.zero_grad()
        loss = 0
        for j in range(2 if twice else 1):
            loss = loss + (ref(x[j * 8:(j + 1) * 8]) *
                           target[j * 8:(j + 1) * 8]).sum()
        loss.backward()
    results = run_distributed(_ddp_world, 2, twice)
    for got_rank in results:
        assert len(got_rank) == len(DDP_VARIANTS) - twice
        for got in got_rank:
            for name, param in ref.named_parameters():
                torch.testing.assert_close(
                    got['grads'][name], param.grad, rtol=1e-10, atol=1e-10)
            for name, buf in ref.named_buffers():
                torch.testing.assert_close(
                    got['buffers'][name], buf, rtol=1e-10, atol=1e-12)


def test_double_backward_raises_naming_the_layer():
    """create_graph=True works for the first gradient; differentiating it
    again raises an error naming MMSyncBN, also where the incoming gradient
    is a constant (treating MMSyncBN's grad_input as a constant would be a
    silent wrong answer)."""
    layer = SyncBatchNorm(3).double()
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    for loss in (lambda y: y.square().sum(), lambda y: (y * 2).sum()):
        (grad, ) = torch.autograd.grad(loss(layer(x)), x, create_graph=True)
        with pytest.raises(
                RuntimeError,
                match='MMSyncBN does not support double backward'):
            grad.square().sum().backward()
    (grad, ) = torch.autograd.grad(layer(x).square().sum(), x)
    assert not grad.requires_grad
