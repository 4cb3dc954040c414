"""Keep a launch's processes from outliving the process that started them."""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> None:
    """Have Linux send ``sig`` to this process when its parent dies.

    A launcher that is killed (``kill -9``) cannot stop its children; with
    this they stop anyway instead of running on as orphans. Elsewhere than
    Linux it does nothing.

    Args:
        sig (signal.Signals): The signal to receive. Default: SIGKILL.
    """
    if not sys.platform.startswith('linux'):
        return
    parent = os.getppid()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), sig)
