"""Turn a saved DeepSpeed checkpoint into a consolidated safetensors folder that DiT.from_pretrained loads.

    python runners/convert.py RUN_DIR/checkpoints/step_000100 OUT_DIR [--lora_out LORA_DIR]

The weights are consolidated with DeepSpeed's own zero_to_fp32 (fp32 master weights), written atomically, then
reloaded with DiT.from_pretrained and compared tensor by tensor. A LoRA run's checkpoint gives the merged model in
OUT_DIR and its LoRA files (diffusers and original Wan / ComfyUI layouts) in LORA_DIR (default: OUT_DIR-lora).
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

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from engine.config import LoRAConfig
    from engine.dit import DiT, DiTConfig
    from engine.lora import merged_state, save_lora_export
    from engine.weights import save_dit_state

    states = sorted(args.checkpoint.glob("*model_states.pt"))
    if not states:
        parser.exit(2, f"error: {args.checkpoint} holds no DeepSpeed model states (*model_states.pt)\n")
    client = torch.load(states[0], map_location="cpu", weights_only=False)
    if "dit_config" not in client:
        parser.exit(2, f"error: {states[0]} has no dit_config; was it written by engine.trainer?\n")
    config = DiTConfig(**client["dit_config"])
    lora = LoRAConfig(**client.get("lora", {}))
    state = get_fp32_state_dict_from_zero_checkpoint(str(args.checkpoint.parent), tag=args.checkpoint.name)
    if lora.rank:
        lora_out = args.lora_out or args.out.with_name(f"{args.out.name}-lora")
        save_lora_export(state, config, lora, args.out, lora_out)
        state = merged_state(state, lora)
        print(f"wrote {lora_out}: LoRA rank {lora.rank}, alpha {lora.effective_alpha}, {len(lora.targets)} targets")
    else:
        save_dit_state(state, config, args.out)

    reloaded = DiT.from_pretrained(args.out).state_dict()
    mismatched = [k for k, v in state.items() if not torch.equal(reloaded[k], v.float())]
    if mismatched or reloaded.keys() != state.keys():
        parser.exit(1, f"error: {args.out} does not reproduce the checkpoint (first mismatch: {mismatched[:1]})\n")
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} parameters, "
          "verified by reloading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
