"""``MMSyncRunner``: what mmsync adds to training, for any launcher.

A config that names it, with the package imported::

    custom_imports = dict(imports=['mmsync'], allow_failed_imports=False)
    runner_type = 'MMSyncRunner'

gets it from every OpenMMLab launcher that builds ``RUNNERS.build(cfg)``
(mmpretrain's, mmdet's, mmseg's ``tools/train.py`` and ``tools/test.py``,
``mim train``, mmsync's own tools):

- the pre-flight (:mod:`mmsync.engine.preflight`) before anything is
  written and before the first step, each failure one line per process;
- checkpoints loaded under torch's weights-only allow-list
  (:mod:`mmsync.engine.checkpoint`), for ``load_from`` and resume alike;
  ``trust_checkpoint=True`` in the config loads with full unpickling;
- auto-resume that looks only inside the work dir and takes the newest
  checkpoint holding the full training state that loads;
- checkpoints written atomically by the CheckpointHook;
- a start on CPU builds of torch: mmengine's ``init_dist`` assumes CUDA (it
  calls ``torch.cuda.set_device``) and its default DDP wrapper passes
  ``device_ids=[LOCAL_RANK]``, which DDP rejects for a CPU model;
- ``sync_bn='mmsync'`` (or ``dict(type='mmsync', stats_mode='default')``)
  besides mmengine's 'torch' and 'mmcv';
- every rank's error appended to the run's log;
- a console that shows what a person watches (:mod:`mmsync.engine.summary`):
  a start line, progress, validation, a summary line; the environment,
  config and hook table go to the log file only.
"""
import copy
import datetime
import logging
import os
import os.path as osp
import sys
import time
import traceback
from typing import Callable, Dict, List, NoReturn, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import CheckpointHook
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS as ROOT_RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint_to_model

from ..cnn import convert_sync_batchnorm
from ..ops import SyncBatchNorm
from ..registry import RUNNERS
from ..utils.net import NetError, export_ifname
from .checkpoint import (ATOMIC_BACKEND, checkpoint_loading,
                         find_resume_checkpoint, load_checkpoint_file)
from .hooks import LivenessHook, WorldSizeHook
from .preflight import (PreflightError, check_splits, check_start, launch_env,
                        one_line)
from .summary import FileOnly, RunSummaryHook

SYNC_BN_TYPE = 'mmsync'


def sync_bn_options(sync_bn: Union[str, Dict, None]) -> Optional[Dict]:
    """Keyword arguments of ``convert_sync_batchnorm`` from ``cfg.sync_bn``.

    Args:
        sync_bn (str | dict, optional): ``'mmsync'``, or a dict with
            ``type='mmsync'`` and optionally ``stats_mode`` and
            ``group_size``; any other
            string or None is left to mmengine.

    Returns:
        dict | None: The options, or None when the value is not mmsync's.
    """
    if sync_bn is None or isinstance(sync_bn, str):
        return {} if sync_bn == SYNC_BN_TYPE else None
    if not isinstance(sync_bn, dict):
        raise TypeError('cfg.sync_bn must be a str, a dict or None, got '
                        f'{sync_bn!r} of type {type(sync_bn).__name__}')
    options = dict(sync_bn)
    sync_bn_type = options.pop('type', None)
    if sync_bn_type != SYNC_BN_TYPE:
        raise ValueError(f'cfg.sync_bn as a dict must have type='
                         f'{SYNC_BN_TYPE!r}, got {sync_bn!r}')
    unknown = sorted(set(options) - {'stats_mode', 'group_size'})
    if unknown:
        raise ValueError('cfg.sync_bn accepts only the keys "stats_mode" and '
                         f'"group_size" besides "type", got {unknown} in '
                         f'{sync_bn!r}')
    return options


