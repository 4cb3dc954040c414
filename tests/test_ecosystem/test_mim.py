"""`mim train mmsync` and `mim test mmsync` (openmim 0.3.9) on CPU.

mim looks the package up as an installed distribution and runs
``mmsync/.mim/tools/train.py`` (or ``test.py``) under
``torch.distributed.launch``, which passes ``--local-rank``; a config given
by its file name alone is found in ``mmsync/.mim/configs``. Needs openmim
(the second environment, .ci/cuda_env.sh, whose tree is a distribution by
``setup.py egg_info``).
"""
import json
import os
import os.path as osp
import sys

import pytest

sys.path.insert(
    0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'test_tools'))
from tools_launch import finish  # noqa: E402
from tools_launch import REPO, accuracies, base_env, free_port, start

pytest.importorskip(
    'mim', reason='needs openmim (the second environment, .ci/cuda_env.sh)')


def mim_finds_this_checkout():
    """Why mim would not run this checkout's mmsync, or None."""
    import pkg_resources
    try:
        location = pkg_resources.get_distribution('mmsync').location
    except pkg_resources.DistributionNotFound:
        return ('mmsync is no distribution on the path: run `python setup.py '
                'egg_info` in the checkout (as .ci/cuda_env.sh does)')
    if osp.realpath(osp.join(location, 'mmsync')) != osp.join(REPO, 'mmsync'):
        return (f'the mmsync distribution mim finds lies in {location}, not '
                'in this checkout')
    return None


pytestmark = pytest.mark.skipif(
    mim_finds_this_checkout() is not None,
    reason=str(mim_finds_this_checkout()))

CONFIG = 'resnet-tiny_mmsyncbn_2xb32-15e_digits.py'
SHORT = [
    '--cfg-options', 'train_dataloader.dataset.indices=333',
    'train_cfg.max_epochs=1'
]


def mim(*args):
    """Run ``mim`` of this interpreter in the checkout, GPUs hidden."""
    env = base_env(CUDA_VISIBLE_DEVICES='', MKL_NUM_THREADS='1')
    env['PATH'] = osp.dirname(sys.executable) + os.pathsep + env['PATH']
    result = finish(start([sys.executable, '-m', 'mim', *args], env), 600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def test_mim_train_and_test_on_cpu(tmp_path):
    """Two processes: the config by its name (from mmsync/.mim/configs),
    one short epoch; then its checkpoint tested over two processes."""
    work_dir = tmp_path / 'work'
    result = mim('train', 'mmsync', CONFIG, '--launcher', 'pytorch',
                 '--gpus', '2', '--port', str(free_port()), '--work-dir',
                 str(work_dir), *SHORT)
    assert 'torch.distributed.launch' in result.stdout
    assert osp.join('mmsync', '.mim', 'tools', 'train.py') in result.stdout
    assert 'process group: gloo, 2 ranks' in result.stdout + result.stderr
    # One epoch of warm-up on 333 samples: trained, not yet accurate.
    top1 = accuracies(str(work_dir))
    assert len(top1) == 1 and osp.isfile(work_dir / 'epoch_1.pth'), top1
    out = tmp_path / 'metrics.json'
    mim('test', 'mmsync', CONFIG, '--checkpoint',
        str(work_dir / 'epoch_1.pth'), '--launcher', 'pytorch',
        '--gpus', '2', '--port', str(free_port()), '--work-dir',
        str(tmp_path / 'test'), '--out', str(out))
    assert json.loads(out.read_text()) == {'accuracy/top1': top1[0]}
