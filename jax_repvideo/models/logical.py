"""Logical activation names for the layers, with no dependency on the mesh.

A layer marks an activation with logical axis names: ``constrain(q, (ANY, "seq", "act_heads",
None))``, where None keeps a dimension whole and ANY leaves it to the compiler. Outside a sharding
context this is the identity. ``jax_repvideo.sharding`` installs the resolver that turns names into
a placement (``Layout.activate()``), so the layers never import it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Sequence

import jax

# A dimension whose placement the compiler chooses (propagated from the inputs).
ANY = "any"

Resolver = Callable[[jax.Array, Sequence[str | None]], jax.Array]
_RESOLVER: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar("logical_resolver", default=None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pins ``x``'s placement by logical names when a sharding context is active; else returns x."""
    resolver = _RESOLVER.get()
    return x if resolver is None else resolver(x, names)


@contextlib.contextmanager
def resolver(fn: Resolver) -> Iterator[None]:
    """Installs ``fn`` as the resolver of ``constrain`` while tracing inside the block."""
    token = _RESOLVER.set(fn)
    try:
        yield
    finally:
        _RESOLVER.reset(token)
