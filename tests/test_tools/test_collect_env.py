"""The environment report: every field, and its rule for the CPU kernels."""
import importlib.util
import os
import re
import sys

import numpy
import pytest
import torch
from tools_launch import run

from mmsync.utils.collect_env import cpu_variant, cuda_archs

BOTH = b'..isa_avx512..isa_avx2..'
AVX512_FLAGS = {'avx512f', 'avx512bw', 'avx512vl', 'avx512dq', 'avx2', 'fma'}


def test_report_names_every_field():
    result = run([sys.executable, '-m', 'mmsync.utils.collect_env'],
                 timeout=120)
    fields = dict(
        line.split(': ', 1) for line in result.stdout.strip().splitlines())
    assert fields['PyTorch'] == torch.__version__
    assert fields['NumPy'] == numpy.__version__
    for name in ('Python', 'CPU', 'C++ compiler', 'mmengine', 'mmsync',
                 'mmsync._ext', 'CPU kernels', 'CUDA archs in _ext',
                 'CPU features'):
        assert fields[name], name
    # The extension of this checkout was built here, against this torch.
    assert fields['mmsync._ext built for torch'].startswith(
        f'{torch.__version__} (CUDA '), fields
    flavour = ('full build, compiled ops'
               if importlib.util.find_spec('mmcv._ext') else 'lite, no ops')
    assert re.fullmatch(
        r'\d+\.\d+\.\d+\S* \(mmcv(-lite|-full)?: ' + flavour + r'\)',
        fields['mmcv']), fields['mmcv']
    assert re.fullmatch(r'(avx512|avx2|default)( \(.*\))?',
                        fields['CPU kernels'])
    capped = run([sys.executable, '-m', 'mmsync.utils.collect_env'],
                 timeout=120,
                 env=dict(os.environ, MMSYNC_CPU_CAPABILITY='default')).stdout
    assert 'CPU kernels: default (MMSYNC_CPU_CAPABILITY=default)' in capped


@pytest.mark.parametrize('ext,flags,cap,expected', [
    (BOTH, AVX512_FLAGS, None, 'avx512'),
    (BOTH, AVX512_FLAGS, 'avx2', 'avx2'),
    (BOTH, AVX512_FLAGS, 'default', 'default'),
    (BOTH, {'avx2', 'fma'}, None, 'avx2'),
    (BOTH, {'avx2'}, None, 'default'),
    (b'..isa_avx2..', AVX512_FLAGS, None, 'avx2'),
    (b'', AVX512_FLAGS, 'avx512', 'default'),
])
def test_cpu_variant_rule(ext, flags, cap, expected):
    """The extension's order: AVX-512 where built, allowed and supported,
    then AVX2 (with FMA), then the baseline."""
    assert cpu_variant(ext, flags, cap) == expected


def test_cuda_archs_from_the_file(monkeypatch):
    """Without cuobjdump: the architecture names in the file, not parts of
    longer words."""
    monkeypatch.setattr('shutil.which', lambda *args, **kwargs: None)
    ext = b'\x00sm_80\x00.target sm_90a\x00-arch sm_80 _Z4asm_30v'
    assert cuda_archs('', ext) == 'sm_80, sm_90a'
    assert cuda_archs('', b'no cuda') == 'none (built without CUDA)'
