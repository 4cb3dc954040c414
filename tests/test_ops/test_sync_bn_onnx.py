"""ONNX export of MMSyncBN: standard BatchNormalization nodes in eval mode
(checked with onnxruntime), one ``mmsync::MMSyncBatchNorm`` node carrying
the synchronization attributes in training mode."""
import io
import warnings

import pytest
import torch
import torch.nn as nn
from dist_utils import run_distributed

from mmsync.ops import SyncBatchNorm

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')


def _randomize(model):
    """Non-trivial running stats and affine parameters."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, SyncBatchNorm):
            m.running_mean.uniform_(-1, 1, generator=gen)
            m.running_var.uniform_(0.5, 2, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.uniform_(-1, 1, generator=gen)
    return model


def _export(model, x, dynamo, **kwargs):
    """The ONNX ModelProto from either exporter, without folding BN away."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if dynamo:
            program = torch.onnx.export(
                model, (x, ), dynamo=True, optimize=False, **kwargs)
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(
            model, (x, ),
            buffer,
            dynamo=False,
            do_constant_folding=False,
            **kwargs)
    return onnx.load_from_string(buffer.getvalue())


EVAL_CASES = {
    'conv-4d': (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), SyncBatchNorm(8, act='relu'), nn.Conv2d(8, 4, 1),
        SyncBatchNorm(4, stats_mode='N')), (2, 3, 10, 10), 2),
    '2d':
    (lambda: nn.Sequential(nn.Linear(5, 6), SyncBatchNorm(6)), (7, 5), 1),
    '5d': (lambda: SyncBatchNorm(3, act='relu'), (2, 3, 4, 5, 6), 1),
}


@pytest.mark.parametrize('dynamo', [True, False], ids=['dynamo', 'script'])
@pytest.mark.parametrize('case', sorted(EVAL_CASES))
def test_eval_exports_batchnormalization(case, dynamo):
    build, shape, layers = EVAL_CASES[case]
    model = _randomize(build()).eval()
    x = torch.randn(shape)
    proto = _export(model, x, dynamo)
    onnx.checker.check_model(proto)
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count('BatchNormalization') == layers
    assert all(node.domain in ('', 'ai.onnx') for node in proto.graph.node)
    session = ort.InferenceSession(
        proto.SerializeToString(), providers=['CPUExecutionProvider'])
    (got, ) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(
        torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


def _attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _training_nodes(model, x):
    proto = _export(
        model,
        x,
        dynamo=False,
        training=torch.onnx.TrainingMode.TRAINING,
        custom_opsets={'mmsync': 1})
    nodes = [n for n in proto.graph.node if n.domain == 'mmsync']
    opsets = {o.domain: o.version for o in proto.opset_import}
    return [(n.op_type, list(n.input), _attributes(n))
            for n in nodes], opsets['mmsync'], [
                n.op_type for n in proto.graph.node
                if n.op_type == 'BatchNormalization'
            ]


def test_training_exports_one_mmsync_node_per_layer():
    """TorchScript exporter (dynamo=False) in training mode."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), SyncBatchNorm(8, act='relu', stats_mode='N'),
        nn.Conv2d(8, 4, 1),
        SyncBatchNorm(4, eps=1e-3, momentum=None, affine=False)).train()
    nodes, version, batchnorms = _training_nodes(model,
                                                 torch.randn(2, 3, 10, 10))
    assert version == 1 and batchnorms == []
    assert len(nodes) == 2
    (op0, inputs0, attrs0), (op1, inputs1, attrs1) = nodes
    assert op0 == op1 == 'MMSyncBatchNorm'
    assert inputs0[1:] == [
        '1.weight', '1.bias', '1.running_mean', '1.running_var'
    ]
    assert inputs1[1:] == ['3.running_mean', '3.running_var']
    assert attrs0 == dict(
        eps=pytest.approx(1e-5),
        momentum=pytest.approx(0.1),
        cumulative_average=0,
        group_size=1,
        stats_mode=b'N',
        relu=1,
        affine=1,
        track_running_stats=1)
    assert attrs1 == dict(
        eps=pytest.approx(1e-3),
        momentum=0.0,
        cumulative_average=1,
        group_size=1,
        stats_mode=b'default',
        relu=0,
        affine=0,
        track_running_stats=1)


def _export_world(rank, world_size):
    model = nn.Sequential(SyncBatchNorm(3, track_running_stats=False))
    nodes, _, _ = _training_nodes(model.train(), torch.randn(4, 3, 5))
    return [(op, attrs['group_size'], attrs['track_running_stats'])
            for op, _, attrs in nodes]


def test_training_export_carries_the_group_size():
    """Exported on each rank of a world of 2, the node says group_size=2."""
    want = [('MMSyncBatchNorm', 2, 0)]
    assert run_distributed(_export_world, 2) == [want, want]
