import functools
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import engine.synthetic  # noqa: E402, F401  (as the runners do: the synthetic benchmark's presets and data source)
from engine.model.dit import DiT, DiTConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed compiles its CPU ops (CPU Adam, shared-memory comm) on first use, behind a lock file in the extensions
# folder. A folder of this checkout's own means a lock left by some other, killed process can never stall the suite.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))


def randomized_dit(preset: str, seed: int = 0, **overrides) -> DiT:
    """A DiT whose every parameter (zero-initialised head and norms included) is random at a realistic scale."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig.preset(preset, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def dit_inputs(config: DiTConfig, batch: int = 2, frames: int = 5, height: int = 6, width: int = 10,
               text_tokens: int = 512, seed: int = 1) -> dict:
    """Random inputs with odd frames and non-square latents; timesteps anywhere in [0, 1000]."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        x=torch.randn(batch, 16, frames, height, width, generator=g),
        t=torch.tensor([3.0, 871.5, 500.0, 999.0][:batch]),
        context=torch.randn(batch, text_tokens, config.text_dim, generator=g),
    )
    if config.model_type == "i2v":
        inputs["clip_fea"] = torch.randn(batch, 257, config.clip_dim, generator=g)
        inputs["y"] = torch.randn(batch, config.in_dim - 16, frames, height, width, generator=g)
    return inputs


def save_tiny_encoders(root: Path, words: list[str], text_dim: int = 32, clip_dim: int = 48) -> Path:
    """Tiny random encoders saved as a diffusers Wan2.1 pipeline folder holds them: vae/ (AutoencoderKLWan with
    Wan's strides 4 x 8 x 8 and 16 latent channels), tokenizer/ (word level over `words`, with </s>), text_encoder/
    (umT5, width `text_dim`), image_encoder/ (CLIP, width `clip_dim`) and image_processor/."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        PreTrainedTokenizerFast,
        UMT5Config,
        UMT5EncoderModel,
    )

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(root / "vae")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
                            ).save_pretrained(root / "tokenizer")
    UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8)).save_pretrained(root / "text_encoder")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=clip_dim, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=224, patch_size=14)
                    ).save_pretrained(root / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
                       ).save_pretrained(root / "image_processor")
    return root


@pytest.fixture(params=["tiny", "tiny-i2v"])
def preset(request) -> str:
    return request.param


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def build_deepspeed_ops() -> None:
    """Compile DeepSpeed's JIT ops once, in this process, before launched ranks need them (minutes on 2 cores the
    first time; a cached load after that)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load(verbose=False)
    if not torch.cuda.is_available():
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        ShareMemCommBuilder().load(verbose=False)


def launch(ranks: int, script: str, *args: str, check: bool = True, timeout: int = 600
           ) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N script args` from the repository root (CPU ranks on a machine without GPUs); a
    `script` without `.py` is a module (`tests.distributed.x`), run as `python -m` runs it."""
    build_deepspeed_ops()
    port = free_port()
    target = [script] if script.endswith(".py") else ["--module", script]
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), *target, *args]
    # Its own session, so that a timeout kills the launcher's rank processes too, not only the launcher.
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s; its last output:\n"
                                 f"{stdout[-3000:]}\n{stderr[-3000:]}") from None
    done = subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
    # Ranks that exit normally unlink DeepSpeed's shared-memory all-reduce buffers; killed ones cannot, so clear
    # those here, or the suite fills /dev/shm.
    leftovers = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for buffer in leftovers:
        buffer.unlink(missing_ok=True)
    if done.returncode == 0:
        assert not leftovers, f"{' '.join(cmd)} left shared-memory buffers behind: {leftovers}"
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done
