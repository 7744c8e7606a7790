"""ComfyUI's context windows (long videos: Context Windows / WAN Context Windows nodes) call the
model once per window of frames at every step, each on its own slice of x. For the cache all
the windows of a step are one evaluation (one decision, so every window computes or every
window is forecast), and each window has its own streams: a window's forecast comes from that
window's own past outputs. (Before, the windows shared one history and one window's output was
forecast from another's: a planned 6x target on a tiny Wan model with 4 windows gave an output
51 times the size of the uncached one.)"""

from __future__ import annotations


def window_key(transformer_options):
    """The context window this call is for (None without context windows)."""
    window = (transformer_options or {}).get("context_window")
    index_list = getattr(window, "index_list", None)
    if index_list is None:
        return None
    return (getattr(window, "dim", None), tuple(int(i) for i in index_list))


def stream_keys(keys: list, transformer_options) -> list:
    """The streams of a call: per conditioning, and per window with context windows."""
    window = window_key(transformer_options)
    return keys if window is None else [(key, window) for key in keys]


class Evaluations:
    """Which calc_cond_batch calls begin an evaluation: with context windows only the first
    window of each (step, sigma); every call otherwise. ``repeated``: whether the last call
    had the (step, sigma) of the call before it (windows, or any other second call)."""

    def __init__(self):
        self.current = None         # (step, sigma) of the last call
        self.repeated = False

    def begins(self, transformer_options, step: int, sigma: float) -> bool:
        key = (step, sigma)
        self.repeated = key == self.current
        self.current = key
        return not (self.repeated and window_key(transformer_options) is not None)
