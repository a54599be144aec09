"""PAVRM, the process-aware video reward model: the generator's first K DiT blocks read a *noisy* latent at any
timestep; a learned-query attention pools their tokens and an MLP maps the pooled vector to one logit.

    reward = RewardModel.from_generator("Wan2.1-T2V-14B/", RewardModelConfig(blocks=8))   # blocks > K never loaded
    logits = reward(x_t, t, context)                     # [B] fp32, sigmoid(logit) = P(good)
    reward.save_pretrained("pavrm/");  RewardModel.from_pretrained("pavrm/")

Saved folder (written atomically):
    trunk/               the K blocks and the embeddings in Wan naming: `load_dit("pavrm/trunk")` loads it
    head.safetensors     pool.* and mlp.*
    reward_config.json   RewardModelConfig

Pooling follows the reference code (`nn.MultiheadAttention` with biases and an output projection, the raw query
added to its output when `query_residual`), written out so that under Ulysses sequence parallelism each rank
attends over its own token shard and the shards are combined exactly: the softmax numerator and denominator are
summed over the group (see `SequenceShards`), never a mean of per-rank poolings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.atomic import atomic_directory
from engine.errors import RewardCheckpointError
from engine.model.dit import DiT, DiTConfig, wide
from engine.model.weights import load_dit, save_dit_state

FROZEN_EMBEDDINGS = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "img_emb", "head")


@dataclass
class RewardModelConfig:
    """Architecture of a PAVRM (saved with it); the trunk's own architecture comes from the generator."""

    blocks: int = 8  # K: the generator's first K blocks form the trunk
    feature_blocks: list[int] = field(default_factory=list)  # 1-based blocks whose outputs are pooled (mean); [] = [K]
    num_queries: int = 1  # learned queries; their pooled vectors are averaged before the MLP
    num_heads: int = 8  # heads of the pooling attention
    dropout: float = 0.0  # on the pooling attention weights
    query_residual: bool = True  # add the raw query to the pooled vector (the reference's `return_type: query`)
    # Multiplier on the pooling's attention logits (the reference: 1). They grow with the trunk's feature
    # magnitude; where those are small (a tiny trunk: std ~0.3), the softmax starts uniform, i.e. as mean pooling,
    # which cannot single out one small object, and training stalls at the majority class. ~20 fixes that there.
    attention_scale: float = 1.0
    mlp_dims: tuple[int, int] = (1024, 512)  # hidden widths of the 3-layer MLP head

    def __post_init__(self) -> None:
        self.feature_blocks = list(self.feature_blocks) or [self.blocks]
        self.mlp_dims = tuple(self.mlp_dims)
        if self.blocks < 1:
            raise ValueError(f"reward model blocks={self.blocks}: expected at least 1")
        if any(not 1 <= b <= self.blocks for b in self.feature_blocks) or max(self.feature_blocks) != self.blocks:
            raise ValueError(f"reward model feature_blocks={self.feature_blocks}: expected 1-based block indices "
                             f"whose largest is blocks={self.blocks} (blocks after the deepest feature are wasted)")
        if self.num_queries < 1 or self.num_heads < 1 or not 0.0 <= self.dropout < 1.0 or self.attention_scale <= 0:
            raise ValueError(f"reward model num_queries={self.num_queries}, num_heads={self.num_heads}, "
                             f"dropout={self.dropout}, attention_scale={self.attention_scale}: expected >= 1, >= 1, "
                             f"a probability in [0, 1) and > 0")


# ---------------------------------------------------------------------------------------------------------------
# Head


