"""mmsync as users get it: an sdist of this checkout and the wheel built from
it, each installed into a fresh venv (torch first), used from a folder
outside the checkout with the installed tools only.

- venv "sdist": ``pip install SRC`` without torch ends in the build
  backend's one line; then torch and ``pip install --no-build-isolation
  SDIST``; the layer equals ``F.batch_norm`` over the global batch at world
  2; the installed ``dist_train.sh`` trains the main config at world 2 to
  >= 97 % and ends with the summary line; the installed ``dist_test.sh``
  evaluates its checkpoint.
- venv "wheel": the wheel pip built from the sdist, with openmim:
  ``mim train mmsync`` and ``mim test mmsync`` at world 2.

One compile in all (the sdist's); about 5 min on 2 cores.
"""
import glob
import json
import os
import os.path as osp
import re
import subprocess
import sys
import tarfile

import pytest
from tools_launch import REPO, accuracies, free_port, run


def pinned(name: str, requirements: str) -> str:
    """The line of ``requirements/<requirements>`` that pins ``name``."""
    with open(
            osp.join(REPO, 'requirements', requirements),
            encoding='utf-8') as f:
        return [line.strip() for line in f if line.startswith(name + '==')][0]


TORCH = pinned('torch', 'torch.txt')
OPENMIM = pinned('openmim', 'ecosystem.txt')
CONFIG = 'resnet-tiny_mmsyncbn_2xb32-15e_digits.py'
# What the venvs get besides mmsync and its runtime requirements: the build
# tools of --no-build-isolation (mim imports pkg_resources: setuptools<82).
BUILD = ['setuptools<82', 'wheel', 'ninja']

# World 2 at unequal splits (5 + 2 samples), against F.batch_norm over the
# concatenated batch in float64: output, grad_input, grad_weight, grad_bias,
# running statistics.
EXACT = r'''
import os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
import torch.nn.functional as F
import mmsync
from mmsync.ops import SyncBatchNorm

def work(rank, port):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, 3, 3, generator=g, dtype=torch.float64) * 3 + 1
    dy = torch.randn(7, 4, 3, 3, generator=g, dtype=torch.float64)
    part = slice(0, 5) if rank == 0 else slice(5, 7)
    bn = SyncBatchNorm(4, stats_mode='N').double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5); bn.bias.uniform_(-1, 1)
    ref = torch.nn.BatchNorm2d(4).double()
    ref.load_state_dict(bn.state_dict())
    xs = x[part].clone().requires_grad_()
    y = bn(xs); y.backward(dy[part])
    xr = x.clone().requires_grad_()
    yr = ref(xr); yr.backward(dy)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert close(y, yr[part]) and close(xs.grad, xr.grad[part])
    assert close(bn.weight.grad * 2, ref.weight.grad)
    assert close(bn.bias.grad * 2, ref.bias.grad)
    assert close(bn.running_mean, ref.running_mean)
    assert close(bn.running_var, ref.running_var)
    dist.destroy_process_group()

if __name__ == '__main__':
    mp.spawn(work, args=(int(sys.argv[1]), ), nprocs=2)
    print('exact at world 2 from', os.path.dirname(mmsync.__file__))
'''


def venv(path, *packages):
    """A fresh venv at ``path`` with ``packages``; its python."""
    run([sys.executable, '-m', 'venv', str(path)], timeout=120)
    py = osp.join(path, 'bin', 'python')
    if packages:
        pip(py, 'install', *packages)
    return py


def pip(py, *args, check=True):
    """pip of the venv of ``py`` (its output on failure)."""
    return run([py, '-m', 'pip', '-q', *args],
               timeout=900,
               env=venv_env(py),
               check=check)


