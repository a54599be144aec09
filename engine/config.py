"""The typed run config: `RunConfig` and its sections, each field with a one-line comment and each section's
validation naming the field. Every recipe under `configs/` is a value of `RunConfig`, never a second schema; reading
YAML and `section.key=value` overrides into it is engine/config_io.py's job. Sections that belong to a model are
defined beside it (engine.model.reward.RewardModelConfig, engine.model.lora.LoRAConfig).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from engine.errors import ConfigError
from engine.model.dit import PRESETS
from engine.model.lora import LoRAConfig
from engine.model.reward import RewardModelConfig

# Checks of the `data` section that data-source plugins add (engine.synthetic checks its motion kinds); each raises
# ConfigError naming the field. They run when a DataConfig is made, so a recipe fails as it loads.
DATA_CHECKS: list[Callable[["DataConfig"], None]] = []


@dataclass
class ModelConfig:
    """Which generator to build and from where."""

    preset: str = "tiny"  # architecture from engine.model.dit.PRESETS, used when `path` is not set
    path: str | None = None  # local Wan2.1 / diffusers checkpoint (folder or .safetensors); its config wins
    attention_backend: Literal["sdpa", "flash"] = "sdpa"  # flash needs the `gpu` extra
    kernel_backend: Literal["auto", "torch", "triton"] = "auto"  # fused norms/modulation/rotary; auto: triton
    # for tensors on a CUDA device, plain PyTorch for the rest

    def __post_init__(self) -> None:
        if self.path is None and self.preset not in PRESETS:
            raise ConfigError(f"model.preset={self.preset!r}: expected one of {', '.join(PRESETS)}")


@dataclass
class SamplingConfig:
    """The denoising chain used for rollouts and for generating samples."""

    steps: int = 40  # number of model evaluations from noise to data
    solver: Literal["euler", "unipc"] = "unipc"  # diffusers scheduler
    shift: float = 5.0  # Wan's timestep shift
    guidance_scale: float = 5.0  # classifier-free guidance at inference (1 = off)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"sampling.steps={self.steps}: expected at least 1")
        if self.shift <= 0:
            raise ConfigError(f"sampling.shift={self.shift}: expected a positive number")


@dataclass
class MemoryConfig:
    """What the engine keeps of the activations between forward and backward."""

    checkpointing: bool = True  # keep only each block's input and recompute the block in backward
    offload: bool = False  # park those block inputs in pinned host memory (GPU; needs checkpointing)

    def __post_init__(self) -> None:
        if self.offload and not self.checkpointing:
            raise ConfigError("memory.offload=true needs memory.checkpointing=true (only block inputs are offloaded)")


@dataclass
class ParallelConfig:
    """How ranks share the work beyond data parallelism."""

    sp_size: int = 1  # Ulysses sequence-parallel degree; must divide the world size and the head count

    def __post_init__(self) -> None:
        if self.sp_size < 1:
            raise ConfigError(f"parallel.sp_size={self.sp_size}: expected at least 1")


@dataclass
class DataConfig:
    """Training samples: `list` (latents on disk, engine/data/format.py), `synthetic` (the motion benchmark, rendered
    on the fly; its source is registered by `import engine.synthetic`, as the runners do) or `random` (random latents
    and text in memory: engine tests and smoke runs)."""

    source: Literal["random", "synthetic", "list"] = "random"
    list_file: str | None = None  # `list`: the .list file naming the samples
    num_samples: int = 16  # `random` / `synthetic`: size of the set
    latent_shape: tuple[int, int, int] = (5, 6, 10)  # `random`: latent (frames, height, width)
    text_tokens: int = 16  # `random`: text tokens per prompt
    val_list_file: str | None = None  # `list`: held-out samples for validation
    val_num_samples: int = 64  # `synthetic`: held-out samples (seeds disjoint from training) for validation
    # `synthetic`: the motion kinds of the even mix (None: the base generator's four, engine.synthetic.scene.MOTIONS);
    # reward-model data may add `wrong_way`, a smooth object moving in another direction than the prompt's, and
    # (the first-frame variant) `wrong_start`
    synthetic_motions: list[str] | None = None
    # `synthetic`, reward-model training data (not its validation): the object's brightness and width and the noise
    # level drawn per sample (engine.synthetic.scene.VARIED_LOOK), so that the PAVRM judges motion, not how rendered
    # videos look
    synthetic_varied_looks: bool = False

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"data.num_samples={self.num_samples}: expected at least 1")
        for check in DATA_CHECKS:
            check(self)
        if self.synthetic_varied_looks and self.source != "synthetic":
            raise ConfigError(f"data.synthetic_varied_looks with data.source={self.source!r}: it varies the rendered "
                              "samples of source 'synthetic' only")
        for key in ("list_file", "val_list_file"):
            if self.source != "list" and getattr(self, key) is not None:
                raise ConfigError(f"data.{key}={getattr(self, key)!r} with data.source={self.source!r}: list files "
                                  "go with source 'list' and only with it")
        if self.source == "list" and self.list_file is None:
            raise ConfigError("data.source='list' needs data.list_file")


@dataclass
class SFTConfig:
    """The flow-matching (SFT) loss on real latents."""

    timesteps: Literal["uniform", "logit_normal"] = "uniform"  # training sigma distribution before the shift
    shift: float = 1.0  # shift applied to the sampled sigmas (1 = none)
    text_dropout: float = 0.1  # probability of replacing the prompt by the empty one (CFG training)

    def __post_init__(self) -> None:
        if not 0.0 <= self.text_dropout < 1.0:
            raise ConfigError(f"sft.text_dropout={self.text_dropout}: expected a probability in [0, 1)")


@dataclass
class RewardConfig:
    """The process-aware reward model (PAVRM): its architecture, how it is trained, and a trained one to use."""

    model: RewardModelConfig = field(default_factory=RewardModelConfig)  # architecture (trunk from `model`)
    path: str | None = None  # a saved reward model folder: the starting point of training, the scorer of PRFL
    trainable_blocks: list[int] | None = None  # 0-based trunk blocks that train (None: all); the head always does
    task: str = "motion_quality"  # CE: the label field to predict (any numeric 0/1 field of the meta files)
    loss: Literal["ce", "bt"] = "ce"  # binary cross-entropy on labels, or Bradley-Terry on preference pairs
    timesteps: Literal["uniform", "shifted_index", "logit_normal", "fixed"] = "uniform"
    # uniform: sigma ~ U(0, 1) (the paper); shifted_index: a uniform index of a 1000-step grid shifted by `shift`
    # (what the reference code does: 56% of draws above sigma 0.8); logit_normal; fixed: one of `fixed_sigmas`
    shift: float = 5.0  # `shifted_index`
    fixed_sigmas: list[float] = field(default_factory=list)  # `fixed`
    # Curriculum: training sigmas are scaled by min(1, step / sigma_warmup_steps), so the trunk first learns motion
    # on nearly clean latents and then under more and more noise (0: off). Drawn from `timesteps` all the same.
    sigma_warmup_steps: int = 0
    head_lr: float = 1e-5  # learning rate of the pooling attention and MLP (train.lr is the trunk's; paper 1e-6)
    eval_seed: int = 0  # noise and sigmas of validation

    def __post_init__(self) -> None:
        if self.timesteps == "fixed" and not self.fixed_sigmas:
            raise ConfigError("reward.timesteps='fixed' needs reward.fixed_sigmas, e.g. [0.3, 0.7]")
        if any(not 0.0 <= s <= 1.0 for s in self.fixed_sigmas):
            raise ConfigError(f"reward.fixed_sigmas={self.fixed_sigmas}: expected sigmas in [0, 1]")
        if self.sigma_warmup_steps < 0:
            raise ConfigError(f"reward.sigma_warmup_steps={self.sigma_warmup_steps}: expected 0 (off) or a number "
                              "of steps")
        if self.head_lr <= 0:
            raise ConfigError(f"reward.head_lr={self.head_lr}: expected a positive number")
        if self.trainable_blocks is not None and any(not 0 <= b < self.model.blocks for b in self.trainable_blocks):
            raise ConfigError(f"reward.trainable_blocks={self.trainable_blocks}: expected 0-based indices below "
                              f"reward.model.blocks={self.model.blocks}")


@dataclass
class PRFLConfig:
    """The PRFL reward step: where in the sampling chain the gradient step falls and what the reward loss is."""

    mode: Literal["prfl", "rgb_refl"] = "prfl"  # who scores step k: prfl, the latent reward model at x_{k+1};
    # rgb_refl, the pixel-space baseline PRFL is measured against (decode + pixel reward model, section rgb_refl)
    stage: Literal["all", "early", "middle", "late", "last_quarter"] = "all"  # where step k is drawn, uniformly, for
    # both modes: the whole chain, one of its thirds (the paper's ablation), or its last quarter (RGB ReFL's nearly
    # clean latents, where it draws k as published)
    objective: Literal["logit", "log_sigmoid", "hinge", "reference"] = "logit"
    # logit: -r (the paper); log_sigmoid: -log sigmoid(r); hinge: relu(margin - r); reference: relu(target -
    # sigmoid(r)), the reference code's loss, kept for comparison (its gradient vanishes as the reward grows confident)
    weight: float = 1.0  # lambda: the reward loss is weight * objective
    margin: float = 2.0  # `hinge`
    target: float = 2.0  # `reference` (the reference uses 2, so its relu never clips)
    rollout_guidance: float = 1.0  # classifier-free guidance in the rollout and the gradient step (1 = off, as the
    # reference rolls out; set it to the inference guidance to train on the chain users sample)
    sft_weight: float = 1.0  # the flow-matching loss on the batch's latents is added with this weight (0 = off):
    # one combined loss, one backward, gradients clipped once per optimizer step

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ConfigError(f"prfl.weight={self.weight}: expected a positive number")
        if self.sft_weight < 0:
            raise ConfigError(f"prfl.sft_weight={self.sft_weight}: expected a non-negative number")


@dataclass
class EvalConfig:
    """Videos generated from fixed prompts and seeds before training and every `train.eval_every` steps (generator
    runs): the synthetic benchmark's held-out pairs, or the first samples of the validation (else training) list."""

    samples: int = 8  # videos per evaluation
    seed: int = 10_000  # noise seed of the first video (the i-th uses seed + i)
    batch_size: int = 8  # videos sampled together
    vae: str | None = None  # a Wan2.1 VAE (diffusers folder or Wan2.1_VAE.pth): also write each video as mp4
    fps: float = 16.0  # frame rate of the mp4s
    held_out_pairs: int = 64  # synthetic data: (prompt, seed) pairs of the before/after report (summary.json)

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size", "held_out_pairs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}={getattr(self, name)}: expected at least 1")


