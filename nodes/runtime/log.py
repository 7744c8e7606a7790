"""The pack's logger and its warnings, given once per sampling run (or, outside a run, once per
prompt on a server): a server warns about the same fallback for every prompt that meets it, not
only for the first prompt of its life."""

from __future__ import annotations

import contextlib
import contextvars
import logging

log = logging.getLogger("speculative_cache")

# (scope, message) of the warnings given; a run's entries go when the run ends
_warned: set = set()
_run_scope: contextvars.ContextVar = contextvars.ContextVar("speculative_cache_warning_scope", default=None)
_MAX_REMEMBERED = 4096


def _scope():
    """The sampling run being sampled in this thread, else the prompt the server executes."""
    scope = _run_scope.get()
    if scope is not None:
        return scope
    try:
        from server import PromptServer
        return ("prompt", getattr(getattr(PromptServer, "instance", None), "last_prompt_id", None))
    except Exception:
        return ("prompt", None)


def warn_once(message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` once per sampling run (or per prompt outside a run), at ``level``."""
    key = (_scope(), message)
    if key in _warned:
        return
    if len(_warned) >= _MAX_REMEMBERED:
        _warned.clear()
    _warned.add(key)
    log.log(level, message)


def log_failure(level: int, message: str, *args, exc: BaseException | None = None) -> None:
    """Log ``message`` with the exception's traceback as text. Not as ``exc_info``: a log record
    that keeps the traceback object (pytest's, or any in-memory log of a server) would keep the
    failed call's frames, and through them its tensors, alive."""
    import sys
    import traceback
    exc = exc if exc is not None else sys.exc_info()[1]
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if exc is not None else ""
    log.log(level, message + ("\n%s" if text else ""), *args, *((text.rstrip(),) if text else ()))


@contextlib.contextmanager
def run_warnings():
    """One sampling run: its warnings are given once within it, and again in the next run."""
    scope = object()
    token = _run_scope.set(scope)
    try:
        yield
    finally:
        _run_scope.reset(token)
        for key in [k for k in _warned if k[0] is scope]:
            _warned.discard(key)
