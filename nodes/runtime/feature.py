"""The runtime every node of the pack shares: how a feature sits on a model and lives
through one sampling run.

A feature (the step cache, the Edit Region, the Token Pruning) puts its tensor-free settings
into the model's ``transformer_options`` under its name, and its wrappers under the same name
(ComfyUI's chainable wrappers: never a replaced forward). For each sampling run its OUTER_SAMPLE
wrapper makes the run's state, which lives only in a per-run clone of the model options, beside
what the run publishes for the other features (``published.py``), and is finished in ``finally``,
also on error and interrupt. At the end, and wherever the feature wants during the run, its
listeners (tests, the benchmark) and, for a feature with a UI event, the frontend get its stats.

ComfyUI's EasyCache keeps its per-run holder the same way (``comfy_extras/nodes_easycache.py``)."""

from __future__ import annotations

import logging

import comfy.patcher_extension as pe

from . import guard
from .log import log_failure, run_warnings

WRAPPER_TYPES = ("OUTER_SAMPLE", "SAMPLER_SAMPLE", "CALC_COND_BATCH", "DIFFUSION_MODEL", "APPLY_MODEL")


class FeatureRun:
    """What a feature keeps for one sampling run."""

    def published(self) -> dict:
        """Entries for ``transformer_options`` while the run lasts (see published.py)."""
        return {}

    def finish(self) -> None:
        """Called once when the run ends, also on error and interrupt: free what it holds and report."""


def node_id_of(node_class) -> str | None:
    """The id of the node in the graph that is executing (None outside a server)."""
    hidden = getattr(node_class, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None


def _prompt_server():
    """ComfyUI's server, when one runs (scripts and tests have none)."""
    try:
        from server import PromptServer
    except Exception:
        return None
    return getattr(PromptServer, "instance", None)


class Feature:
    """One feature of the pack: its keys in ``transformer_options``, its wrappers' key,
    its stats listeners and its UI event."""

    def __init__(self, name: str, title: str, ui_event: str | None = None):
        self.name = name                    # settings key and wrapper key
        self.run_key = f"{name}_run"        # the live run, only inside a per-run clone
        self.title = title                  # for log lines
        self.ui_event = ui_event            # the frontend's event for live stats (None: no panel)
        # callbacks receiving (node_id, stats dict, final: bool); used by tests and the benchmark
        self.listeners: list = []

    # ---- on the model ------------------------------------------------------------------
    def settings_on(self, model_options):
        return (model_options or {}).get("transformer_options", {}).get(self.name)

    def install(self, model, settings, wrappers: dict):
        """A clone of ``model`` (a ModelPatcher) carrying ``settings`` and ``wrappers``
        ({"OUTER_SAMPLE": function, ...}); an earlier node of this feature is replaced."""
        m = model.clone()
        to = m.model_options.setdefault("transformer_options", {})
        for name in WRAPPER_TYPES:
            m.remove_wrappers_with_key(getattr(pe.WrappersMP, name), self.name)
        to[self.name] = settings
        for name, wrapper in wrappers.items():
            m.add_wrapper_with_key(getattr(pe.WrappersMP, name), self.name, wrapper)
        return m

    # ---- in a run ----------------------------------------------------------------------
    def run_in(self, transformer_options):
        """This feature's live run in a call's ``transformer_options`` (None outside a run)."""
        if not isinstance(transformer_options, dict):
            return None
        return transformer_options.get(self.run_key)

    def sampling_wrapper(self, start):
        """The OUTER_SAMPLE wrapper: ``start(guider, settings, args, kwargs)`` makes a
        FeatureRun for a sampling run of a model with this feature's settings (None: sample
        without it); a failing start never fails the user's sampling."""
        def outer_sample(executor, *args, **kwargs):
            guider = executor.class_obj
            settings = self.settings_on(guider.model_options)
            if settings is None:
                return executor(*args, **kwargs)
            with run_warnings():
                return run_with(executor, guider, settings, args, kwargs)

        def run_with(executor, guider, settings, args, kwargs):
            try:
                run = start(guider, settings, args, kwargs)
            except Exception as e:
                if guard.is_interrupt(e):
                    raise
                log_failure(logging.ERROR, "%s: could not set up this run; sampling without it", self.title)
                return executor(*args, **kwargs)
            if run is None:
                return executor(*args, **kwargs)
            try:
                with guard.run_state(guider, {self.run_key: run, **run.published()}):
                    return executor(*args, **kwargs)
            finally:
                try:
                    run.finish()
                except Exception:
                    # the user's sampling has its result (or its own error): never replace it with ours
                    log_failure(logging.ERROR, "%s: could not finish the run cleanly", self.title)
        return outer_sample

    def tell(self, node_id, stats: dict, final: bool) -> None:
        """Stats to the listeners and, with a server and a UI event, to the frontend of the one
        client that queued the prompt (as ComfyUI sends its own progress), with the prompt's id;
        a prompt queued without a client id (the API) sends nothing to any browser."""
        payload = dict(stats, node=node_id, final=bool(final))
        guard.tell_listeners(self.listeners, self.title, node_id, payload, final)
        server = _prompt_server() if self.ui_event else None
        if server is None or node_id is None:
            return
        client_id = getattr(server, "client_id", None)
        if client_id is None:
            return
        try:
            server.send_sync(self.ui_event, dict(payload, prompt_id=getattr(server, "last_prompt_id", None)),
                             client_id)
        except Exception:
            log_failure(logging.DEBUG, "%s: could not send stats to the UI", self.title)
