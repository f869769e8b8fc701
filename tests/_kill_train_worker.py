"""Run by tests/test_rundir.py: ``convspec train`` that SIGKILLs itself at a chosen write.

    python _kill_train_worker.py before|after N convspec-train-args...

kills the process just before (or just after) the N-th (1-based) rename onto ``checkpoint.pt``:
no cleanup code runs, as with a kill from outside at that instant.
"""
import os
import signal
import sys

from convspec.cli import main

if __name__ == "__main__":
    mode, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    real_replace = os.replace
    seen = [0]

    def replace(src, dst, **kwargs):
        hit = False
        if str(dst).endswith("checkpoint.pt"):
            seen[0] += 1
            hit = seen[0] == nth
        if hit and mode == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, **kwargs)
        if hit and mode == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    sys.exit(main(argv))
