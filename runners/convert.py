"""Turn a saved DeepSpeed checkpoint into the loadable folder the trainer exports: a DiT (`load_dit`), or a PAVRM
(`RewardModel.from_pretrained`) for a reward run's checkpoint.

    python -m runners.convert RUN_DIR/checkpoints/step_000100 OUT_DIR [--lora_out LORA_DIR]

The weights are consolidated with DeepSpeed's own zero_to_fp32 (fp32 master weights) and written by the trainer's
own export (engine.train.specs.export, as the checkpoint's record says), atomically, then reloaded and compared
tensor by tensor. A LoRA run's checkpoint gives the merged model in OUT_DIR and its LoRA files (diffusers and
original Wan / ComfyUI layouts) in LORA_DIR (default: OUT_DIR-lora).
"""

import argparse
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder (RUN_DIR/checkpoints/step_N)")
    parser.add_argument("out", type=Path, help="output folder (original Wan2.1 layout)")
    parser.add_argument("--lora_out", type=Path, default=None, help="LoRA runs: folder for the LoRA files "
                        "(default: OUT-lora)")
    args = parser.parse_args(argv)

    from engine.model.reward import RewardModel
    from engine.model.weights import load_dit
    from engine.train.checkpoint import consolidated_state
    from engine.train.specs import export

    states = sorted(args.checkpoint.glob("*model_states.pt"))
    if not states:
        parser.exit(2, f"error: {args.checkpoint} holds no DeepSpeed model states (*model_states.pt)\n")
    info = torch.load(states[0], map_location="cpu", weights_only=False)
    if "dit_config" not in info:
        parser.exit(2, f"error: {states[0]} has no dit_config; was it written by engine.train.trainer?\n")
    lora_out = args.lora_out or args.out.with_name(f"{args.out.name}-lora")
    state = export(consolidated_state(args.checkpoint), info, args.out, lora_out)
    reward = info.get("trained") == "reward"
    if info.get("lora", {}).get("rank"):
        print(f"wrote {lora_out}: LoRA rank {info['lora']['rank']}, {len(info['lora']['targets'])} targets")

    reloaded = (RewardModel.from_pretrained(args.out) if reward else load_dit(args.out)).state_dict()
    mismatched = [k for k, v in state.items() if not torch.equal(reloaded[k], v.float())]
    if mismatched or reloaded.keys() != state.keys():
        parser.exit(1, f"error: {args.out} does not reproduce the checkpoint (first mismatch: {mismatched[:1]})\n")
    print(f"wrote {args.out}: {'a reward model, ' if reward else ''}{len(state)} tensors, "
          f"{sum(v.numel() for v in state.values()):,} parameters, verified by reloading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
