"""Attention variants behind one interface and a registry from names to builders."""

# Importing a variant's module registers it.
from dilexp.attention import (
    block_sparse,  # noqa: E402,F401
    dilated,  # noqa: E402,F401
    flex,  # noqa: E402,F401
    improved,  # noqa: E402,F401
    ring,  # noqa: E402,F401
    sdpa,  # noqa: E402,F401,I001
)
from dilexp.attention.base import Attention, Capabilities
from dilexp.attention.registry import available, build, capabilities, register, unregister, with_capability

__all__ = ["Attention", "Capabilities", "available", "build", "capabilities", "register", "unregister",
           "with_capability"]