@dataclass
class TrainConfig:
    """Optimisation and the loop around it."""

    steps: int = 10  # optimizer steps in the run
    micro_batch_size: int = 1  # samples per data-parallel group per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5  # peak learning rate
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear warm-up from 0
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    grad_clip: float = 1.0  # max global grad norm, applied once per optimizer step (0 = off)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    log_every: int = 1  # optimizer steps between log lines
    eval_every: int = 0  # optimizer steps between evaluations (0 = never)
    save_every: int = 0  # optimizer steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept on disk
    export: bool = True  # write the loadable model folder (load_dit; a PAVRM folder) beside every checkpoint
    ema_decay: float = 0.0  # EMA of the trained weights, ema = decay * ema + (1 - decay) * w per step (0 = off)
    ema_start: int = 0  # optimizer steps during which the EMA copies the weights before it starts averaging

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: expected at least 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr}: expected a positive number")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay}: expected 0 (off) or a decay in (0, 1)")
        if self.ema_start < 0:
            raise ConfigError(f"train.ema_start={self.ema_start}: expected 0 or more steps")


@dataclass
class BootstrapConfig:
    """The synthetic benchmark's own models: a PRFL run trains `model.path` (the base generator) and
    `reward.path` (its PAVRM) with these recipes when the folders are missing (engine/synthetic/bootstrap.py)."""

    enabled: bool = False  # train whichever of model.path and reward.path is missing before the run
    # runners/sft.py recipes of the base generator, in order: each after the first starts from the one before
    base_recipes: list[str] = field(default_factory=lambda: ["configs/synthetic-base-smooth.yaml",
                                                             "configs/synthetic-base.yaml"])
    reward_recipe: str = "configs/pavrm-synthetic.yaml"  # runners/pavrm.py recipe (its trunk: the base generator)
    # key=value for the PAVRM trainer alone, after its recipe: PRFL's PAVRM learns from videos of varied looks,
    # which PRFL hacks less than a PAVRM that saw plain renders only (benchmarks/results/pavrm_shift.md)
    reward_overrides: list[str] = field(default_factory=lambda: ["data.synthetic_varied_looks=true"])
    ds_config: str = "ds_configs/z2.json"  # both trainers run on one rank
    overrides: list[str] = field(default_factory=list)  # key=value for both trainers, e.g. train.steps=2
    base_minutes: float = 4.5  # rough duration of the base recipes (2 CPU cores), printed before they start
    reward_minutes: float = 4.0  # the same for the PAVRM recipe (with its four validations)
    wait_minutes: float = 120.0  # how long ranks other than 0 wait for rank 0 to finish the bootstrap

    def __post_init__(self) -> None:
        if not self.base_recipes:
            raise ConfigError("bootstrap.base_recipes is empty: expected at least one runners/sft.py recipe")
        for key in ("overrides", "reward_overrides"):
            bad = [o for o in getattr(self, key) if "=" not in o]
            if bad:
                raise ConfigError(f"bootstrap.{key}: {bad[0]!r} is not key=value, e.g. train.steps=2")
        if self.wait_minutes <= 0:
            raise ConfigError(f"bootstrap.wait_minutes={self.wait_minutes}: expected a positive number")


