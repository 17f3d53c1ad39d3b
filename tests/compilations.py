"""Counting JAX traces and compilations: the predictor's no-recompile guarantees are tested with it."""

from __future__ import annotations

import contextlib

import jax

COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration")


@contextlib.contextmanager
def count_compilations(names=COMPILE_EVENTS):
    """Yields a list that collects every event in `names` (by default each trace and XLA
    compilation) started inside the block."""
    events = []

    def listener(name, duration, **kwargs):
        if name in names:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
