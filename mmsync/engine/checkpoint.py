"""Read and write mmengine checkpoints safely.

Reading: since torch 2.6 ``torch.load`` unpickles only tensors, containers
and allow-listed globals. A checkpoint of mmengine's Runner also holds its
log history: ``HistoryBuffer`` objects with numpy arrays, whose statistics
methods are pickled as ``getattr(HistoryBuffer, 'mean')``. Allow-listing
``getattr`` itself would let a crafted file reach any attribute of any
object (``getattr(getattr(getattr, '__self__'), '__import__')``), so
``builtins.getattr`` is mapped to :func:`history_buffer_method`, which hands
out those four methods and nothing else. A checkpoint that needs more is
refused, naming the global it asked for; ``trust=True`` (``--trust-checkpoint``
of the tools, ``trust_checkpoint=True`` in a config) loads it with full
unpickling.

Remote checkpoints (``load_from='https://...'`` or any other ``://``
backend) load under the same rule: an http(s) file is downloaded to
torch.hub's cache (``<hub dir>/checkpoints``, where mmengine puts it too)
and loaded from there like a local file; the other backends are read by
mmengine inside :func:`checkpoint_loading`, which forces every
``torch.load`` to weights-only, also those that pass ``weights_only=False``
(torch.hub's, which mmengine's http loader calls).

Writing: :class:`AtomicLocalBackend` puts a file under its final name only
once it is complete, so a full disk or a killed job never leaves a truncated
checkpoint that looks like a good one.

Resuming: :func:`find_resume_checkpoint` looks only inside the work dir and
takes the newest checkpoint that loads and holds the full training state
(``epoch_*.pth``, ``iter_*.pth``, or what ``last_checkpoint`` names inside the
work dir), never a ``best_*.pth``: mmengine writes those without optimizer
and scheduler state, and a run resumed from one restarts its schedule.
"""
import contextlib
import os
import os.path as osp
import pickle
import re
import urllib.parse
from typing import Any, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from mmengine.fileio import LocalBackend, register_backend
from mmengine.logging import HistoryBuffer

HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')
TRUST_HINT = ('if you trust where it comes from, pass --trust-checkpoint (or '
              'set trust_checkpoint=True in the config) to load it with full '
              'unpickling (which can run any code)')
