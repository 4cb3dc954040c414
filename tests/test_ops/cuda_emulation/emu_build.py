"""Builds mmsync's CUDA ops for the CPU emulation of CUDA (emu_prelude.h).

The sources of ``mmsync/ops/csrc`` are copied with four mechanical rewrites
(each must apply, so a source change that defeats one fails loudly):

* ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
  ``emu::launch(&kernel, grid, block, smem, stream, args)``;
* ``extern __shared__ ... smem_raw[]`` becomes the emulator's buffer;
* the ops register as ``torch.ops.mmsync_emu.*`` for the CPU dispatch key
  (``TORCH_LIBRARY_IMPL(mmsync, CUDA, m)`` -> ``(mmsync_emu, CPU, m)``) and
  accept CPU tensors where they check for CUDA ones;
* the schemas are declared again under ``mmsync_emu``.

Everything else, kernels and launchers, is compiled as it is, by the host
compiler, with stub headers for ``cuda_runtime.h`` and ``c10/cuda/*``.
"""
import hashlib
import os
import os.path as osp
import re

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.abspath(osp.join(HERE, '..', '..', '..'))
CSRC = osp.join(REPO, 'mmsync', 'ops', 'csrc')

GLUE = r'''
// Controls of the emulation, as ops: SM count and schedule seed; returns the
// number of kernel launches so far.
#include <torch/library.h>
#include "emu_prelude.h"

namespace {
int64_t emu_config(int64_t sms, int64_t seed) {
  TORCH_CHECK(sms > 0 && sms < 256, "emulated SM count must be in [1, 255]");
  emu::g_sms = int(sms);
  emu::g_seed = uint64_t(seed);
  return emu::g_launches;
}
// The launches since the last call, one line each: kernel, grid, block.
std::string emu_trace() {
  std::string out;
  out.swap(emu::g_trace);
  return out;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(mmsync_emu, m) {
  m.def("emu_config(int sms, int seed) -> int", &emu_config);
  m.def("emu_trace() -> str", &emu_trace);
}
'''


def _sub(pattern, repl, text, what, flags=0):
    out, n = re.subn(pattern, repl, text, flags=flags)
    if n == 0:
        raise RuntimeError(f'CUDA emulation build: rewrite "{what}" found '
                           'nothing to rewrite; update emu_build.py')
    return out


def _rewrite_cu(text):
    text = _sub(r'(cuda::\w+<[^<>;]*>)\s*<<<(.*?)>>>\(',
                r'emu::launch(&\1, \2, ', text, 'kernel launches', re.S)
    if '<<<' in text:
        raise RuntimeError('CUDA emulation build: a kernel launch was not '
                           'rewritten; update emu_build.py')
    text = _sub(r'TORCH_LIBRARY_IMPL\(mmsync, CUDA, m\)',
                'TORCH_LIBRARY_IMPL(mmsync_emu, CPU, m)', text, 'registration')
    return _sub(r'\.is_cuda\(\)', '.is_cpu()', text, 'is_cuda checks')


def _rewrite_cuh(text):
    return re.sub(
        r'extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];',
        r'unsigned char* \1 = emu::dynamic_smem();', text)


def _write(path, text):
    os.makedirs(osp.dirname(path), exist_ok=True)
    if osp.exists(path):
        with open(path, encoding='utf-8') as f:
            if f.read() == text:
                return
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)


def _read(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


def build(verbose=False):
    """Compiles the emulated ops once (cached) and loads them.

    Returns:
        The op namespace ``torch.ops.mmsync_emu``.
    """
    import torch
    from torch.utils.cpp_extension import load

    sources = {
        'common/sync_bn_common.h': None,
        'pytorch/sync_bn_utils.h': None,
        'pytorch/sync_bn.cpp': 'schemas',
        'pytorch/cuda/sync_bn_cuda.cu': 'cu',
    }
    cuda_dir = osp.join(CSRC, 'common', 'cuda')
    for name in sorted(os.listdir(cuda_dir)):
        if name.endswith('.cuh'):
            sources[f'common/cuda/{name}'] = 'cuh'
    texts = {}
    for rel, kind in sources.items():
        text = _read(osp.join(CSRC, rel))
        if kind == 'cu':
            text, rel = _rewrite_cu(text), rel[:-3] + '.cpp'
        elif kind == 'cuh':
            text = _rewrite_cuh(text)
        elif kind == 'schemas':
            text = _sub(r'TORCH_LIBRARY_FRAGMENT\(mmsync, m\)',
                        'TORCH_LIBRARY_FRAGMENT(mmsync_emu, m)', text,
                        'schemas')
        texts[rel] = text
    texts['pytorch/emu_glue.cpp'] = GLUE
    digest = hashlib.sha1()
    for rel in sorted(texts):
        digest.update(rel.encode() + texts[rel].encode())
    for name in ('emu_prelude.h', 'emu_build.py'):
        digest.update(_read(osp.join(HERE, name)).encode())
    for root, _, files in os.walk(osp.join(HERE, 'include')):
        for name in sorted(files):
            digest.update(_read(osp.join(root, name)).encode())
    tag = digest.hexdigest()[:12]
    build_dir = osp.join(
        os.environ.get('MMSYNC_EMU_BUILD_DIR',
                       osp.join(REPO, 'build', 'cuda_emulation')), tag)
    src_dir = osp.join(build_dir, 'src')
    for rel, text in texts.items():
        _write(osp.join(src_dir, rel), text)
    _write(
        osp.join(src_dir, 'pytorch', 'emu_prelude.h'),
        _read(osp.join(HERE, 'emu_prelude.h')))
    load(
        name=f'mmsync_cuda_emu_{tag}',
        sources=[
            osp.join(src_dir, 'pytorch', 'sync_bn.cpp'),
            osp.join(src_dir, 'pytorch', 'cuda', 'sync_bn_cuda.cpp'),
            osp.join(src_dir, 'pytorch', 'emu_glue.cpp'),
        ],
        extra_include_paths=[
            osp.join(HERE, 'include'),
            osp.join(src_dir, 'common'),
            osp.join(src_dir, 'pytorch'),
        ],
        extra_cflags=['-O1', '-std=c++20', '-fno-strict-aliasing'],
        extra_ldflags=['-ldl'],
        build_directory=build_dir,
        is_python_module=False,
        verbose=verbose)
    return torch.ops.mmsync_emu
