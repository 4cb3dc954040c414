"""Set-up: no setuptools warnings about the C++ sources, and the compiled
objects kept where a second build finds them (so it rebuilds nothing)."""
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
    shutil.copytree(
        REPO,
        tree,
        ignore=shutil.ignore_patterns('build', '.git', 'work_dirs', 'data',
                                      '*.so', '__pycache__', '*.egg-info'))
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


def test_compiled_objects_are_up_to_date():
    """After tools/setup_env.sh (pip install -e .) or setup.py build_ext
    --inplace, build/temp holds ninja's state: nothing left to rebuild."""
    build = osp.join(REPO, 'build', 'temp')
    ninja = shutil.which('ninja')
    if ninja is None or not osp.isfile(osp.join(build, 'build.ninja')):
        pytest.skip('no ninja build in build/temp: the extension was built '
                    'another way')
    result = run([ninja, '-C', build, '-n'], timeout=60)
    assert 'no work to do' in result.stdout, result.stdout
