"""Builds mmsync and its one compiled module, ``mmsync._ext``.

Environment: ``FORCE_CUDA=1`` builds the CUDA sources even where no GPU is
visible, ``MAX_JOBS`` bounds parallel compilation (ninja), ``DEBUG=1`` builds
without optimization and with debug symbols.

Compiled objects stay in ``build/temp``, for ``pip install -e .`` as for
``setup.py build_ext --inplace``, so a second build recompiles only what
changed (pip's editable builds otherwise start from an empty folder).

``_ext`` runs under the torch it was compiled against only: the build
records that torch in ``mmsync/_build_info.py`` (checked before ``_ext``
loads) and pins ``torch==<that release>`` in the package's requirements.
Build with ``--no-build-isolation`` after installing torch (pyproject.toml's
backend says so in one line where torch is missing); MANIFEST.in lists what
an sdist holds.
"""
import glob
import os
import os.path as osp
import sys
from setuptools import find_packages, setup

FORCE_CUDA = os.getenv('FORCE_CUDA', '0') == '1'
DEBUG = os.getenv('DEBUG', '0') == '1'

CSRC = osp.join('mmsync', 'ops', 'csrc')
BUILD_TEMP = osp.join(osp.dirname(osp.abspath(__file__)), 'build', 'temp')


def get_version():
    """Reads ``__version__`` from mmsync/version.py without importing it."""
    scope = {}
    with open(osp.join('mmsync', 'version.py'), encoding='utf-8') as f:
        exec(compile(f.read(), 'mmsync/version.py', 'exec'), scope)
    return scope['__version__']


def parse_requirements(fname):
    """Requirement lines of ``fname``, following ``-r`` includes."""
    reqs = []
    with open(fname, encoding='utf-8') as f:
        for line in f:
            line = line.split('#')[0].strip()
            if line.startswith('-r '):
                reqs += parse_requirements(
                    osp.join(osp.dirname(fname), line[3:].strip()))
            elif line:
                reqs.append(line)
    return reqs


def pin_torch(reqs):
    """``reqs`` with torch pinned to the release being built against: the
    compiled ``_ext`` imports under that torch only."""
    import torch
    release = torch.__version__.split('+')[0]
    return [f'torch=={release}' if r.startswith('torch') else r for r in reqs]


def get_extensions():
    """The ``mmsync._ext`` extension: C++ sources, plus CUDA where possible."""
    import torch
    from torch.utils.cpp_extension import (CUDA_HOME, CppExtension,
                                           CUDAExtension)

    sources = glob.glob(osp.join(CSRC, 'pytorch', '*.cpp')) + glob.glob(
        osp.join(CSRC, 'pytorch', 'cpu', '*.cpp'))
    opt = ['-O0', '-g'] if DEBUG else ['-O3', '-g0']
    # at::parallel_for is inline OpenMP: without -fopenmp it runs serially.
    openmp = ['-fopenmp'] if sys.platform.startswith('linux') else []
    cxx_args = opt + ['-std=c++20'] + openmp
    include_dirs = [osp.abspath(osp.join(CSRC, 'common'))]
    use_cuda = FORCE_CUDA or (torch.cuda.is_available()
                              and CUDA_HOME is not None)
    if use_cuda:
        sources += glob.glob(osp.join(CSRC, 'pytorch', 'cuda', '*.cu'))
        nvcc_args = opt[:1] + [
            '-std=c++20', '--expt-relaxed-constexpr', '-lineinfo'
        ]
        return [
            CUDAExtension(
                'mmsync._ext',
                sorted(sources),
                include_dirs=include_dirs,
                define_macros=[('MMSYNC_WITH_CUDA', None)],
                extra_link_args=openmp,
                extra_compile_args={
                    'cxx': cxx_args,
                    'nvcc': nvcc_args
                })
        ]
    return [
        CppExtension(
            'mmsync._ext',
            sorted(sources),
            include_dirs=include_dirs,
            extra_link_args=openmp,
            extra_compile_args={'cxx': cxx_args})
    ]


if __name__ == '__main__':
    from torch.utils.cpp_extension import BuildExtension

    class IncrementalBuildExtension(
            BuildExtension.with_options(use_ninja=True)):
        """torch's ninja build with its objects kept in ``BUILD_TEMP``."""

        def finalize_options(self):
            self.build_temp = self.build_temp or BUILD_TEMP
            super().finalize_options()

        def run(self):
            super().run()
            self.write_build_info()

        def write_build_info(self):
            """mmsync/_build_info.py beside ``_ext``: the torch it was built
            for, which mmsync checks before importing ``_ext``."""
            import torch
            path = osp.join(
                osp.dirname(self.get_ext_fullpath('mmsync._ext')),
                '_build_info.py')
            with open(path, 'w', encoding='utf-8') as f:
                f.write('"""Written by setup.py when it built mmsync._ext."""'
                        f'\nTORCH_VERSION = {torch.__version__!r}\n'
                        f'TORCH_CUDA = {torch.version.cuda!r}\n')

    setup(
        name='mmsync',
        version=get_version(),
        description='Exact synchronized BatchNorm (MMSyncBN) for OpenMMLab '
        'style training, with C++ and CUDA kernels',
        long_description=open('README.md', encoding='utf-8').read(),
        long_description_content_type='text/markdown',
        license='Apache License 2.0',
        packages=find_packages(exclude=('configs', 'tools', 'tests')),
        # Only the data listed: the C++ sources (in the manifest as the
        # extension's sources) are no package data. mmsync/.mim links to
        # configs/ and tools/ (copied into wheels): what `mim train mmsync`
        # and `mim test mmsync` run, as OpenMMLab packages ship them.
        package_data={
            'mmsync': [
                'datasets/*.npz', '.mim/configs/**/*.py', '.mim/tools/*.py',
                '.mim/tools/*.sh', '.mim/tools/misc/*.py',
                '.mim/tools/misc/*.sh'
            ]
        },
        include_package_data=False,
        python_requires='>=3.8',
        install_requires=pin_torch(
            parse_requirements('requirements/runtime.txt')),
        extras_require={
            'tests': parse_requirements('requirements/tests.txt'),
            'build': parse_requirements('requirements/build.txt'),
        },
        ext_modules=get_extensions(),
        cmdclass={'build_ext': IncrementalBuildExtension},
        zip_safe=False)
