"""Set-up: no setuptools warnings about the C++ sources, and the compiled
objects kept where a second build finds them (so it rebuilds nothing)."""
import glob
import os.path as osp
import shutil
import subprocess
import sys

import pytest
from tools_launch import REPO, run


def test_build_py_has_no_warnings_about_the_sources(tmp_path):
    """The C++ sources are the extension's, not package data: setuptools
    used to warn about every csrc folder as an 'importable package'."""
    # A copy of the sources without build output (also where the tree is
    # not a git checkout of its own, as in .ci/cuda_env.sh's copy).
    tree = tmp_path / 'tree'
    # (mmsync/.mim's links kept as links, as in a checkout.)
    shutil.copytree(
        REPO,
        tree,
        symlinks=True,
        ignore=shutil.ignore_patterns('build', '.git', '.venv', '.dist_test',
                                      'work_dirs', 'data', '*.so',
                                      '__pycache__', '*.egg-info'))
    out = tmp_path / 'out'
    result = subprocess.run(
        [sys.executable, 'setup.py', 'build_py', '-d',
         str(out)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    assert 'importable package' not in text
    assert 'csrc' not in text
    assert (out / 'mmsync' / 'datasets' / 'digits.npz').is_file()
    assert not (out / 'mmsync' / 'ops' / 'csrc').exists()
    # .mim as a wheel ships it: copies of configs/ and tools/, not links.
    mim = out / 'mmsync' / '.mim'
    for name in (
            'configs/resnet_tiny/resnet-tiny_mmsyncbn_2xb32-15e_digits.py',
            'configs/_base_/default_runtime.py', 'tools/train.py',
            'tools/test.py', 'tools/dist_train.sh', 'tools/misc/torchrun.py'):
        assert (mim / name).is_file() and not (mim / name).is_symlink(), name
    assert not any(p.is_symlink() for p in mim.rglob('*'))


def test_mim_folder_is_in_the_package():
    """mmsync/.mim links to configs/ and tools/, so the package imported
    from the checkout (PYTHONPATH, or the editable install of
    tools/setup/setup_env.sh) has what `mim train mmsync` runs."""
    import mmsync
    mim = osp.join(osp.dirname(mmsync.__file__), '.mim')
    assert osp.realpath(osp.join(mim, 'tools')) == osp.join(REPO, 'tools')
    assert osp.isfile(osp.join(mim, 'tools', 'train.py'))
    assert osp.isfile(
        osp.join(mim, 'configs', 'resnet_tiny',
                 'resnet-tiny_mmsyncbn_2xb32-15e_digits.py'))


def test_compiled_objects_are_up_to_date():
    """After tools/setup/setup_env.sh (pip install -e .) or setup.py build_ext
    --inplace, build/temp holds ninja's state: nothing left to rebuild."""
    build = osp.join(REPO, 'build', 'temp')
    # The ninja that built it: the environment's (pip's ninja package), not
    # another on the PATH, whose log format may differ.
    ninja = (
        shutil.which('ninja', path=osp.dirname(sys.executable))
        or shutil.which('ninja'))
    if ninja is None or not osp.isfile(osp.join(build, 'build.ninja')):
        pytest.skip('no ninja build in build/temp: the extension was built '
                    'another way')
    result = run([ninja, '-C', build, '-n'], timeout=60)
    assert 'no work to do' in result.stdout, result.stdout


SHELL_TOOLS = sorted(
    osp.relpath(p, REPO)
    for p in glob.glob(osp.join(REPO, 'tools', '**', '*.sh'), recursive=True) +
    glob.glob(osp.join(REPO, '.ci', '*.sh'))
    # (sourced by the launchers, not run)
    if not p.endswith(osp.join('misc', 'torchrun.sh')))


@pytest.mark.parametrize('tool', SHELL_TOOLS)
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_shell_tool_answers_help_without_side_effects(tool, flag, tmp_path):
    """Its header comment, exit 0, nothing written or installed (a set-up
    script's --help used to run the whole set-up)."""
    result = subprocess.run(['bash', osp.join(REPO, tool), flag],
                            cwd=tmp_path,
                            capture_output=True,
                            text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) >= 2 and not result.stderr
    assert not result.stdout.startswith(('#', '!')), result.stdout
    assert list(tmp_path.iterdir()) == []
