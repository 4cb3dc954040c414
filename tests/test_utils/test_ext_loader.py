"""ext_loader resolves the compiled ops by name, or says how to build."""
import pytest
import torch

from mmsync.utils import check_ops_exist, load_ext


def test_resolves_ops_by_name():
    assert check_ops_exist()
    ext = load_ext('_ext', ['sync_bn_forward_stats', 'sync_bn_forward_output'])
    assert ext.sync_bn_forward_stats is torch.ops.mmsync.sync_bn_forward_stats
    stats = ext.sync_bn_forward_stats(torch.ones(2, 3), True)
    assert stats.shape == (11, )  # [w, n, shift, mean, M2] for C = 3


def test_missing_names_are_listed_together():
    with pytest.raises(ImportError) as info:
        load_ext('_ext', ['sync_bn_forward_stats', 'no_such_op', 'nor_this'])
    message = str(info.value)
    assert 'no_such_op, nor_this' in message
    assert 'pip install -v -e . --no-build-isolation' in message


def test_missing_module_lists_every_name():
    with pytest.raises(ImportError) as info:
        load_ext('_not_built', ['op_a', 'op_b'])
    message = str(info.value)
    assert 'mmsync._not_built is not built' in message
    assert 'op_a, op_b' in message
    assert 'pip install -v -e . --no-build-isolation' in message
