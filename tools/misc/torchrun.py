"""torchrun for tools/dist_train.sh: stopped by SIGTERM without a traceback.

dist_train.sh starts it in a session of its own, so that Ctrl-C reaches the
script alone, which then sends this SIGTERM: torchrun stops its workers with
SIGTERM (silent, also while they import) and this exits with 128 + 15
instead of printing torchrun's traceback. It dies with dist_train.sh.
"""
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

from mmsync.utils.process import die_with_parent

if __name__ == '__main__':
    die_with_parent(signal.SIGTERM)
    try:
        main()
    except SignalException as e:
        sys.exit(128 + int(e.sigval))