# Read by torch.load when its caller (mmengine) does not pass weights_only.
NO_WEIGHTS_ONLY = 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'
# Read by torch.load always: weights-only even where the caller passes
# weights_only=False.
WEIGHTS_ONLY = 'TORCH_FORCE_WEIGHTS_ONLY_LOAD'
ATOMIC_BACKEND = 'atomic_local'


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded: its path and why, in one line."""


def history_buffer_method(owner: Any, name: str) -> Any:
    """``getattr`` narrowed to what mmengine's checkpoints use it for.

    Stands in for ``builtins.getattr`` while unpickling: a ``HistoryBuffer``
    pickles its statistics methods as ``getattr(HistoryBuffer, name)``.

    Raises:
        pickle.UnpicklingError: For any other object or attribute.
    """
    if owner is HistoryBuffer and name in HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    owner_name = ('getattr' if owner is history_buffer_method else getattr(
        owner, '__qualname__',
        type(owner).__qualname__))
    raise pickle.UnpicklingError(
        f'Unsupported global: GLOBAL builtins.getattr({owner_name}, '
        f'{name!r}) (only HistoryBuffer\'s {", ".join(HISTORY_BUFFER_METHODS)}'
        ' are allowed)')


def checkpoint_safe_globals() -> List:
    """What mmengine's checkpoints pickle besides tensors and containers.

    Returns:
        list: Entries for ``torch.serialization.safe_globals``: classes and
        numpy's reconstructors, which run no code of the file's choosing,
        and ``builtins.getattr`` mapped to :func:`history_buffer_method`.
    """
    return [
        HistoryBuffer,
        (history_buffer_method, 'builtins.getattr'),
        np.ndarray,
        np.dtype,
        np.ndarray(0).__reduce__()[0],  # numpy's _reconstruct
        np.float64(0).__reduce__()[0],  # numpy's scalar
    ] + [
        type(np.dtype(name))
        for name in ('float64', 'float32', 'int64', 'int32', 'bool')
    ]


@contextlib.contextmanager
def _environ(**values: Optional[str]) -> Iterator[None]:
    """Set (or unset, for None) environment variables inside."""
    before = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def checkpoint_loading(trust: bool = False) -> Iterator[None]:
    """Make every ``torch.load`` inside (mmengine's and torch.hub's too,
    whatever ``weights_only`` they pass) load checkpoints safely, or with
    full unpickling when ``trust`` is set."""
    if not trust:
        with _environ(**{WEIGHTS_ONLY: '1', NO_WEIGHTS_ONLY: None}), \
                torch.serialization.safe_globals(checkpoint_safe_globals()):
            yield
        return
    with _environ(**{NO_WEIGHTS_ONLY: '1'}):
        yield


def is_http(path: str) -> bool:
    """Whether ``path`` is an http(s) URL."""
    return str(path).startswith(('http://', 'https://'))


def fetch_checkpoint(url: str) -> str:
    """Download an http(s) checkpoint to torch.hub's cache, unless it is
    there already, without unpickling it.

    Returns:
        str: The local file, ``<torch.hub.get_dir()>/checkpoints/<name>``.

    Raises:
        CheckpointError: The URL and why it cannot be downloaded.
    """
    name = osp.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise CheckpointError(f'checkpoint {url!r} names no file')
    local = osp.join(torch.hub.get_dir(), 'checkpoints', name)
    if not osp.isfile(local):
        try:
            os.makedirs(osp.dirname(local), exist_ok=True)
            torch.hub.download_url_to_file(url, local, progress=False)
        except Exception as e:
            raise CheckpointError(
                f'checkpoint {url!r} cannot be downloaded: '
                f'{type(e).__name__}: {_one_line(str(e))}') from None
    return local


def _load_remote(path: str, trust: bool, map_location: Any) -> Any:
    """A checkpoint of another ``://`` backend, read by mmengine."""
    from mmengine.runner.checkpoint import _load_checkpoint
    try:
        with checkpoint_loading(trust):
            return _load_checkpoint(path, map_location=map_location)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'checkpoint {path!r} refused: {_refusal(e)}; {TRUST_HINT}'
        ) from None
    except Exception as e:
        raise CheckpointError(
            f'checkpoint {path!r} cannot be read: {type(e).__name__}: '
            f'{_one_line(str(e))}') from None


def _one_line(text: str) -> str:
    return ' '.join(text.split())


def _refusal(error: pickle.UnpicklingError) -> str:
    """Why torch's weights-only unpickler refused a file, in a few words."""
    found = re.search(r'WeightsUnpickler error:(.*?)(Check the doc|$)',
                      str(error), re.DOTALL)
    reason = _one_line(found.group(1) if found else str(error))
    asked = re.search(r'GLOBAL (\S+?(\(.*?\))?)(\s|$)', reason)
    if asked:
        reason = (f'it asks for the global {asked.group(1)}, which '
                  'checkpoints of mmsync and mmengine do not need')
    return reason


def load_checkpoint_file(path: str,
                         trust: bool = False,
                         check_only: bool = False,
                         map_location: Any = 'cpu') -> Any:
    """Load a checkpoint on CPU, or say in one line why it cannot be.

    Args:
        path (str): The checkpoint file, or its URL: http(s) is downloaded
            to torch.hub's cache first, another ``://`` backend is read by
            mmengine, both under the same rule.
        trust (bool): Load with full unpickling. Default: False.
        check_only (bool): Map the tensors' storage instead of reading it
            (zip checkpoints), for a cheap check that the file is complete
            and asks for nothing unsafe. Default: False.
        map_location (str | torch.device | callable): As for
            ``torch.load``. Default: 'cpu'.

    Returns:
        The unpickled object (usually a dict).

    Raises:
        CheckpointError: The path and the reason: missing, empty, truncated
            or not a torch file, or refused for the global it asks for.
    """
    name = path
    if is_http(path):
        path = fetch_checkpoint(path)
    elif '://' in str(path):
        return _load_remote(path, trust, map_location)
    if not osp.isfile(path):
        raise CheckpointError(f'checkpoint {name!r} not found')
    size = osp.getsize(path)
    if size == 0:
        raise CheckpointError(
            f'checkpoint {name!r} is empty (0 bytes), as a run that stopped '
            'while writing it leaves it')
    with open(path, 'rb') as f:
        is_zip = f.read(2) == b'PK'
    try:
        with contextlib.nullcontext() if trust else checkpoint_loading():
            return torch.load(
                path,
                map_location=map_location,
                weights_only=not trust,
                mmap=check_only and is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'checkpoint {name!r} refused: {_refusal(e)}; {TRUST_HINT}'
        ) from None
    except Exception as e:
        # The first sentence: torch adds a paragraph of guesses to it.
        detail = _one_line(str(e)).split('. ')[0] or 'no detail'
        raise CheckpointError(
            f'checkpoint {name!r} ({size} bytes) cannot be read: '
            f'{type(e).__name__}: {detail}; a run that stopped while writing '
            'it, or a full disk, leaves such a file') from None


