"""Export a training checkpoint's EMA weights as flash-genie's built-in model.

    python packages/flash-genie/tools/export_builtin.py runs/builtin/checkpoints/last.pt

writes ``flash_genie/pretrained/builtin.pt``: a flash-genie checkpoint (config text inside)
whose ``state_dict`` holds the EMA weights only (no optimizer state), plus the training step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flash_genie
from flash_genie.checkpoint import save_checkpoint
from flash_genie.sampling import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a flash-genie training checkpoint with EMA weights")
    default = Path(flash_genie.__file__).parent / "pretrained" / "builtin.pt"
    parser.add_argument("--out", default=str(default), help=f"output file (default {default})")
    args = parser.parse_args()
    import torch

    step = torch.load(args.checkpoint, map_location="cpu", weights_only=True).get("step")
    model, config = load_model(args.checkpoint, ema=True)
    save_checkpoint(args.out, model, config, step=step, weights="ema")
    print(f"wrote {args.out}: EMA weights at step {step}")


if __name__ == "__main__":
    main()
