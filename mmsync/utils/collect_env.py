"""The environment report to paste into a bug report.

    python -m mmsync.utils.collect_env

Python, NumPy, torch (and its CUDA), mmengine, mmcv (which build), mmsync,
the C++ compiler that builds the extension, the torch ``mmsync._ext`` was
built for, the CPU's vector extensions and the kernel variant ``_ext`` runs
on them, and the CUDA architectures compiled into it.
"""
import os
import os.path as osp
import platform
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from typing import Dict, List, Optional

# What each CPU kernel variant of mmsync._ext needs (/proc/cpuinfo flags), in
# the order the extension tries them (ops/csrc/pytorch/cpu/sync_bn_cpu.cpp).
CPU_VARIANTS = (
    ('avx512', ('avx512f', 'avx512bw', 'avx512vl', 'avx512dq')),
    ('avx2', ('avx2', 'fma')),
)


def _first_line(cmd: List[str]) -> Optional[str]:
    """The first line a command prints, or None if it cannot run."""
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def ext_path() -> Optional[str]:
    """The file of the compiled ``mmsync._ext``, if it is built."""
    import importlib.util
    spec = importlib.util.find_spec('mmsync._ext')
    return spec.origin if spec is not None else None


def cpu_variant(ext: bytes, cpu_flags: set, cap: Optional[str]) -> str:
    """The CPU kernel variant ``_ext`` picks, by its own rule.

    Args:
        ext (bytes): The extension's file (a variant the compiler could not
            build leaves no ``isa_<variant>`` symbols in it).
        cpu_flags (set): The CPU's flags, as /proc/cpuinfo lists them.
        cap (str, optional): ``MMSYNC_CPU_CAPABILITY`` (default, avx2 or
            avx512), which caps the choice.

    Returns:
        str: 'avx512', 'avx2' or 'default'.
    """
    allowed = {
        None: ('avx512', 'avx2'),
        'avx512': ('avx512', 'avx2'),
        'avx2': ('avx2', )
    }.get(cap, ())
    for name, flags in CPU_VARIANTS:
        if (name in allowed and f'isa_{name}'.encode() in ext
                and set(flags) <= cpu_flags):
            return name
    return 'default'


def cuda_archs(path: str, ext: bytes) -> str:
    """The CUDA architectures compiled into ``_ext``: from ``cuobjdump``
    where it is installed, else from the ``sm_XX`` names in the file."""
    from torch.utils.cpp_extension import CUDA_HOME
    cuobjdump = shutil.which('cuobjdump') or shutil.which(
        'cuobjdump', path=osp.join(str(CUDA_HOME), 'bin'))
    if cuobjdump:
        out = subprocess.run([cuobjdump, '--list-elf', path],
                             capture_output=True,
                             text=True,
                             timeout=60).stdout
        archs = sorted(set(re.findall(r'sm_\d+a?', out)))
    else:
        archs = sorted({
            m.decode()
            for m in re.findall(rb'(?<![\w.])sm_\d+a?(?!\w)', ext)
        })
    return ', '.join(archs) if archs else 'none (built without CUDA)'


def mmcv_build() -> str:
    """mmcv's version and build: the full one (compiled ops), or lite."""
    import importlib.metadata
    import importlib.util
    for dist in ('mmcv', 'mmcv-full', 'mmcv-lite'):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        full = importlib.util.find_spec('mmcv._ext') is not None
        return (f'{version} ({dist}: '
                f'{"full build, compiled ops" if full else "lite, no ops"})')
    return 'not installed'


def build_torch() -> str:
    """The torch ``_ext`` was built for (recorded by setup.py)."""
    try:
        from mmsync import _build_info
    except ImportError:
        return 'not recorded (built before the record was kept)'
    return f'{_build_info.TORCH_VERSION} (CUDA {_build_info.TORCH_CUDA})'


def collect_env() -> Dict[str, str]:
    """The report as name -> value."""
    import mmengine
    import numpy
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, get_cxx_compiler

    import mmsync

    cpuinfo = ''
    if osp.isfile('/proc/cpuinfo'):
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            cpuinfo = f.read()
    model = re.search(r'^model name\s*:\s*(.*)$', cpuinfo, re.MULTILINE)
    env = OrderedDict()
    env['sys.platform'] = sys.platform
    env['Python'] = sys.version.replace('\n', ' ')
    env['CPU'] = model.group(1) if model else platform.machine()
    env['NumPy'] = numpy.__version__
    env['PyTorch'] = torch.__version__
    env['PyTorch CUDA'] = str(torch.version.cuda)
    env['CUDA available'] = str(torch.cuda.is_available())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            env[f'GPU {i}'] = torch.cuda.get_device_name(i)
    env['CUDA_HOME'] = str(CUDA_HOME)
    compiler = get_cxx_compiler()
    env['C++ compiler'] = (
        f'{compiler}: {_first_line([compiler, "--version"]) or "not found"}')
    env['mmengine'] = mmengine.__version__
    env['mmcv'] = mmcv_build()
    env['mmsync'] = f'{mmsync.__version__} ({osp.dirname(mmsync.__file__)})'
    path = ext_path()
    if path is None:
        env['mmsync._ext'] = 'not built: run tools/setup/setup_env.sh'
        return env
    env['mmsync._ext'] = path
    env['mmsync._ext built for torch'] = build_torch()
    with open(path, 'rb') as f:
        ext = f.read()
    flags = set(
        re.findall(
            r'\w+',
            ' '.join(re.findall(r'^flags\s*:(.*)$', cpuinfo, re.MULTILINE))))
    wanted = sorted({f for _, needed in CPU_VARIANTS for f in needed})
    env['CPU features'] = ' '.join(
        f for f in wanted if f in flags) or 'none of ' + ' '.join(wanted)
    cap = os.environ.get('MMSYNC_CPU_CAPABILITY')
    env['CPU kernels'] = cpu_variant(
        ext, flags, cap) + (f' (MMSYNC_CPU_CAPABILITY={cap})' if cap else '')
    env['CUDA archs in _ext'] = cuda_archs(path, ext)
    return env


if __name__ == '__main__':
    for name, value in collect_env().items():
        print(f'{name}: {value}')
