"""Keep a launch's processes from outliving the process that started them."""
import ctypes
import os
import signal
import sys
from typing import Optional

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# tools/misc/torchrun.py exports its pid here, for its workers to check.
LAUNCHER_PID = 'MMSYNC_LAUNCHER_PID'


def die_with_parent(sig: signal.Signals = signal.SIGKILL,
                    parent: Optional[int] = None) -> None:
    """Have Linux send ``sig`` to this process when its parent dies.

    A launcher that is killed (``kill -9``), or stopped while it starts its
    workers, cannot stop them; with this they stop anyway instead of running
    on as orphans. Elsewhere than Linux it does nothing.

    Args:
        sig (signal.Signals): The signal to receive. Default: SIGKILL.
        parent (int, optional): The pid the parent has, if known; a process
            whose parent is another one (it died, and this process was
            re-parented) gets ``sig`` at once. Default: None, the parent of
            the moment.
    """
    if not sys.platform.startswith('linux'):
        return
    parent = parent or os.getppid()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), sig)


def die_with_launcher() -> None:
    """``die_with_parent`` for a worker of tools/misc/torchrun.py (checked
    against the pid it exports), or of another torchrun."""
    launcher = os.environ.get(LAUNCHER_PID)
    die_with_parent(parent=int(launcher) if launcher else None)
