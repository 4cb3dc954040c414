"""Resolves mmsync's compiled ops by name from the single ``mmsync._ext``."""
import importlib
import importlib.util
from types import SimpleNamespace
from typing import Sequence

import torch

BUILD_HINT = ('build it from the repository root with '
              '`pip install -v -e . --no-build-isolation`')


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
