"""PRFL fine-tuning of a Wan2.1 DiT against a frozen latent reward model.

    deepspeed runners/prfl.py --ds_config ds_configs/z3_offload.json [--config configs/tiny.yaml] [key=value ...]
"""

import sys

from engine.cli import parse_run


def main(argv=None) -> int:
    args, config, ds_config = parse_run(__doc__.strip().splitlines()[0], "configs/tiny.yaml", argv)
    print(f"Config {args.config} and DeepSpeed config {args.ds_config} are valid, but PRFL training is not built "
          "yet: the reward model, rollout and PRFL step land in later releases. Nothing was trained.",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
