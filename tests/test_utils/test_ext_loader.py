"""ext_loader resolves the compiled ops by name, or says how to build."""
import os
import os.path as osp
import runpy
import subprocess
import sys

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


# A checkout whose _ext was built for another torch than this one
# (.ci/cuda_env.sh runs this file on torch's CUDA build with the main
# environment's checkout, built for the CPU torch 2.13.0).
OTHER_TREE = os.environ.get('MMSYNC_OTHER_TORCH_TREE')


@pytest.mark.skipif(
    not OTHER_TREE,
    reason='needs MMSYNC_OTHER_TORCH_TREE, a checkout whose _ext was built '
    'for another torch (.ci/cuda_env.sh sets it)')
def test_ext_built_for_another_torch_is_named_in_one_line(tmp_path):
    """Importing it ends in one line naming both torches and the rebuild,
    not an undefined symbol; the tools say it in one line of their own."""
    built = runpy.run_path(osp.join(OTHER_TREE, 'mmsync',
                                    '_build_info.py'))['TORCH_VERSION']
    assert built.split('+')[0] != torch.__version__.split('+')[0]

    def run(*args):
        return subprocess.run([sys.executable, *args],
                              cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=OTHER_TREE),
                              capture_output=True,
                              text=True,
                              timeout=300)

    result = run('-c', 'import mmsync')
    assert result.returncode == 1
    assert 'undefined symbol' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f'ImportError: mmsync._ext was built for torch {built} but torch '
        f'{torch.__version__} is running: rebuild mmsync'), result.stderr
    assert f'install torch=={built.split("+")[0]}' in last
    tool = run(osp.join(OTHER_TREE, 'tools', 'train.py'), '--help')
    assert tool.returncode == 1
    assert tool.stderr.strip().splitlines() == [
        'train.py: error: ' + last[len('ImportError: '):]
    ]
