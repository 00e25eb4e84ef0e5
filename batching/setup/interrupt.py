"""SIGTERM (preemption) as an interruption the sweep survives: finished points are kept.

Set by the SIGTERM handler before it raises. A handler's exception can land inside library
code that catches it and raises its own error instead (seen: JAX's pytree checks turned it
into a ValueError); the sweep's handlers ask this flag first, so such an error still ends
the sweep as a termination, and the interrupted point is left for a rerun, not recorded.
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
