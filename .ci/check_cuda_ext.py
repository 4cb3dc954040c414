"""Check that mmsync._ext was built with CUDA and every op has both kernels.

Run from the root of a tree built with ``FORCE_CUDA=1`` (.ci/cuda_env.sh):
imports mmsync from there, lists every ``mmsync::`` op the import
registered, resolves them through ``load_ext`` and asks the dispatcher for
each one's CPU and CUDA kernel. Exits 1 naming what is missing; no GPU is
needed.
"""
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.abspath('.'))

import mmsync.ops  # noqa: E402
from mmsync.utils import load_ext  # noqa: E402


def main() -> int:
    ops = sorted(
        name.split('::', 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith('mmsync::'))
    if not ops:
        print(
            'check_cuda_ext: importing mmsync registered no mmsync:: op',
            file=sys.stderr)
        return 1
    load_ext('_ext', ops)
    origin = osp.abspath(mmsync.__file__)
    # An op with a CPU kernel is a device kernel and needs its CUDA twin;
    # one without (e.g. cpu_capability, a catch-all) is device-independent.
    device_ops = [
        name for name in ops if torch._C._dispatch_has_kernel_for_dispatch_key(
            f'mmsync::{name}', 'CPU')
    ]
    missing = [
        name for name in device_ops
        if not torch._C._dispatch_has_kernel_for_dispatch_key(
            f'mmsync::{name}', 'CUDA')
    ]
    print(f'check_cuda_ext: mmsync from {origin}, torch {torch.__version__} '
          f'(CUDA {torch.version.cuda}), ops: {", ".join(ops)}')
    if missing:
        print(
            'check_cuda_ext: no CUDA kernel registered for ' +
            ', '.join(missing),
            file=sys.stderr)
        return 1
    print(f'check_cuda_ext: all {len(device_ops)} device ops have CPU and '
          'CUDA kernels')
    return 0


if __name__ == '__main__':
    sys.exit(main())
