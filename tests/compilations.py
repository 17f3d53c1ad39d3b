"""Counting JAX traces and compilations: the predictor's no-recompile guarantees are tested with it."""

from __future__ import annotations

import contextlib
import threading

import jax

COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration")


@contextlib.contextmanager
def count_compilations(names=COMPILE_EVENTS, this_thread_only: bool = False):
    """Yields a list that collects every event in `names` (by default each trace and XLA
    compilation) started inside the block; with `this_thread_only`, only those of the calling
    thread (what a caller waits for: the predictor's background compilations are left out), and
    then the compiled function's name rather than the event's."""
    me, events = threading.get_ident(), []

    def listener(name, duration, fun_name="", **kwargs):
        if name in names and not this_thread_only:
            events.append(name)
        elif name in names and threading.get_ident() == me:
            events.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
