"""Turn a sharded FSDP checkpoint folder into one file that a single process loads (sampling, evaluation).

    python scripts/consolidate_checkpoint.py RUN/checkpoints/last.ckpt RUN/last_full.ckpt [--weights-only]

The output has Lightning's single-file layout (``state_dict`` with full tensors, the ``unclip`` metadata, ...), so
``load_prior`` / ``load_decoder`` / ``load_upsampler`` and the pipeline read it as any other checkpoint. Resume
training from the sharded folder itself (its optimizer states stay in FSDP's layout here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unclip.training.sharded import save_consolidated  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sharded", type=Path,
                        help="the checkpoint folder FSDPStrategy(state_dict_type='sharded') wrote")
    parser.add_argument("out", type=Path, help="the single checkpoint file to write")
    parser.add_argument("--weights-only", action="store_true", help="drop optimizer states (sampling only)")
    args = parser.parse_args(argv)
    try:
        path = save_consolidated(args.sharded, args.out, weights_only=args.weights_only)
    except ValueError as exc:
        print(f"consolidate_checkpoint: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