@dataclass
class RunConfig:
    """One training or generation run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prfl: PRFLConfig = field(default_factory=PRFLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rgb_refl: "RGBReFLConfig" = field(default_factory=lambda: RGBReFLConfig())  # defined below
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    seed: int = 0  # base seed; each data-parallel group derives its own, shared by its sequence-parallel ranks
    output_dir: str = "runs/default"  # checkpoints, logs, the resolved config

    def __post_init__(self) -> None:
        if self.lora.rank and self.lora.dropout and self.memory.checkpointing:
            raise ConfigError(f"lora.dropout={self.lora.dropout} needs memory.checkpointing=false: checkpointed "
                              "blocks are recomputed in backward without replaying the dropout mask")
        if self.bootstrap.enabled and (self.model.path is None or self.reward.path is None):
            raise ConfigError("bootstrap.enabled=true needs model.path and reward.path: the folders it trains")


# ---------------------------------------------------------------------------------------------------------------
# The RGB ReFL baseline (engine/steps/rgb_refl.py): the pixel-space method PRFL is measured against


@dataclass
class RGBReFLConfig:
    """The RGB ReFL baseline's scorer: decode the one-step x0 prediction of step k with the Wan VAE and score the
    pixels with a frozen image (first frame) or video (all frames) reward model. Everything else, the stage k is
    drawn from included, is the `prfl` section's, so both methods train the same way (RGB ReFL as published draws k
    late in the chain: prfl.stage=last_quarter)."""

    frames: Literal["first", "all"] = "first"  # first: ContentV-style, decode latent frame 0 and score it with a
    # PickScore-class image model (the paper's baseline); all: decode every frame, score with a VideoAlign-class model
    vae_path: str | None = None  # the Wan2.1 VAE: a diffusers AutoencoderKLWan folder or Wan2.1_VAE.pth
    reward_path: str | None = None  # a folder written by the reward model's save_pretrained (transformers + head)
    random_weights: bool = False  # benchmarks: random VAE and reward model of the sizes below, no paths needed
    vae_config: dict[str, Any] = field(default_factory=dict)  # random_weights: AutoencoderKLWan arguments (default:
    # Wan2.1's VAE)
    reward_config: dict[str, Any] = field(default_factory=dict)  # random_weights: overrides of the reward model's
    # transformers config (default: CLIP ViT-H/14 for `first`, Qwen2-VL-2B for `all`)
    vae_checkpointing: bool = True  # recompute each latent frame's decoder pass in backward (diffusers has no
    # gradient checkpointing for this VAE); keeps the frame's input and the causal-convolution caches only
    vae_tiling: bool = False  # diffusers' spatial tiling instead (less memory without gradients, not with them)
    reward_checkpointing: bool = True  # transformers' per-layer activation checkpointing in the reward model
    fps: float = 16.0  # frame rate of the generated video (Wan2.1: 16), for the video model's frame sampling
    sample_fps: float = 2.0  # `all`: frames per second the video reward model reads (VideoAlign: 2)
    max_pixels: int = 200_704  # `all`: pixel budget of one frame for the video model (VideoAlign: 448 x 448)
    min_pixels: int = 100_352  # `all`: lower bound of that budget (VideoAlign)

    def __post_init__(self) -> None:
        if self.vae_checkpointing and self.vae_tiling:
            raise ConfigError("rgb_refl.vae_checkpointing and rgb_refl.vae_tiling exclude each other: tiles are "
                              "decoded by diffusers, frame checkpointing by the step; choose one")
        if self.sample_fps <= 0 or self.fps < self.sample_fps:
            raise ConfigError(f"rgb_refl.sample_fps={self.sample_fps}: expected a positive rate at most "
                              f"rgb_refl.fps={self.fps}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(f"rgb_refl.min_pixels={self.min_pixels}, max_pixels={self.max_pixels}: expected "
                              "0 < min_pixels <= max_pixels")