def venv_env(py, **extra):
    """The environment of a user of the venv of ``py``: its bin first on the
    PATH (``python``, ``torchrun``, ``mim``), nothing of the checkout on
    PYTHONPATH, GPUs hidden."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ('PYTHONPATH', 'VIRTUAL_ENV')
    }
    env['PATH'] = osp.dirname(py) + os.pathsep + env['PATH']
    env.update(
        CUDA_VISIBLE_DEVICES='', PIP_DISABLE_PIP_VERSION_CHECK='1', **extra)
    return env


def in_dir(py, cwd, *cmd, timeout=600, **extra):
    """Run ``cmd`` as the venv's user in ``cwd`` (outside the checkout)."""
    result = subprocess.run(
        list(cmd),
        cwd=cwd,
        env=venv_env(py, **extra),
        capture_output=True,
        text=True,
        timeout=timeout)
    assert result.returncode == 0, (
        result.stdout[-3000:] + result.stderr[-3000:])
    return result


def site_package(py, cwd):
    """The installed package's folder (it must not be the checkout's)."""
    out = in_dir(
        py, cwd, py, '-c', 'import mmsync, os; '
        'print(os.path.dirname(mmsync.__file__))').stdout
    path = out.strip().splitlines()[-1]
    assert 'site-packages' in path and not path.startswith(REPO), path
    return path


