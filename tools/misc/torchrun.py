"""torchrun for tools/dist_train.sh and dist_test.sh (see torchrun.sh).

Stopped by SIGTERM, it stops its workers with SIGTERM (silent, also while
they import) and exits with 128 + 15 instead of printing torchrun's
traceback; it dies with the script that started it. With ``--check-port
PROG ADDR PORT`` it only checks that PORT is free on ADDR, or says in one
line that it is not (exit 2). With ``--route PROG ADDR NNODES NODE_RANK``
it prints the interface (``-`` for loopback) and the local address that
reach ADDR (see ``mmsync.utils.net``), or says in one line why ADDR cannot
serve the run (exit 2).
"""
import errno
import importlib.util
import os
import os.path as osp
import signal
import socket
import sys


def load_module(name: str):
    """mmsync.utils.<name>, loaded from its file: importing the mmsync
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
                    f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'mmsync_{name}', path)
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


def print_route(prog: str, addr: str, nnodes: int, node_rank: int) -> None:
    """Print ``IFNAME LOCAL_ADDR`` of the route to ``addr``, or exit with one
    line where ``addr`` cannot be the master of this run."""
    net = load_module('net')
    try:
        route = net.route_to(addr, multi_node=nnodes > 1)
        if (node_rank == 0 and route.ifname
                and route.local_addr != net.resolve(addr)):
            raise net.NetError(
                f'MASTER_ADDR={addr} is not an address of this node, but '
                'NODE_RANK=0 hosts the rendezvous: set MASTER_ADDR to an '
                f'address of node 0 (here: {route.local_addr}) on every node')
    except net.NetError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)
    print(route.ifname or '-', route.local_addr)


if __name__ == '__main__':
    if sys.argv[1:2] == ['--check-port']:
        check_port(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    if sys.argv[1:2] == ['--route']:
        print_route(sys.argv[2], sys.argv[3], int(sys.argv[4]),
                    int(sys.argv[5]))
        sys.exit(0)
    # Imported here: the checks above need no torch (seconds to import).
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main
    process = load_module('process')
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
