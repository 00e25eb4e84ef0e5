"""SIGTERM (preemption) as an interruption the sweep survives: finished points are kept.

The SIGTERM handler sets a flag before it raises. Its exception can land inside library
code. That code may catch it and raise its own error instead. JAX's pytree checks, for one,
turn it into a ValueError. The sweep's handlers ask the flag first. So such an error still
ends the sweep as a termination. The interrupted point is left for a rerun, not recorded.
"""

import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM (preemption): handled like Ctrl-C, finished points kept; exit 143."""


_TERMINATION = threading.Event()


def request_termination() -> None:
    """What the SIGTERM handler calls: sets the flag, then raises Terminated."""
    _TERMINATION.set()
    raise Terminated()


def raise_if_terminated() -> None:
    """Terminated when a SIGTERM arrived (an exception some library swallowed)."""
    if _TERMINATION.is_set():
        raise Terminated()


def clear_termination() -> None:
    """Forgets an earlier SIGTERM: a new run in the same process starts clean."""
    _TERMINATION.clear()