@pytest.fixture(scope='module')
def sdist(tmp_path_factory):
    """``setup.py sdist`` of a copy of the checkout's files."""
    root = tmp_path_factory.mktemp('package')
    src = root / 'src'
    files = subprocess.run(
        ['git', 'ls-files', '-co', '--exclude-standard', '-z'],
        cwd=REPO,
        capture_output=True,
        check=True).stdout.decode().split('\0')
    with tarfile.open(root / 'tree.tar', 'w') as tar:
        for name in filter(None, files):
            if osp.lexists(osp.join(REPO, name)):
                tar.add(osp.join(REPO, name), name, recursive=False)
    with tarfile.open(root / 'tree.tar') as tar:
        # extraction filters came with 3.11.4 (and later patch releases of
        # 3.8-3.10); Debian's 3.11.2 has none, and 3.14 filters by default.
        extract = ({'filter': 'tar'} if hasattr(tarfile, 'tar_filter') else {})
        tar.extractall(src, **extract)
    built = subprocess.run(
        [sys.executable, 'setup.py', '-q', 'sdist', '-d',
         str(root / 'dist')],
        cwd=src,
        env=dict(os.environ, PYTHONPATH=''),
        capture_output=True,
        text=True,
        timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (path, ) = glob.glob(str(root / 'dist' / 'mmsync-*.tar.gz'))
    return root, src, path


def test_sdist_holds_what_a_build_needs(sdist):
    """requirements/, every header and CUDA source, configs and tools."""
    _, src, path = sdist
    with tarfile.open(path) as tar:
        names = {n.split('/', 1)[1] for n in tar.getnames() if '/' in n}
    wanted = subprocess.run(['git', 'ls-files'],
                            cwd=REPO,
                            capture_output=True,
                            text=True,
                            check=True).stdout.split()
    needed = [
        n for n in wanted if re.match(
            r'(requirements/.*\.txt|mmsync/ops/csrc/.*\.(h|cuh|cu|cpp)'
            r'|configs/.*\.py|tools/.*\.(py|sh)|pep517/.*\.py)$', n)
    ]
    assert needed and not [n for n in needed if n not in names]
    assert {'pyproject.toml', 'MANIFEST.in', 'setup.py'} <= names
    assert not [n for n in names if n.endswith(('.so', '.o', '.pyc'))]


@pytest.fixture(scope='module')
def installed(sdist):
    """venv "sdist" with mmsync installed from the sdist (after the failing
    plain install), and the wheel pip built from it."""
    root, src, path = sdist
    py = venv(root / 'venv-sdist')
    # No torch: pip's isolated build reaches the backend's check.
    plain = pip(py, 'install', str(src), check=False)
    pip(py, 'install', TORCH, *BUILD)
    cache = root / 'pip-cache'
    pip(py, '--cache-dir', str(cache), 'install', '--no-build-isolation', path)
    (wheel, ) = glob.glob(
        str(cache / 'wheels' / '**' / 'mmsync-*.whl'), recursive=True)
    return root, py, wheel, plain


def test_plain_install_without_torch_says_what_to_do(installed):
    """One line from mmsync's build backend, no traceback."""
    plain = installed[3]
    assert plain.returncode != 0
    out = plain.stdout + plain.stderr
    lines = [line for line in out.splitlines() if 'mmsync: error' in line]
    assert len(lines) == 1, out[-3000:]
    assert 'pip install --no-build-isolation' in lines[0]
    assert 'Traceback' not in out and 'ModuleNotFoundError' not in out


def test_sdist_install_trains_and_tests_from_outside(installed, tmp_path):
    """The layer is exact, dist_train.sh trains, dist_test.sh evaluates,
    all from the installed package and a folder outside the checkout."""
    _, py, wheel, _ = installed
    site = site_package(py, tmp_path)
    meta = in_dir(
        py, tmp_path, py, '-c', 'import importlib.metadata as m; '
        'print(m.requires("mmsync"))').stdout
    assert f"'{TORCH}'" in meta, meta  # pinned to the torch it was built for
    (tmp_path / 'exact.py').write_text(EXACT)
    out = in_dir(py, tmp_path, py, 'exact.py', str(free_port())).stdout
    assert f'exact at world 2 from {site}' in out
    tools = osp.join(site, '.mim', 'tools')
    config = glob.glob(osp.join(site, '.mim', 'configs', '*', CONFIG))[0]
    work = tmp_path / 'work'
    train = in_dir(py, tmp_path, 'bash', osp.join(tools, 'dist_train.sh'),
                   config, '2', '--work-dir', str(work))
    top1 = accuracies(str(work))
    assert len(top1) == 15 and top1[-1] >= 97, top1
    summary = [
        line for line in train.stdout.splitlines() if 'summary: ' in line
    ]
    assert len(summary) == 1, train.stdout[-3000:]
    assert 'best accuracy/top1' in summary[0]
    assert osp.join(str(work), 'epoch_15.pth') in summary[0]
    out = tmp_path / 'metrics.json'
    in_dir(py, tmp_path, 'bash', osp.join(tools, 'dist_test.sh'), config,
           str(work / 'epoch_15.pth'), '2', '--work-dir',
           str(tmp_path / 'test'), '--out', str(out))
    assert json.loads(out.read_text()) == {'accuracy/top1': top1[-1]}


def test_wheel_install_runs_mim(installed, tmp_path):
    """The wheel built from the sdist in a venv of its own: ``mim train
    mmsync`` and ``mim test mmsync`` find the installed package's tools and
    configs."""
    root, _, wheel, _ = installed
    py = venv(tmp_path / 'venv-wheel', TORCH, *BUILD, OPENMIM)
    pip(py, 'install', wheel)
    site_package(py, tmp_path)
    work = tmp_path / 'work'
    short = [
        '--cfg-options', 'train_dataloader.dataset.indices=333',
        'train_cfg.max_epochs=1'
    ]
    result = in_dir(py, tmp_path, py, '-m', 'mim', 'train', 'mmsync', CONFIG,
                    '--launcher', 'pytorch', '--gpus', '2', '--port',
                    str(free_port()), '--work-dir', str(work), *short)
    assert osp.join('site-packages', 'mmsync', '.mim', 'tools',
                    'train.py') in result.stdout
    top1 = accuracies(str(work))
    assert len(top1) == 1, result.stdout[-3000:]
    out = tmp_path / 'metrics.json'
    in_dir(py, tmp_path, py, '-m', 'mim', 'test', 'mmsync', CONFIG,
           '--checkpoint', str(work / 'epoch_1.pth'), '--launcher', 'pytorch',
           '--gpus', '2', '--port', str(free_port()), '--work-dir',
           str(tmp_path / 'test'), '--out', str(out))
    assert json.loads(out.read_text()) == {'accuracy/top1': top1[0]}