# The names CheckpointHook gives checkpoints with the full training state
# (its default filename_tmpl); best_*.pth hold the weights only.
FULL_STATE_NAME = re.compile(r'^(epoch|iter)_(\d+)\.pth$')


def resume_candidates(work_dir: str) -> List[str]:
    """The checkpoints of ``work_dir`` that can hold a run's full state,
    newest first.

    First what mmengine's ``last_checkpoint`` names, if that file lies
    directly in ``work_dir`` (in a copied work dir it names the original's);
    then ``epoch_N.pth`` and ``iter_N.pth`` by N, then modification time.
    ``best_*.pth`` and other names are never candidates.
    """
    if not osp.isdir(work_dir):
        return []
    paths = []
    record = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(record):
        with open(record, encoding='utf-8') as f:
            named = f.read().strip()
        if (named and osp.isfile(named)
                and osp.samefile(osp.dirname(osp.abspath(named)), work_dir)
                and not osp.basename(named).startswith('best_')):
            paths.append(osp.join(work_dir, osp.basename(named)))
    numbered = []
    for name in os.listdir(work_dir):
        found = FULL_STATE_NAME.match(name)
        path = osp.join(work_dir, name)
        if found and osp.isfile(path) and path not in paths:
            numbered.append((int(found.group(2)), osp.getmtime(path), path))
    return paths + [path for *_, path in sorted(numbered, reverse=True)]


def find_resume_checkpoint(work_dir: str,
                           trust: bool = False
                           ) -> Tuple[Optional[str], List[str]]:
    """The newest checkpoint of ``work_dir`` to resume from.

    Args:
        work_dir (str): The run's work dir; nothing outside it is read.
        trust (bool): Load with full unpickling. Default: False.

    Returns:
        tuple[str | None, list[str]]: The checkpoint (None when the work
        dir has none, see :func:`resume_candidates`) and the reasons why
        newer ones were passed over.

    Raises:
        CheckpointError: When the work dir has candidates and none loads
            with its run state (meta) and optimizer state.
    """
    skipped = []
    for path in resume_candidates(work_dir):
        try:
            checkpoint = load_checkpoint_file(path, trust, check_only=True)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        missing = [
            key for key in ('meta', 'state_dict', 'optimizer')
            if not (isinstance(checkpoint, dict) and key in checkpoint)
        ]
        if not missing:
            return path, skipped
        skipped.append(f'checkpoint {path!r} does not hold the training '
                       f'state to resume (no {", ".join(missing)})')
    if skipped:
        raise CheckpointError(
            f'no checkpoint of {work_dir} can be resumed: '
            f'{"; ".join(skipped)}. Pass another with --resume CKPT, or '
            'remove them to start afresh')
    return None, skipped


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, with ``put`` made atomic.

    The bytes go to a hidden temporary file in the same directory, are
    flushed to disk, and only then renamed to the final name; a failed write
    (a full disk) removes the temporary file and raises. Selected for
    checkpoints by ``backend_args=dict(backend='atomic_local')``.
    """

    def put(self, obj: bytes, filepath: Union[str, os.PathLike]) -> None:
        """Write ``obj`` to ``filepath`` completely or not at all."""
        filepath = os.fspath(filepath)
        directory = osp.dirname(osp.abspath(filepath))
        os.makedirs(directory, exist_ok=True)
        tmp = osp.join(directory,
                       f'.{osp.basename(filepath)}.{os.getpid()}.tmp')
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            with os.fdopen(fd, 'wb') as f:
                f.write(obj)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, filepath)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)
