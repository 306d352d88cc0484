"""The attention-kernel switch: which ``F.scaled_dot_product_attention`` kernel a stage runs (``module.attention``).

See docs/scaling.md for when to pin one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from unclip.config import ConfigError

# F.scaled_dot_product_attention kernels a config may pin (``attention`` module key); "auto" lets torch choose.
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


@contextlib.contextmanager
def sdpa_backend(name: str) -> Iterator[None]:
    """Restrict ``F.scaled_dot_product_attention`` to one kernel inside the block ("auto": no restriction).

    Flash attention takes no attention mask: the prior (causal + padding mask) needs "efficient" or "cudnn".
    """
    if name not in SDPA_BACKENDS:
        raise ConfigError(f"module.attention must be one of {', '.join(SDPA_BACKENDS)}, got {name!r}")
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    with sdpa_kernel([backend]):
        yield
