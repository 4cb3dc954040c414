"""MMSyncBN inside FSDP1 and FSDP2 units at world 2 (gloo, CPU) equals BN
on the concatenated batch, with and without a bf16 parameter policy.

One spawn runs every case in turn on the same two ranks (3 and 5 samples):
FSDP1 (``device_id`` cpu, one unit per block) and FSDP2 (``fully_shard`` on
a CPU mesh, per block and the root), each in float64 without mixed
precision and in float32 with ``param_dtype=bfloat16`` (the norms kept in
float32: FSDP1 by ``_module_classes_to_ignore``, FSDP2 by
``fully_shard_norms``), and FSDP2 under the bf16 policy without the helper.
The oracle is ``F.batch_norm`` in float64 over the inputs and output
gradients the layers saw on both ranks, concatenated; without mixed
precision also the whole model in this process on the concatenated batch.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from dist_utils import run_distributed

from mmsync.cnn import convert_sync_batchnorm
from mmsync.engine import fully_shard_norms
from mmsync.ops import SyncBatchNorm

SIZES = (3, 5)
WORLD_SIZE = len(SIZES)
CASES = ('fsdp1', 'fsdp1-bf16', 'fsdp2', 'fsdp2-bf16', 'fsdp2-bf16-no-helper')


class Block(nn.Sequential):
    """conv-BN-ReLU: the unit each FSDP version shards."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU())


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(Block(3, 4), Block(4, 4))
    for block in model:
        # BN's own init (weight 1, bias 0) would hide a swapped weight and
        # bias; running statistics away from (0, 1) likewise.
        nn.init.uniform_(block[1].weight, 0.5, 1.5)
        nn.init.uniform_(block[1].bias, -0.5, 0.5)
        block[1].running_mean.uniform_(-1, 1)
        block[1].running_var.uniform_(0.5, 2)
    return model


def batch():
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(
        sum(SIZES), 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1
    grads = torch.randn(
        sum(SIZES), 4, 5, 5, generator=gen, dtype=torch.float64)
    return inputs, grads


def rank_slice(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SIZES[:rank])
    return tensor[start:start + SIZES[rank]]


def strip(name: str) -> str:
    """The parameter's name in the unwrapped model."""
    return name.replace('_fsdp_wrapped_module.', '')


def capture(model: nn.Module) -> list:
    """Record, per norm layer, its weight and bias in forward, and its input
    as the block passes it and its output as it returns it, with their
    gradients (registered before sharding: FSDP1's cast of a norm's input
    to float32 and of its output back to bf16 fall between them)."""
    records = []
    for module in model.modules():
        if not isinstance(module, SyncBatchNorm):
            continue
        record = {}
        records.append(record)

        def pre_hook(layer, args, record=record):
            record['weight'] = layer.weight.detach().clone()
            record['bias'] = layer.bias.detach().clone()
            record['input'] = args[0].detach().clone()
            args[0].register_hook(
                lambda grad: record.__setitem__('grad_input', grad.clone()))

        def hook(layer, args, output, record=record):
            record['output'] = output.detach().clone()
            output.register_hook(
                lambda grad: record.__setitem__('grad_output', grad.clone()))

        module.register_forward_pre_hook(pre_hook)
        module.register_forward_hook(hook, prepend=True)
    return records


def shard(case: str, model: nn.Module) -> nn.Module:
    """Shard ``model`` as ``case`` says; returns the module to call."""
    bf16 = 'bf16' in case
    if case.startswith('fsdp1'):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import MixedPrecision
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        return FSDP(
            model,
            device_id=torch.device('cpu'),
            auto_wrap_policy=ModuleWrapPolicy({Block}),
            mixed_precision=MixedPrecision(
                param_dtype=torch.bfloat16,
                reduce_dtype=torch.bfloat16,
                buffer_dtype=torch.bfloat16) if bf16 else None,
            use_orig_params=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh('cpu', (WORLD_SIZE, ))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.bfloat16 if bf16 else None)
    if bf16 and not case.endswith('no-helper'):
        fully_shard_norms(model, mesh=mesh)
    for block in model:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_grads(case: str, sharded: nn.Module) -> dict:
    """Every parameter's gradient, whole, by its unwrapped name."""
    if case.startswith('fsdp1'):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(sharded, with_grads=True):
            return {
                strip(name): p.grad.detach().clone()
                for name, p in sharded.named_parameters()
            }
    return {
        name: p.grad.full_tensor().detach().clone()
        for name, p in sharded.named_parameters()
    }


def _fsdp_worker(rank: int, world_size: int, init: dict, inputs: torch.Tensor,
                 grads: torch.Tensor) -> dict:
    results = {}
    for case in CASES:
        dtype = torch.float32 if 'bf16' in case else torch.float64
        model = make_model().to(dtype)
        model.load_state_dict(init)
        model = convert_sync_batchnorm(model)
        records = capture(model)
        conv_dtypes = []
        model[0][0].register_forward_pre_hook(
            lambda layer, args: conv_dtypes.append(layer.weight.dtype))
        sharded = shard(case, model)
        output = sharded(rank_slice(inputs, rank).to(dtype))
        (output.to(dtype) * rank_slice(grads, rank).to(dtype)).sum().backward()
        results[case] = dict(
            records=records,
            output=output.detach(),
            grads=full_grads(case, sharded),
            buffers={
                strip(name): b.detach().clone()
                for name, b in sharded.named_buffers()
            },
            conv_dtype=conv_dtypes[0])
        dist.barrier()
    return results


@pytest.fixture(scope='module')
def fsdp_run():
    reference = make_model().double()
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    inputs, grads = batch()
    outputs = run_distributed(
        _fsdp_worker,
        WORLD_SIZE,
        init,
        inputs,
        grads,
        timeout=240,
        pg_timeout=60)
    # One process, plain BN, the whole batch.
    output = reference(inputs)
    (output * grads).sum().backward()
    return dict(
        outputs=outputs,
        init=init,
        reference=dict(
            output=output.detach(),
            grads={
                name: p.grad
                for name, p in reference.named_parameters()
            },
            buffers=dict(reference.named_buffers())))


def oracle(records: list, layer: int, init: dict) -> dict:
    """BN in float64 over what both ranks' ``layer`` saw, concatenated."""
    prefix = f'{layer}.1.'
    x = torch.cat([r[layer]['input'] for r in records]).double()
    dy = torch.cat([r[layer]['grad_output'] for r in records]).double()
    x.requires_grad_(True)
    # The affine parameters as the layer saw them (cast by a policy that
    # reaches them), the running statistics as they were.
    weight = records[0][layer]['weight'].double().requires_grad_(True)
    bias = records[0][layer]['bias'].double().requires_grad_(True)
    running_mean = init[prefix + 'running_mean'].double().clone()
    running_var = init[prefix + 'running_var'].double().clone()
    y = F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1,
                     1e-5)
    y.backward(dy)
    return dict(
        output=y.detach(),
        grad_input=x.grad,
        weight=weight.grad,
        bias=bias.grad,
        running_mean=running_mean,
        running_var=running_var)


