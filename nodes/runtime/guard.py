"""One containment rule for every hook of every node of the pack.

* An error raised by **the pack's own code** (a wrapper, a block or attention patch, a forecast, a
  verification, a plan) never stops a user's sampling: it ends the feature for the rest of that
  run, with one warning, and the call is computed as without the pack.
* An error raised by **the model or ComfyUI** (out of memory, a shape error of the user's graph,
  another node's patch) and ComfyUI's interrupt propagate unchanged, and the call is never run a
  second time.

Which side raised is known, not guessed: every place where the pack hands control to the model or
ComfyUI (the wrapped executor, the next block patch or the model's own block, the next attention
function) goes through ``theirs``, which marks what comes out of it; every hook of the pack marks
what comes out of its own code with ``ours``. The innermost mark wins, so an error of one of our
block patches stays ours when it passes through the model's forward on its way out.

A call that failed in our code is computed again only with inputs it had before the first
attempt: the first attempt gets private copies of the lists of its ``control`` argument (ComfyUI's
U-Net consumes ControlNet residuals with ``control[...].pop()``)."""

from __future__ import annotations

import contextlib
import logging

import comfy.model_patcher

from .log import log_failure

_SIDE = "_speculative_cache_side"      # attribute on an exception: "ours" or "theirs"


def is_interrupt(exc: BaseException) -> bool:
    if not isinstance(exc, Exception):
        return True   # KeyboardInterrupt, SystemExit, ...
    try:
        import comfy.model_management as mm
        return isinstance(exc, mm.InterruptProcessingException)
    except Exception:
        return False


def _mark(exc: BaseException, side: str) -> None:
    if getattr(exc, _SIDE, None) is None:
        try:
            setattr(exc, _SIDE, side)
        except Exception:
            pass       # an exception type that takes no attributes: it stays unmarked (ours)


def passes_through(exc: BaseException) -> bool:
    """Whether an error must reach the user unchanged: an interrupt, or raised by the model or
    ComfyUI (not by the pack's own code)."""
    return is_interrupt(exc) or getattr(exc, _SIDE, None) == "theirs"


def theirs(fn, *args, **kwargs):
    """Call the model's or ComfyUI's code on the pack's behalf; what it raises is theirs."""
    try:
        return fn(*args, **kwargs)
    except BaseException as e:
        _mark(e, "theirs")
        raise


@contextlib.contextmanager
def ours():
    """The pack's own code in a hook: what it raises (and what its ``theirs`` calls did not
    mark) is ours."""
    try:
        yield
    except BaseException as e:
        _mark(e, "ours")
        raise


class ModelCall:
    """A wrapped executor handed to the pack's handling of one call: calling it runs the model
    (marked as theirs) and notes that the model was entered; its attributes are the executor's."""

    def __init__(self, executor):
        self._executor = executor
        self.entered = False

    def __getattr__(self, name):
        return getattr(self._executor, name)

    def __call__(self, *args, **kwargs):
        self.entered = True
        return theirs(self._executor, *args, **kwargs)


def private_inputs(args, kwargs):
    """``args``/``kwargs`` for a first attempt: the lists of a ``control`` dict copied, so that
    an attempt that consumes them leaves the call's own inputs intact for a second one."""
    def fresh(control):
        if isinstance(control, dict):
            return {k: (list(v) if isinstance(v, list) else v) for k, v in control.items()}
        return control
    if "control" in kwargs:
        kwargs = dict(kwargs, control=fresh(kwargs["control"]))
    return args, kwargs


def cached_call(run, executor, args, kwargs, call):
    """``call(model_call, args, kwargs)``: a feature's handling of one model call, where
    ``model_call`` runs the model. An error of the model or ComfyUI, or an interrupt, propagates
    unchanged. An error of ours gives the feature up for the run (``run.fail``) and the call is
    made without it, on the call's own inputs (the attempt had private copies of what a model
    consumes)."""
    attempt_args, attempt_kwargs = private_inputs(args, kwargs)
    try:
        return call(ModelCall(executor), attempt_args, attempt_kwargs)
    except Exception as e:
        if passes_through(e):
            raise
        give_up(run, "model call", e)
        return executor(*args, **kwargs)


def give_up(run, where: str, exc: Exception) -> None:
    """``run.fail(where, exc)``, which itself never raises into the user's sampling."""
    try:
        run.fail(where, exc)
    except Exception:
        log_failure(logging.ERROR, "Speculative Cache: could not end the run after an internal error in %s", where)


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
            log_failure(logging.ERROR, "%s: stats listener failed", who)
