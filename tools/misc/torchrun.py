"""torchrun for tools/dist_train.sh and dist_test.sh (see torchrun.sh).

Stopped by SIGTERM, it stops its workers with SIGTERM (silent, also while
they import) and exits with 128 + 15 instead of printing torchrun's
traceback; it dies with the script that started it. With ``--check-port
PROG ADDR PORT`` it only checks that PORT is free on ADDR, or says in one
line that it is not (exit 2).
"""
import errno
import importlib.util
import os
import os.path as osp
import signal
import socket
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main


def load_process_module():
    """mmsync.utils.process, loaded from its file: importing the mmsync
    package loads mmengine and the extension, seconds that this process
    does not need. The package is found where Python finds it (a checkout
    on PYTHONPATH, an editable install or site-packages), not by this
    script's place, which differs between a checkout and an installed
    ``mmsync/.mim/tools``."""
    package = importlib.util.find_spec('mmsync')
    if package is None or not package.submodule_search_locations:
        sys.exit('torchrun.py: error: mmsync is not importable: install it '
                 '(tools/setup/setup_env.sh) or put its checkout on '
                 'PYTHONPATH')
    path = osp.join(package.submodule_search_locations[0], 'utils',
                    'process.py')
    spec = importlib.util.spec_from_file_location('mmsync_process', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_port(prog: str, addr: str, port: int) -> None:
    """Exit with one line if ``port`` is taken on ``addr``."""
    try:
        with socket.create_server((addr, port)):
            return
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            return  # not an address of this node: torchrun will say
    with socket.create_server((addr, 0)) as s:
        free = s.getsockname()[1]
    print(
        f'{prog}: error: PORT={port} is in use on {addr} (another job?): '
        f'choose a free one, e.g. PORT={free}, or on one node leave PORT '
        'unset to let torchrun pick one',
        file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
    if sys.argv[1:2] == ['--check-port']:
        check_port(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    process = load_process_module()
    process.die_with_parent(signal.SIGTERM)
    # The workers check it: stopped while it starts them, this process
    # cannot stop them, and they may find it gone before they can ask Linux
    # to stop them with it.
    os.environ[process.LAUNCHER_PID] = str(os.getpid())
    # Restarted workers sharing the rendezvous store of the first attempt can
    # read its stale addresses and fail to connect (pytorch/pytorch#135712):
    # each attempt gets a store of its own instead.
    os.environ.setdefault('TORCH_DISABLE_SHARE_RDZV_TCP_STORE', '1')
    try:
        main()
    except SignalException as e:
        sys.exit(128 + int(e.sigval))
