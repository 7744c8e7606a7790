"""A bug of ours must never stop a user's sampling: any exception raised while a feature
acts on a model call (in our code, or in the model because of something we fed it) ends
the feature for the rest of that run, with one warning, and the call is redone without it.
ComfyUI's interrupt always passes through untouched."""

from __future__ import annotations

import contextlib
import logging

import comfy.model_patcher

log = logging.getLogger("speculative_cache")


def is_interrupt(exc: BaseException) -> bool:
    if not isinstance(exc, Exception):
        return True   # KeyboardInterrupt, SystemExit, ...
    try:
        import comfy.model_management as mm
        return isinstance(exc, mm.InterruptProcessingException)
    except Exception:
        return False


def cached_call(run, executor, args, kwargs, call):
    """``call()`` (a feature's handling of one model call); on any error but an interrupt,
    ``run.fail`` gives the feature up for the run and the same model call is made without it."""
    try:
        return call()
    except Exception as e:
        if is_interrupt(e):
            raise
        run.fail("model call", e)
        return executor(*args, **kwargs)


@contextlib.contextmanager
def run_state(guider, entries: dict):
    """For one sampling run, the guider's model options carry ``entries`` in their
    ``transformer_options`` (in a clone of the options, so the ModelPatcher's own stay
    untouched); the original options come back afterwards, also on error or interrupt."""
    original = guider.model_options
    try:
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        guider.model_options.setdefault("transformer_options", {}).update(entries)
        yield
    finally:
        guider.model_options = original


def tell_listeners(listeners, who: str, *args) -> None:
    """Call every stats listener with ``args``; a broken listener never breaks sampling."""
    for listener in list(listeners):
        try:
            listener(*args)
        except Exception:
            log.exception("%s: stats listener failed", who)