class QueryAttentionPool(nn.Module):
    """Learned queries attend over the video tokens: `nn.MultiheadAttention`'s parameters and arithmetic."""

    def __init__(self, dim: int, num_queries: int, num_heads: int, dropout: float, query_residual: bool,
                 attention_scale: float = 1.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"reward model num_heads={num_heads} must divide the model dim {dim}")
        self.num_heads, self.dropout, self.query_residual = num_heads, dropout, query_residual
        self.attention_scale = attention_scale
        self.queries = nn.Parameter(torch.empty(num_queries, dim))
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        nn.init.xavier_uniform_(self.queries)

    def forward(self, tokens: torch.Tensor, shards=None) -> torch.Tensor:
        """tokens [B, S, D] (this rank's shard when `shards` is given) -> pooled [B, num_queries, D] fp32."""
        attn = self.multihead_attn
        dtype = attn.in_proj_weight.dtype
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        batch, heads = tokens.shape[0], self.num_heads

        def split(x):  # [B, L, D] -> [B, N, L, Dh]
            return wide(x.unflatten(-1, (heads, -1)).transpose(1, 2))

        q = split(F.linear(self.queries.to(dtype).expand(batch, -1, -1), w_q, b_q))
        k = split(F.linear(tokens.to(dtype), w_k, b_k))
        v = split(F.linear(tokens.to(dtype), w_v, b_v))
        scores = q @ k.transpose(-1, -2) * (self.attention_scale * q.shape[-1] ** -0.5)  # [B, N, Q, S]
        if shards is not None:
            scores = scores.masked_fill(~shards.valid_mask(tokens.shape[1], tokens.device), float("-inf"))
        # A shared shift keeps exp() in range; softmax does not depend on it, so it needs no gradient.
        peak = scores.detach().amax(dim=-1, keepdim=True)
        if shards is not None:
            peak = shards.max(peak)
        weights = torch.exp(scores - peak)
        numerator = F.dropout(weights, self.dropout, self.training) @ v  # [B, N, Q, Dh]
        denominator = weights.sum(dim=-1, keepdim=True)
        if shards is not None:
            numerator, denominator = shards.sum(numerator), shards.sum(denominator)
        pooled = (numerator / denominator).transpose(1, 2).flatten(2)  # [B, Q, D]
        pooled = wide(F.linear(pooled.to(dtype), attn.out_proj.weight, attn.out_proj.bias))
        return pooled + wide(self.queries) if self.query_residual else pooled


class RewardMLP(nn.Module):
    """dim -> hidden -> hidden -> 1 with ReLU; key names fc1/fc2/fc3 as in the reference's MLP files."""

    def __init__(self, dim: int, hidden: tuple[int, int]) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, hidden[0]), nn.Linear(hidden[0], hidden[1]), nn.Linear(hidden[1], 1)
        for layer in (self.fc1, self.fc2, self.fc3):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.fc1.weight.dtype
        return wide(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.to(dtype))))))).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Model