ENV_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def init_dist_from_env(backend: Optional[str] = None,
                       timeout: Union[int, float, datetime.timedelta,
                                      None] = None,
                       **kwargs) -> str:
    """Join the default process group from torchrun's environment.

    Works on CPU builds of torch, unlike mmengine's ``init_dist``: with CUDA
    the process takes the GPU of its LOCAL_RANK and the backend defaults to
    NCCL; without CUDA it is gloo, also where the config asks for NCCL (as
    OpenMMLab's default runtimes do), so that a GPU config runs on CPU.

    Args:
        backend (str, optional): 'nccl', 'gloo' or None to choose as above.
        timeout (int | float | timedelta, optional): Seconds a collective may
            wait (mmengine's ``dist_cfg.timeout``). Default: torch's.
        **kwargs: Passed to ``torch.distributed.init_process_group``.

    Returns:
        str: The backend.
    """
    missing = [name for name in ENV_VARS if name not in os.environ]
    if missing:
        raise RuntimeError('init_dist_from_env needs the environment '
                           f'variable(s) {", ".join(missing)}: start the '
                           'processes with torchrun (tools/dist_train.sh)')
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
        backend = backend or 'nccl'
    elif backend in (None, 'nccl'):
        backend = 'gloo'
    if timeout is not None:
        kwargs['timeout'] = (
            timeout if isinstance(timeout, datetime.timedelta) else
            datetime.timedelta(seconds=timeout))
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ['RANK']),
        world_size=int(os.environ['WORLD_SIZE']),
        **kwargs)
    return backend


# Errors of a rank whose peer died first (gloo's words), and how long such a
# rank waits before it reports.
PEER_GONE = ('Connection closed by peer', 'Connection reset by peer')
PEER_GONE_DELAY = 3


def log_failure(runner: Runner,
                error: BaseException,
                with_traceback: bool = True) -> None:
    """Append this rank's error (and traceback) to the run's log file.

    Every rank writes (not only rank 0, whose logger owns the file), so the
    log says which rank failed and why, not only where it stops.
    """
    stamp = time.strftime('%Y/%m/%d %H:%M:%S')
    trace = ''.join(
        traceback.format_exception(
            type(error), error, error.__traceback__)) if with_traceback else ''
    with open(
            osp.join(runner.log_dir, f'{runner.timestamp}.log'),
            'a',
            encoding='utf-8') as f:
        f.write(f'{stamp} - mmengine - ERROR - rank {runner.rank} failed: '
                f'{type(error).__name__}: {one_line(error)}\n{trace}')


def exit_on(error: PreflightError) -> NoReturn:
    """End the process with the error in one line on stderr, exit status 2
    (as argparse does): one line per process, not a traceback each."""
    print(
        f'{osp.basename(sys.argv[0]) or "mmsync"}: error: {error}',
        file=sys.stderr)
    raise SystemExit(2)


def world_size_of(launcher: str) -> int:
    """The number of processes of the launch (1 without a launcher)."""
    return int(launch_env(launcher).get('WORLD_SIZE', 1))


