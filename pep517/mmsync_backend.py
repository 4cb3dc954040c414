"""setuptools' build backend, with torch checked first.

``mmsync._ext`` is compiled against the torch that will import it, so its
build needs that torch. pip's default isolated build cannot see an installed
torch, and installing one there would compile against another torch than the
one the user runs (and download a CUDA build of several GB). Without torch
the build ends in one line saying what to do instead of a traceback.
"""
import sys
import warnings
from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403

HINT = ('mmsync: error: torch is not importable in this build environment: '
        'mmsync._ext is compiled against the torch you run, so install '
        'torch first (e.g. `pip install torch==2.13.0`), then build without '
        "pip's isolated environment: `pip install --no-build-isolation "
        "mmsync-<version>.tar.gz` (or `pip install --no-build-isolation .` "
        'in a checkout)')


def _need_torch() -> None:
    """Exit with one line where torch cannot be imported."""
    try:
        import torch  # noqa: F401
    except ImportError:
        print(HINT, file=sys.stderr)
        raise SystemExit(1)


def get_requires_for_build_wheel(config_settings=None):
    _need_torch()
    return _orig.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _need_torch()
    return _orig.get_requires_for_build_editable(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    _need_torch()
    return _orig.get_requires_for_build_sdist(config_settings)


def build_editable(wheel_directory,
                   config_settings=None,
                   metadata_directory=None):
    """setuptools' editable build, without its warning that the checkout's
    ``mmsync`` folder shadows the install: for an editable install of a
    checkout that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Editable installation')
        return _orig.build_editable(wheel_directory, config_settings,
                                    metadata_directory)
