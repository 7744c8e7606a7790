"""An attribute with one value per thread.

ComfyUI's MultiGPU CFG Split (0.29) runs the model calls of one sampling step concurrently, one
worker thread per device, each on its own deep clone of the model but on the same run of each
node: state that belongs to one model call in flight (the call whose blocks are running) must
be the calling thread's own, or one thread's blocks land in the other's call."""

from __future__ import annotations

import threading


class PerThread:
    """A descriptor: ``obj.attr`` reads and writes the calling thread's value (``default`` in a
    thread that has not set one). A thread's values go when the thread or the object does."""

    def __init__(self, default=None):
        self.default = default

    def __set_name__(self, owner, name):
        self.slot = f"_{name}_per_thread"

    def _local(self, obj) -> threading.local:
        local = obj.__dict__.get(self.slot)
        if local is None:
            local = obj.__dict__.setdefault(self.slot, threading.local())
        return local

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return getattr(self._local(obj), "value", self.default)

    def __set__(self, obj, value):
        self._local(obj).value = value
