"""``python -m tests.reliability.hang_in_save MARKER N OVERRIDES...``: ``unclip-train OVERRIDES`` whose N-th
``torch.save`` writes half of its bytes to the file it was given, touches MARKER and waits to be killed: a kill in
the middle of writing a checkpoint, at a known moment."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    marker, hang_at, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    real_save = torch.save
    calls = 0

    def half_save(obj, f, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls < hang_at:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f  # a path: written in place
        out.write(data[: len(data) // 2])
        out.flush()
        os.fsync(out.fileno())
        marker.write_text(os.readlink(f"/proc/self/fd/{out.fileno()}"))  # the file's path, not the fd's number
        time.sleep(600)

    torch.save = half_save
    from unclip.train import main as train_main

    sys.argv = ["unclip-train", *overrides]
    train_main()


if __name__ == "__main__":
    main()