@RUNNERS.register_module()
class MMSyncRunner(Runner):
    """mmengine's ``Runner`` with mmsync's training safety (see the module).

    In a distributed run, ``sync_bn='mmsync'`` (or ``dict(type='mmsync',
    stats_mode='default')``) converts every BatchNorm of the model to
    MMSyncBN with ``convert_sync_batchnorm`` (``stats_mode='N'`` unless
    given) before the model is wrapped, as ``sync_bn='torch'`` does with
    torch's SyncBatchNorm. Without distribution the model is left as it is
    (MMSyncBN runs in a world of one). Every other value of ``sync_bn``
    behaves as in ``Runner``.

    With a launcher (torchrun, Slurm or Open MPI environment), the process
    group is joined by ``init_dist_from_env`` (gloo on CPU); without
    ``model_wrapper_cfg`` a CPU model is wrapped in
    ``MMDistributedDataParallel`` with ``device_ids=None``.

    Config keys besides the Runner's: ``trust_checkpoint`` (default False:
    checkpoints load under the weights-only allow-list), ``preflight``
    (default True; False skips the checks of the data splits, which build
    each data set once more) and ``liveness`` (default ``dict(timeout=60)``:
    a lost peer ends every rank within 60 s, see
    :class:`~mmsync.engine.hooks.LivenessHook`; None: off).
    """

    @classmethod
    def from_cfg(cls, cfg: Union[Config, Dict]) -> 'MMSyncRunner':
        """Check the launch, work dir, model and checkpoint, then build.

        Auto-resume (``resume=True`` without ``load_from``) is resolved here
        to the checkpoint of the work dir that will be resumed.
        """
        cfg = copy.deepcopy(cfg) if isinstance(cfg, Config) else Config(
            copy.deepcopy(dict(cfg)))
        try:
            world_size = world_size_of(cfg.get('launcher', 'none'))
            _, note = check_start(cfg, world_size)
        except PreflightError as e:
            exit_on(e)
        runner = super().from_cfg(cfg)
        if runner.distributed:
            runner.logger.info(f'process group: {dist.get_backend()}, '
                               f'{runner.world_size} ranks')
        if note:
            log = (
                runner.logger.warning
                if 'passed over' in note else runner.logger.info)
            log(note)
        return runner

    @property
    def trust_checkpoint(self) -> bool:
        """Whether checkpoints load with full unpickling."""
        return bool(self.cfg.get('trust_checkpoint', False))

    def build_logger(self, *args, **kwargs):
        """mmengine's logger, with the environment, config and hook table
        kept off the console (the log file has them)."""
        logger = super().build_logger(*args, **kwargs)
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler) and not any(
                    isinstance(f, FileOnly) for f in handler.filters):
                handler.addFilter(FileOnly())
        return logger

    def setup_env(self, env_cfg: Dict) -> None:
        if self.distributed and not dist.is_initialized():
            os.environ.update(launch_env(self.launcher))
            if (self.launcher == 'slurm'
                    and int(os.environ.get('SLURM_NNODES', 1)) > 1):
                # srun starts train.py itself: no launcher script set these.
                try:
                    export_ifname(os.environ['MASTER_ADDR'])
                except NetError as e:
                    exit_on(PreflightError(str(e)))
            init_dist_from_env(**env_cfg.get('dist_cfg', {}))
        super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg: Optional[Dict],
                   model: nn.Module) -> nn.Module:
        """Wrap as mmengine does (on CPU without ``device_ids``), converting
        for ``sync_bn='mmsync'`` first; log how many norm layers are
        mmsync's, so a run shows which layer its config reached."""
        wrapped = self._wrap_model(model_wrapper_cfg, model)
        norms = [
            m for m in wrapped.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        synced = sum(isinstance(m, SyncBatchNorm) for m in norms)
        self.logger.info(f'batch norm layers: {synced} of {len(norms)} are '
                         f'mmsync.ops.SyncBatchNorm (MMSyncBN)')
        return wrapped

    def _wrap_model(self, model_wrapper_cfg: Optional[Dict],
                    model: nn.Module) -> nn.Module:
        if (model_wrapper_cfg is None and self.distributed
                and not torch.cuda.is_available()):
            model_wrapper_cfg = dict(
                type='MMDistributedDataParallel',
                device_ids=None,
                broadcast_buffers=False,
                find_unused_parameters=self.cfg.get('find_unused_parameters',
                                                    False))
        options = sync_bn_options(self.cfg.get('sync_bn', None))
        if options is None:
            return super().wrap_model(model_wrapper_cfg, model)
        if self.distributed and not is_model_wrapper(model):
            model = convert_sync_batchnorm(model, **options)
        # Runner rejects any sync_bn but 'torch' and 'mmcv'; the conversion
        # is done, so it must not see the value while it wraps.
        sync_bn = self.cfg.sync_bn
        self.cfg.sync_bn = None
        try:
            return super().wrap_model(model_wrapper_cfg, model)
        finally:
            self.cfg.sync_bn = sync_bn

    def register_hooks(self,
                       default_hooks: Optional[Dict] = None,
                       custom_hooks: Optional[List] = None) -> None:
        """Register the hooks; a CheckpointHook that writes local files
        with mmengine's default backend writes them atomically; a
        RunSummaryHook, a WorldSizeHook and a LivenessHook (``liveness=dict(timeout=60)``,
        None for none) unless the config has them."""
        super().register_hooks(default_hooks, custom_hooks)
        for hook_type in (RunSummaryHook, WorldSizeHook):
            if not any(isinstance(hook, hook_type) for hook in self.hooks):
                self.register_hook(hook_type())
        liveness = self.cfg.get('liveness', {})
        if liveness is not None and not any(
                isinstance(hook, LivenessHook) for hook in self.hooks):
            self.register_hook(LivenessHook(**liveness))
        for hook in self.hooks:
            if (isinstance(hook, CheckpointHook) and hook.backend_args is None
                    and hook.file_client_args is None
                    and '://' not in str(hook.out_dir or '')):
                hook.backend_args = dict(backend=ATOMIC_BACKEND)

    def load_checkpoint(self,
                        filename: str,
                        map_location: Union[str, Callable] = 'cpu',
                        strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]):
        """Load a checkpoint as ``Runner.load_checkpoint`` does, under the
        weights-only allow-list unless ``trust_checkpoint`` is set.

        Raises:
            CheckpointError: A local file that is missing, damaged, or asks
                for a global outside the allow-list, in one line.
        """
        if '://' in filename:
            with checkpoint_loading(self.trust_checkpoint):
                return super().load_checkpoint(filename, map_location, strict,
                                               revise_keys)
        checkpoint = load_checkpoint_file(
            osp.expanduser(filename),
            self.trust_checkpoint,
            map_location=map_location)
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(
            self.model) else self.model
        checkpoint = _load_checkpoint_to_model(
            model, checkpoint, strict, revise_keys=revise_keys)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint

    def load_or_resume(self) -> None:
        """Load or resume; auto-resume looks only inside the work dir and
        takes the newest full-state checkpoint that loads (mmengine's
        follows ``last_checkpoint`` wherever it points, and takes whatever
        it names)."""
        if self._has_loaded or not (self._resume and self._load_from is None):
            return super().load_or_resume()
        path, skipped = find_resume_checkpoint(self.work_dir,
                                               self.trust_checkpoint)
        if path is None:
            self.logger.info(f'no checkpoint in {self.work_dir} to resume '
                             'from: training starts afresh')
            return None
        if skipped:
            self.logger.warning(f'resuming from {path}, the newest checkpoint '
                                f'that loads; passed over: '
                                f'{"; ".join(skipped)}')
        self.resume(path)
        self._has_loaded = True

    def _check_splits(self, mode: str) -> None:
        """The pre-flight of the data splits of a run of ``mode``."""
        if not self.cfg.get('preflight', True):
            return
        try:
            plan = check_splits(self.cfg, self.world_size, mode)
        except PreflightError as e:
            log_failure(self, e, with_traceback=False)
            exit_on(e)
        if plan:
            self.logger.info(f'train set: {plan}')

    def train(self) -> nn.Module:
        """Check the data, then train; a failure is logged by every rank."""
        self._check_splits('train')
        try:
            return super().train()
        except Exception as e:
            log_failure(self, e)
            if any(text in str(e) for text in PEER_GONE):
                # torchrun names the earliest error (to the second) as the
                # root cause: let the rank that failed first be the earliest.
                time.sleep(PEER_GONE_DELAY)
            raise

    def val(self) -> dict:
        """Check the validation data, then validate."""
        self._check_splits('val')
        return super().val()

    def test(self) -> dict:
        """Check the test data, then test."""
        self._check_splits('test')
        return super().test()


# Downstream configs (default scope 'mmpretrain', 'mmdet', ...) find it by
# its bare name: runner_type='MMSyncRunner'.
ROOT_RUNNERS.register_module(module=MMSyncRunner, force=True)
