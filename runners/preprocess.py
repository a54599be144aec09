"""Preprocess videos into a latent dataset (VAE latents, umT5 text embeddings; i2v: CLIP features, condition).

    python runners/preprocess.py records=videos.jsonl out=data/latents encoders=/ckpt/Wan2.1-T2V-1.3B-Diffusers
    torchrun --nproc_per_node 8 runners/preprocess.py --config my_preprocess.yaml [key=value ...]

Settings are the fields of engine.data.preprocess.PreprocessConfig (YAML recipe and/or key=value overrides). Rerunning
the same command resumes: finished samples are kept, the rest is done. Bad videos are skipped and listed in
<out>/<split>.summary.json with their reasons. Exit status: 0, 1 if a record failed (not the input's fault) or no
sample is done, 2 for bad settings or records.
"""

import argparse
import sys

from engine.config_io import load_config
from engine.data.preprocess import PreprocessConfig, run
from engine.distributed.process import exit_process
from engine.errors import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     epilog="Overrides: key=value, e.g. records=videos.jsonl resolution=720p frames=49")
    parser.add_argument("--config", default=None, help="YAML recipe (values of PreprocessConfig)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log files)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides, cls=PreprocessConfig)
        return run(config, progress=not args.no_progress)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    exit_process(main())  # skips the interpreter teardown, where gloo's threads can abort a finished run
