"""SIGTERM (preemption) as an interruption the sweep survives: finished points are kept.

The SIGTERM handler sets a flag before it raises. Its exception can land inside library
code. That code may catch it and raise its own error instead. JAX's pytree checks, for one,
turn it into a ValueError. The sweep's handlers ask the flag first. So such an error still
ends the sweep as a termination. The interrupted point is left for a rerun, not recorded.

A process that has not ended GRACE_S after the signal is ended at once. First it prints
every thread's stack. GRACE_S stays under the notice before a preemption's kill: Compute
Engine's for spot VMs, Kubernetes' default terminationGracePeriodSeconds. Rows are appended
one line at a time, and a torn last line is read past. So a hard exit loses only the point
in flight.
"""

import faulthandler
import os
import sys
import threading

GRACE_S = 20.0


class Terminated(KeyboardInterrupt):
    """SIGTERM (preemption): handled like Ctrl-C, finished points kept; exit 143."""


_TERMINATION = threading.Event()


def request_termination() -> None:
    """What the SIGTERM handler calls: sets the flag, then raises Terminated."""
    _TERMINATION.set()
    raise Terminated()


_HARD_EXIT: list[threading.Timer] = []


def exit_after(grace_s: float | None = None, code: int = 143) -> threading.Timer:
    """A daemon timer that prints every thread's stack to stderr, then exits with `code`.

    The wait is grace_s, GRACE_S when None. A second signal keeps the first timer.
    """
    if _HARD_EXIT:
        return _HARD_EXIT[0]
    grace_s = GRACE_S if grace_s is None else grace_s

    def hard_exit():
        print(f"still running {grace_s:g} s after SIGTERM; exiting now", file=sys.stderr)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(code)

    timer = threading.Timer(grace_s, hard_exit)
    timer.daemon = True
    timer.start()
    _HARD_EXIT.append(timer)
    return timer


def raise_if_terminated() -> None:
    """Terminated when a SIGTERM arrived (an exception some library swallowed)."""
    if _TERMINATION.is_set():
        raise Terminated()


def clear_termination() -> None:
    """Forgets an earlier SIGTERM: a new run in the same process starts clean."""
    _TERMINATION.clear()
