"""Resolves mmsync's compiled ops by name from the single ``mmsync._ext``."""
import importlib
import importlib.util
from types import SimpleNamespace
from typing import Sequence

import torch

BUILD_HINT = ('build it from the repository root with '
              '`pip install -v -e . --no-build-isolation`')


def check_build_torch() -> None:
    """Raise one line where ``_ext`` was built for another torch release.

    setup.py records the torch it compiled ``_ext`` against in
    ``mmsync/_build_info.py``; another torch would fail with an undefined
    symbol at import, or worse, run with a mismatched ABI. Nothing is
    checked where no record exists (an extension built before it was kept).

    Raises:
        ImportError: Naming both versions and how to rebuild.
    """
    try:
        build_info = importlib.import_module('mmsync._build_info')
    except ImportError:
        return
    built = build_info.TORCH_VERSION
    if built.split('+')[0] == torch.__version__.split('+')[0]:
        return
    raise ImportError(
        f'mmsync._ext was built for torch {built} but torch '
        f'{torch.__version__} is running: rebuild mmsync against it '
        '(`pip install --no-build-isolation --no-deps --force-reinstall '
        'mmsync-<version>.tar.gz`, or in a checkout `pip install -e . '
        f'--no-build-isolation`), or install torch=={built.split("+")[0]}')


def check_ops_exist() -> bool:
    """Whether the compiled extension ``mmsync._ext`` is installed."""
    return importlib.util.find_spec('mmsync._ext') is not None


def load_ext(name: str, funcs: Sequence[str]) -> SimpleNamespace:
    """Imports ``mmsync.<name>`` and returns its ops as attributes.

    Importing the module runs its static ``TORCH_LIBRARY`` registrations;
    each op is then looked up as ``torch.ops.mmsync.<func>``.

    Args:
        name (str): The extension module, ``'_ext'``.
        funcs (Sequence[str]): Names of the ops to resolve.

    Returns:
        SimpleNamespace: One attribute per name in ``funcs``.

    Raises:
        ImportError: One error listing every name that cannot be resolved,
            and how to build the extension.
    """
    check_build_torch()
    try:
        importlib.import_module(f'mmsync.{name}')
    except ImportError as e:
        raise ImportError(
            f'mmsync.{name} is not built, so these ops are missing: '
            f'{", ".join(funcs)}; {BUILD_HINT} ({e})') from e
    namespace = torch.ops.mmsync
    missing = [f for f in funcs if not hasattr(namespace, f)]
    if missing:
        raise ImportError(
            f'mmsync.{name} does not provide the ops {", ".join(missing)}; '
            f'it may be stale: re-{BUILD_HINT}')
    return SimpleNamespace(**{f: getattr(namespace, f) for f in funcs})