# Tolerances by the dtype a value is held in: float64 runs are exact to
# rounding; float32 values computed from the same bf16 or float32 data to
# float32's; bf16 activations to one rounding of the float32 result.
TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-4),
}


def close(actual: torch.Tensor,
          expected: torch.Tensor,
          msg: str,
          precision: torch.dtype = None) -> None:
    """Compare at the tolerance of ``precision`` (default: the dtype of
    ``actual``)."""
    torch.testing.assert_close(
        actual.double(),
        expected,
        **TOLERANCE[precision or actual.dtype],
        msg=msg)


@pytest.mark.parametrize('case', CASES)
def test_norms_match_bn_on_concatenated_batch(fsdp_run, case):
    """Outputs, grad_input, the reduced weight and bias gradients and the
    running statistics of every MMSyncBN against the float64 oracle."""
    results = [output[case] for output in fsdp_run['outputs']]
    records = [result['records'] for result in results]
    for layer in range(2):
        expected = oracle(records, layer, fsdp_run['init'])
        prefix = f'{layer}.1.'
        for rank, result in enumerate(results):
            record = result['records'][layer]
            where = f'{case}, layer {layer}, rank {rank}'
            close(record['output'], rank_slice(expected['output'], rank),
                  f'output: {where}')
            close(record['grad_input'], rank_slice(expected['grad_input'],
                                                   rank),
                  f'grad_input: {where}')
            # FSDP averages the ranks' gradients: each rank's loss is the
            # sum over its slice, so every gradient is the total / world;
            # reduced in the dtype the layer computed in.
            for name in ('weight', 'bias'):
                close(result['grads'][prefix + name] * WORLD_SIZE,
                      expected[name], f'grad {name}: {where}',
                      record[name].dtype)
            for name in ('running_mean', 'running_var'):
                close(result['buffers'][prefix + name], expected[name],
                      f'{name}: {where}')
            assert int(result['buffers'][prefix + 'num_batches_tracked']) == 1


@pytest.mark.parametrize('case', ['fsdp1', 'fsdp2'])
def test_whole_model_matches_one_process(fsdp_run, case):
    """Without mixed precision, in float64: every output and every
    parameter's gradient equals the plain-BN model's on the whole batch."""
    reference = fsdp_run['reference']
    for rank, output in enumerate(fsdp_run['outputs']):
        result = output[case]
        close(result['output'], rank_slice(reference['output'], rank),
              f'{case} output, rank {rank}')
        assert set(result['grads']) == set(reference['grads'])
        for name, grad in reference['grads'].items():
            close(result['grads'][name] * WORLD_SIZE, grad,
                  f'{case} grad {name}, rank {rank}')
        for name, buffer in reference['buffers'].items():
            torch.testing.assert_close(
                result['buffers'][name].to(buffer.dtype),
                buffer,
                rtol=1e-10,
                atol=1e-12,
                msg=f'{case} {name}, rank {rank}')


@pytest.mark.parametrize('case', ['fsdp1-bf16', 'fsdp2-bf16'])
def test_bf16_policy_keeps_norms_float32(fsdp_run, case):
    """The policy reaches the convolutions, not the norms' parameters nor
    their running statistics."""
    for output in fsdp_run['outputs']:
        result = output[case]
        assert result['conv_dtype'] == torch.bfloat16
        assert [r['weight'].dtype
                for r in result['records']] == [torch.float32] * 2
        for name, buffer in result['buffers'].items():
            if 'running' in name:
                assert buffer.dtype == torch.float32, name


def test_bf16_policy_without_helper_casts_fsdp2_norms(fsdp_run):
    """Why ``fully_shard_norms`` exists: FSDP2 casts the norms' weight and
    bias with the block (torch's BatchNorm fails there, torchtitan#674);
    MMSyncBN still runs and matches the oracle (the test above), its
    running statistics stay float32, but it learns through bf16."""
    for output in fsdp_run['outputs']:
        result = output['fsdp2-bf16-no-helper']
        assert [r['weight'].dtype
                for r in result['records']] == [torch.bfloat16] * 2
        assert result['buffers']['0.1.running_mean'].dtype == torch.float32
