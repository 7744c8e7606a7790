"""A bug of ours must never stop a user's sampling: any exception raised while the cache
acts on a model call (in our code, or in the model because of something we fed it) ends
the cache for the rest of that run, with one warning, and the call is redone uncached.
ComfyUI's interrupt always passes through untouched."""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger("speculative_cache")


def is_interrupt(exc: BaseException) -> bool:
    if not isinstance(exc, Exception):
        return True   # KeyboardInterrupt, SystemExit, ...
    try:
        import comfy.model_management as mm
        return isinstance(exc, mm.InterruptProcessingException)
    except Exception:
        return False


def fail(ctx, where: str, exc: Exception) -> None:
    """Give up caching for the rest of ``ctx``'s run (its cache is freed now)."""
    reason = f"{where}: {type(exc).__name__}: {exc}"
    log.warning("Speculative Cache: internal error in %s; this run continues without the cache. "
                "Please report it with the workflow.", reason, exc_info=exc)
    stats = ctx.run.stats
    if not stats.internal_error:
        stats.internal_error = reason[:500]
    ctx.active = None
    ctx.run.close()


def cached_call(ctx, executor, args, kwargs, call):
    """``call()`` (the cache's handling of one model call); on any error but an interrupt,
    give up caching for the run and make the same model call uncached."""
    try:
        return call()
    except Exception as e:
        if is_interrupt(e):
            raise
        fail(ctx, "model call", e)
        return executor(*args, **kwargs)


@contextlib.contextmanager
def run_state(guider, key: str, state):
    """For one sampling run, the guider's model options carry ``state`` under
    ``transformer_options[key]`` (in a clone of the options, so the ModelPatcher's own stay
    untouched); the original options come back afterwards, also on error or interrupt."""
    import comfy.model_patcher
    original = guider.model_options
    try:
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        guider.model_options["transformer_options"][key] = state
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