class RewardModel(nn.Module):
    """Trunk (a K-block DiT with frozen embeddings) + query-attention pooling + MLP -> one logit per sample."""

    def __init__(self, config: RewardModelConfig, trunk: DiT) -> None:
        super().__init__()
        if len(trunk.blocks) != config.blocks:
            raise ValueError(f"the trunk has {len(trunk.blocks)} blocks; the reward model config says {config.blocks}")
        self.config, self.trunk = config, trunk
        dim = trunk.config.dim
        self.pool = QueryAttentionPool(dim, config.num_queries, config.num_heads, config.dropout, config.query_residual,
                                       config.attention_scale)
        self.mlp = RewardMLP(dim, config.mlp_dims)
        self.pool.to(trunk.patch_embedding.weight.dtype)
        self.mlp.to(trunk.patch_embedding.weight.dtype)
        for name, module in trunk.named_children():  # the trunk's output layer is kept (so trunk/ loads as a DiT)
            if name in FROZEN_EMBEDDINGS:  # but never used; the embeddings stay the generator's
                module.requires_grad_(False)

    @classmethod
    def from_generator(cls, path, config: RewardModelConfig, dtype: torch.dtype | None = torch.float32,
                       **runtime) -> "RewardModel":
        """A fresh head on the first K blocks of a generator checkpoint (blocks after K are never read)."""
        return cls(config, load_dit(path, dtype=dtype, num_layers=config.blocks, **runtime))

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = torch.float32, **runtime) -> "RewardModel":
        """Load a folder written by `save_pretrained` (or the trainer's export), strictly."""
        path = Path(path)
        config_file = path / "reward_config.json"
        if not config_file.is_file():
            raise RewardCheckpointError(f"{path}: no reward_config.json; not a reward model folder")
        config = RewardModelConfig(**json.loads(config_file.read_text()))
        model = cls(config, load_dit(path / "trunk", dtype=dtype, **runtime))
        head = load_file(path / "head.safetensors")
        _load_strict(model, head, ("pool.", "mlp."), path / "head.safetensors")  # copied into the trunk's dtype
        return model

    def save_pretrained(self, directory) -> None:
        save_reward_state(self.state_dict(), self.config, self.trunk.config, directory)

    def load_reference_heads(self, query_attention_file, mlp_file) -> None:
        """Import the reference code's head files: torch-saved state dicts of its query attention (`queries`,
        `multihead_attn.*`) and its MLP (`fc1/fc2/fc3`). Loads strictly: a missing or mis-shaped key is an error."""
        state = {}
        for prefix, file in (("pool.", query_attention_file), ("mlp.", mlp_file)):
            loaded = torch.load(file, map_location="cpu", weights_only=True)
            state.update({prefix + k.removeprefix("module."): v for k, v in loaded.items()})
        if "pool.queries" in state:  # the reference stores the queries as [1, Q, D]
            state["pool.queries"] = state["pool.queries"].reshape(self.pool.queries.shape[0], -1)
        _load_strict(self, state, ("pool.", "mlp."), Path(query_attention_file).parent)

    def trainable_parameters(self, trunk_blocks: list[int] | None = None) -> tuple[list, list]:
        """Set requires_grad for training: the chosen trunk blocks (0-based; None = all) and the whole head.
        Returns (trunk parameters, head parameters) that train."""
        for index, block in enumerate(self.trunk.blocks):
            block.requires_grad_(trunk_blocks is None or index in trunk_blocks)
        return ([p for p in self.trunk.blocks.parameters() if p.requires_grad],
                [*self.pool.parameters(), *self.mlp.parameters()])

    def head(self, tokens: torch.Tensor, shards=None) -> torch.Tensor:
        """Logits [B] from trunk features [B, S, D]: pooling, the queries' mean, MLP."""
        return self.mlp(self.pool(tokens, shards).mean(dim=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B] (fp32) for noisy latents x [B, C, F, H, W] at timesteps t [B] in [0, 1000]."""
        features = self.trunk(x, t, context, clip_fea=clip_fea, y=y, return_features=self.config.feature_blocks)
        tokens = torch.stack(features).mean(dim=0) if len(features) > 1 else features[0]
        shards = self.trunk.sequence_shards
        logits = self.head(tokens, shards)
        # Under sequence parallelism the head runs on identical inputs on every rank of the group; its share of
        # the gradient is scaled so that the group's sum (what DeepSpeed reduces) is the true gradient.
        return shards.replicated(logits) if shards is not None else logits


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], prefixes: tuple[str, ...], source) -> None:
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RewardCheckpointError(f"{source}: missing keys {missing or 'none'}, unexpected keys "
                                    f"{unexpected or 'none'} for the configured reward head")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise RewardCheckpointError(f"{source}: key {key} has shape {tuple(tensor.shape)} in the file but "
                                        f"{tuple(expected[key].shape)} in the model")
    model.load_state_dict(state, strict=False)


def save_reward_state(state_dict: dict[str, torch.Tensor], config: RewardModelConfig, trunk_config: DiTConfig,
                      directory) -> None:
    """Write a reward model folder from a full state dict (the live model's, or a consolidated ZeRO checkpoint's)."""
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    trunk = {k.removeprefix("trunk."): v for k, v in state_dict.items() if k.startswith("trunk.")}
    head = {k: v for k, v in state_dict.items() if k.startswith(("pool.", "mlp."))}
    with atomic_directory(directory) as staging:
        save_dit_state(trunk, trunk_config, staging / "trunk")
        save_file(head, staging / "head.safetensors", metadata={"format": "pt"})
        (staging / "reward_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
