"""The GPU suite cannot pass silently: ``test_sync_bn_cuda.py`` collected in
a subprocess where torch claims a GPU (``torch.cuda.is_available`` patched
by a pytest plugin) must fail when mmsync cannot be imported, skip, with
the rebuild hint, only when mmsync imports without CUDA kernels, and run
(here: fail, there is no driver) when it has them."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

import mmsync.ops  # noqa: F401

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(osp.dirname(HERE))

CLAIM_GPU = 'import torch\ntorch.cuda.is_available = lambda: True\n'
# None in sys.modules: `import mmsync.ops` raises ImportError, as a missing
# dependency of mmengine would.
BREAK_IMPORT = 'import sys\nsys.modules["mmsync.ops"] = None\n'
CUDA_BUILD = torch._C._dispatch_has_kernel_for_dispatch_key(
    'mmsync::sync_bn_forward_stats', 'CUDA')


def _run_gpu_suite(tmp_path, plugin):
    (tmp_path / 'fake_gpu.py').write_text(plugin)
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(tmp_path), REPO, env.get('PYTHONPATH', '')])
    return subprocess.run([
        sys.executable, '-m', 'pytest',
        osp.join(HERE, 'test_sync_bn_cuda.py'), '-q', '-rs', '-p', 'fake_gpu',
        '-p', 'no:cacheprovider'
    ],
                          cwd=REPO,
                          env=env,
                          capture_output=True,
                          text=True)


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason='checks the suite where torch only claims a GPU')
class TestGpuSuiteCollection:

    def test_import_error_fails(self, tmp_path):
        done = _run_gpu_suite(tmp_path, CLAIM_GPU + BREAK_IMPORT)
        out = done.stdout + done.stderr
        assert done.returncode != 0, out
        assert 'ImportError' in out and 'skipped' not in out, out

    @pytest.mark.skipif(
        CUDA_BUILD, reason='this build of mmsync has CUDA kernels')
    def test_cpu_only_build_skips_with_reason(self, tmp_path):
        done = _run_gpu_suite(tmp_path, CLAIM_GPU)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        assert 'mmsync._ext has no CUDA kernels' in out, out
        assert ' passed' not in out and 'failed' not in out, out

    @pytest.mark.skipif(
        not CUDA_BUILD, reason='this build of mmsync has no CUDA kernels')
    def test_cuda_build_runs_the_suite(self, tmp_path):
        # The tests run; with no driver behind the claim they fail.
        done = _run_gpu_suite(tmp_path, CLAIM_GPU)
        out = done.stdout + done.stderr
        assert done.returncode != 0, out
        assert 'has no CUDA kernels' not in out and 'failed' in out, out
