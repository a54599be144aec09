"""The PAVRM: trunk from a generator, query-attention pooling, gradients, checkpoints, reference head files,
timestep sampling, losses, validation metrics and bad data."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import dit_inputs, randomized_dit
from engine.config_io import load_config
from engine.data.datasets import collate
from engine.data.format import write_list, write_sample
from engine.data.pairs import labelled_dataset, validation_dataset
from engine.errors import ConfigError, RewardCheckpointError
from engine.model.reward import RewardModel, RewardModelConfig
from engine.model.weights import load_dit, save_dit
from engine.steps.reward import INTERVALS, RewardStep, RewardValidation, reward_sigmas, roc_auc
from engine.train.randomness import SampleRandomness

HEAD = dict(num_heads=2, mlp_dims=(24, 12))


def reward_model(blocks: int = 2, seed: int = 0, **head) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(RewardModelConfig(blocks=blocks, **{**HEAD, **head}), randomized_dit("tiny", seed=seed))


def inputs(model: RewardModel, batch: int = 2) -> dict:
    x = dit_inputs(model.trunk.config, batch=batch, frames=3, height=4, width=6, text_tokens=7)
    return {"x": x["x"], "t": x["t"], "context": x["context"]}


@pytest.mark.parametrize("num_queries,residual,scale", [(1, True, 1.0), (3, False, 1.0), (2, True, 20.0)])
def test_pooling_is_multihead_attention_over_the_tokens(num_queries, residual, scale):
    """attention_scale s multiplies the attention logits: the same as nn.MultiheadAttention with W_q, b_q times s."""
    model = reward_model(num_queries=num_queries, query_residual=residual, attention_scale=scale)
    pool = model.pool
    with torch.no_grad():
        pool.multihead_attn.in_proj_bias.normal_()
        pool.multihead_attn.out_proj.bias.normal_()
    reference = copy.deepcopy(pool.multihead_attn)
    dim = model.trunk.config.dim
    with torch.no_grad():
        reference.in_proj_weight[:dim] *= scale
        reference.in_proj_bias[:dim] *= scale
    tokens = torch.randn(2, 37, dim)
    queries = pool.queries.expand(2, -1, -1)
    expected, _ = reference(queries, tokens, tokens, need_weights=False)
    expected = expected + queries if residual else expected
    torch.testing.assert_close(pool(tokens), expected, rtol=1e-5, atol=1e-6)


def test_gradient_reaches_the_input_latents_and_the_blocks_but_not_the_frozen_embeddings():
    model = reward_model()
    model.trainable_parameters([1])  # train block 1 only, and the head
    x = inputs(model)
    latents = x.pop("x").requires_grad_()
    model(latents, **x).sum().backward()
    assert latents.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if name.startswith(("pool.", "mlp.", "trunk.blocks.1.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # embeddings, time projection, block 0 and the trunk's unused output layer
            assert p.grad is None, name


def test_trunk_is_the_generators_first_k_blocks_and_blocks_after_k_are_not_built(tmp_path):
    generator = randomized_dit("tiny", seed=3, num_layers=4)
    save_dit(generator, tmp_path / "generator")
    model = RewardModel.from_generator(tmp_path / "generator", RewardModelConfig(blocks=2, **HEAD))
    assert len(model.trunk.blocks) == 2
    trunk_state = model.trunk.state_dict()
    for key, value in generator.state_dict().items():
        if key.startswith(("blocks.2.", "blocks.3.")):
            assert key not in trunk_state
        else:
            assert torch.equal(trunk_state[key], value), key
    x = inputs(model)
    torch.testing.assert_close(model.trunk(**x, return_features=[2])[0], generator(**x, return_features=[2])[0])


def test_features_from_several_blocks_are_averaged():
    model = reward_model(feature_blocks=[1, 2])
    x = inputs(model)
    features = model.trunk(**x, return_features=[1, 2])
    expected = model.mlp(model.pool((features[0] + features[1]) / 2).mean(dim=1))
    torch.testing.assert_close(model(**x), expected)


def test_save_and_load_round_trip_exactly(tmp_path):
    model = reward_model(num_queries=2)
    x = inputs(model)
    model.save_pretrained(tmp_path / "pavrm")
    loaded = RewardModel.from_pretrained(tmp_path / "pavrm")
    assert loaded.config == model.config
    assert torch.equal(loaded(**x), model(**x))
    trunk = load_dit(tmp_path / "pavrm" / "trunk")  # the trunk is an ordinary 2-block DiT checkpoint
    assert len(trunk.blocks) == 2


def test_a_head_file_that_does_not_match_fails_naming_the_key(tmp_path):
    model = reward_model()
    model.save_pretrained(tmp_path / "pavrm")
    config = json.loads((tmp_path / "pavrm" / "reward_config.json").read_text())
    (tmp_path / "pavrm" / "reward_config.json").write_text(json.dumps({**config, "mlp_dims": [24, 13]}))
    with pytest.raises(RewardCheckpointError, match=r"key mlp\.fc2\.(weight|bias) has shape \(12\S*\) in the file but \(13"):
        RewardModel.from_pretrained(tmp_path / "pavrm")


class ReferenceQueryAttention(nn.Module):
    """The reference code's pooling as it is written there: `queries` [1, Q, D] and an nn.MultiheadAttention,
    the raw query added to the attention output (return_type: query)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, 1, dim))
        self.multihead_attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, h):
        queries = self.queries.expand(h.shape[0], -1, -1)
        output, _ = self.multihead_attn(queries, h, h)
        return (output + queries).squeeze(1)


class ReferenceMLP(nn.Module):
    def __init__(self, dim: int, hidden: tuple[int, int]) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, hidden[0]), nn.Linear(hidden[0], hidden[1]), nn.Linear(hidden[1], 1)

    def forward(self, z):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(z))))).squeeze(-1)


def test_reference_head_files_give_the_logits_of_a_head_built_from_the_same_tensors(tmp_path):
    model = reward_model()
    dim = model.trunk.config.dim
    torch.manual_seed(5)
    attention, mlp = ReferenceQueryAttention(dim, 2), ReferenceMLP(dim, HEAD["mlp_dims"])
    torch.save(attention.state_dict(), tmp_path / "query_attention_step_100.ckpt")
    torch.save(mlp.state_dict(), tmp_path / "mlp_step_100.ckpt")
    model.load_reference_heads(tmp_path / "query_attention_step_100.ckpt", tmp_path / "mlp_step_100.ckpt")

    x = inputs(model)
    with torch.no_grad():
        features = model.trunk(**x, return_features=[2])[0]
        torch.testing.assert_close(model(**x), mlp(attention(features)), rtol=1e-5, atol=1e-6)

    torch.save({k: v for k, v in mlp.state_dict().items() if k != "fc3.bias"}, tmp_path / "broken.ckpt")
    with pytest.raises(RewardCheckpointError, match=r"missing keys \['mlp\.fc3\.bias'\]"):
        model.load_reference_heads(tmp_path / "query_attention_step_100.ckpt", tmp_path / "broken.ckpt")


def test_training_sigma_distributions():
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    config = load_config(None, []).reward
    assert torch.equal(reward_sigmas(u, config), u)
    shifted = reward_sigmas(u, load_config(None, ["reward.timesteps=shifted_index"]).reward)
    # The reference's uniform index over the shift-5 grid: 55.7% of draws at sigma >= 0.8, only 4.7% below 0.2.
    assert abs((shifted >= 0.8).float().mean().item() - 0.557) < 0.005
    assert abs((shifted < 0.2).float().mean().item() - 0.047) < 0.003
    fixed = reward_sigmas(u, load_config(None, ["reward.timesteps=fixed", "reward.fixed_sigmas=[0.3, 0.9]"]).reward)
    assert fixed.unique().tolist() == pytest.approx([0.3, 0.9])
    assert abs((fixed == fixed.min()).float().mean().item() - 0.5) < 0.01
    logit_normal = reward_sigmas(u, load_config(None, ["reward.timesteps=logit_normal"]).reward)
    assert 0 < logit_normal.min() and logit_normal.max() < 1 and abs(logit_normal.median().item() - 0.5) < 0.01


def synthetic_batch(loss: str, size: int = 4) -> dict:
    config = load_config(None, ["data.source=synthetic", f"reward.loss={loss}", "data.num_samples=400"])
    dataset = labelled_dataset(config, config.data, randomized_dit("tiny").config, seed=0)
    return collate([dataset[i] for i in range(size)])


def test_preference_pairs_set_each_bad_kind_against_the_smooth_video_of_its_prompt_and_round():
    kinds = ["smooth", "jitter", "static", "vanish", "wrong_way"]
    config = load_config(None, ["data.source=synthetic", "reward.loss=bt", "data.num_samples=480",
                                f"data.synthetic_motions=[{','.join(kinds)}]"])
    pairs = labelled_dataset(config, config.data, randomized_dit("tiny").config, seed=0)
    described = [(pairs.base.describe(p), pairs.base.describe(r)) for p, r in pairs.pairs]
    assert len(described) == 2 * 48 * 4  # two rounds of 48 prompts, four bad kinds each
    assert all(good[1] == "smooth" and good[0] == bad[0] for good, bad in described)
    assert sorted({bad[1] for _, bad in described}) == sorted(kinds[1:])
    rounds = {(p // 240, r // 240) for p, r in pairs.pairs}
    assert rounds == {(0, 0), (1, 1)}
    with pytest.raises(ConfigError, match=r"data.synthetic_motions=\['smooth', 'sideways'\]: expected motion kinds"):
        load_config(None, ["data.synthetic_motions=[smooth,sideways]"])


def test_varied_looks_are_for_training_samples_only():
    varied = load_config(None, ["data.source=synthetic", "data.synthetic_varied_looks=true", "data.num_samples=4"])
    assert labelled_dataset(varied, varied.data, randomized_dit("tiny").config, seed=0).varied_looks
    assert not validation_dataset(varied, randomized_dit("tiny").config).varied_looks  # the benchmark's own renders
    with pytest.raises(ConfigError, match="data.synthetic_varied_looks with data.source='random'"):
        load_config(None, ["data.synthetic_varied_looks=true"])


def test_ce_step_is_binary_cross_entropy_on_the_task_label():
    model = reward_model()
    batch = synthetic_batch("ce")
    batch["motion_quality"] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    config = load_config(None, []).reward
    loss, metrics = RewardStep(config)(model, batch, SampleRandomness(0, [0, 1, 2, 3]))
    rng = SampleRandomness(0, [0, 1, 2, 3])
    noise, sigma = rng.randn(*batch["latents"].shape[1:]), rng.rand().view(-1)
    logits = model((1 - sigma.view(-1, 1, 1, 1, 1)) * batch["latents"] + sigma.view(-1, 1, 1, 1, 1) * noise,
                   sigma * 1000, batch["context"])
    expected = -(batch["motion_quality"] * F.logsigmoid(logits) + (1 - batch["motion_quality"]) * F.logsigmoid(-logits))
    torch.testing.assert_close(loss, expected.mean())
    assert loss.dtype == torch.float32 and metrics["train/accuracy"].item() in (0, 0.25, 0.5, 0.75, 1)


def test_bt_step_scores_both_samples_of_a_pair_at_the_same_noise_and_sigma():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x, t, context, clip_fea=None, y=None):
            seen.append((x, t))
            return x.flatten(1).mean(dim=1)

    batch = synthetic_batch("bt", size=3)
    assert "rejected_latents" in batch
    loss, metrics = RewardStep(load_config(None, ["reward.loss=bt"]).reward)(Recorder(), batch,
                                                                             SampleRandomness(0, [0, 1, 2]))
    (x, t), = seen
    preferred, rejected = x.chunk(2)
    sigma = (t[:3] / 1000).view(-1, 1, 1, 1, 1)
    assert torch.equal(t[:3], t[3:])
    # x_t = (1 - sigma) x0 + sigma eps with the same eps on both sides of each pair
    noise_p = (preferred - (1 - sigma) * batch["latents"]) / sigma
    noise_r = (rejected - (1 - sigma) * batch["rejected_latents"]) / sigma
    torch.testing.assert_close(noise_p, noise_r, rtol=1e-4, atol=1e-4)
    r_p, r_r = x.flatten(1).mean(dim=1).chunk(2)
    torch.testing.assert_close(loss, -F.logsigmoid(r_p - r_r).mean())


def test_roc_auc_and_interval_accuracies():
    assert roc_auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1.0, 1.0, 0.0, 0.0])) == 1.0
    assert roc_auc(torch.tensor([0.1, 0.5, 0.5, 0.9]), torch.tensor([1.0, 1.0, 0.0, 0.0])) == pytest.approx(0.125)
    assert math.isnan(roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))
    config = load_config(None, [])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    logits = torch.tensor([[1.0, -1.0, 1.0, -1.0]] * 4 + [[1.0, 1.0, 1.0, -1.0]])
    metrics = RewardValidation(config, dataset=[]).summarize(logits, labels)
    assert metrics["val/accuracy [0.0,0.2]"] == 1.0 and metrics["val/accuracy (0.8,1.0]"] == 0.75
    assert metrics["val/accuracy mean"] == pytest.approx(0.95)
    assert len(INTERVALS) == 5


# ---------------------------------------------------------------------------------------------------------------
# Bad data


def write_dataset(root, metas: list[dict], channels: int = 16) -> str:
    paths = []
    for i, meta in enumerate(metas):
        tensors = {"latents": torch.randn(channels, 2, 4, 4), "context": torch.randn(3, 32)}
        paths.append(write_sample(root, f"s{i}", tensors, {"prompt": "p", **meta}))
    return str(write_list(root, "train", paths, torch.zeros(1, 32)))


def labelled(list_file: str, *overrides: str):
    config = load_config(None, ["data.source=list", f"data.list_file={list_file}", *overrides])
    return labelled_dataset(config, config.data, randomized_dit("tiny").config, seed=0)


def test_a_meta_missing_the_task_label_fails_naming_file_and_field(tmp_path):
    list_file = write_dataset(tmp_path, [{"motion_quality": 1}, {"physics_quality": 0}])
    with pytest.raises(ValueError, match=r"meta/s1\.json: missing field 'motion_quality'"):
        labelled(list_file)
    with pytest.raises(ValueError, match=r"meta/s0\.json: missing field 'physics_quality'"):
        labelled(list_file, "reward.task=physics_quality")


def test_bt_data_without_pairs_fails_naming_file_and_field(tmp_path):
    list_file = write_dataset(tmp_path, [{"motion_quality": 1}, {"motion_quality": 0}])
    with pytest.raises(ValueError, match=r"meta/s0\.json: missing field 'pair_id'"):
        labelled(list_file, "reward.loss=bt")


def test_bt_pairs_need_exactly_one_preferred_sample(tmp_path):
    good = write_dataset(tmp_path / "good", [{"pair_id": "a", "preferred": False}, {"pair_id": "a", "preferred": True}])
    pairs = labelled(good, "reward.loss=bt")
    assert pairs.pairs == [(1, 0)]
    bad = write_dataset(tmp_path / "bad", [{"pair_id": "a", "preferred": True}, {"pair_id": "a", "preferred": True}])
    with pytest.raises(ValueError, match=r"pair_id 'a': expected two samples, one with preferred=true"):
        labelled(bad, "reward.loss=bt")


def test_a_latent_with_the_wrong_channel_count_fails_naming_the_file(tmp_path):
    list_file = write_dataset(tmp_path, [{"motion_quality": 1}], channels=12)
    with pytest.raises(ValueError, match=r"meta/s0\.json: latent_shape=\[12, 2, 4, 4\]: the model expects 16"):
        labelled(list_file)


def test_reward_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"reward\.model: .*feature_blocks=\[3\]"):
        load_config(None, ["reward.model.blocks=2", "reward.model.feature_blocks=[3]"])
    with pytest.raises(ConfigError, match=r"reward\.trainable_blocks=\[8\]"):
        load_config(None, ["reward.trainable_blocks=[8]"])
    with pytest.raises(ConfigError, match="reward.timesteps='fixed' needs reward.fixed_sigmas"):
        load_config(None, ["reward.timesteps=fixed"])
    with pytest.raises(ConfigError, match="has no labels"):
        labelled_dataset(load_config(None, []), load_config(None, []).data, randomized_dit("tiny").config, 0)


def test_score_runner_writes_the_models_logits_per_sample_and_timestep(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    from engine.model.flow import add_noise

    model = reward_model()
    model.save_pretrained(tmp_path / "pavrm")
    list_file = write_dataset(tmp_path / "data", [{"motion_quality": 1}, {"motion_quality": 0}])
    done = subprocess.run([sys.executable, "runners/score.py", "--reward", str(tmp_path / "pavrm"), "--list", list_file,
                           "--timesteps", "0", "700", "--out", str(tmp_path / "scores.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [(Path(r["path"]).name, r["timestep"]) for r in rows] == [
        ("s0.safetensors", 0), ("s0.safetensors", 700), ("s1.safetensors", 0), ("s1.safetensors", 700)]
    sample = load_file(tmp_path / "data" / "samples" / "s1.safetensors")
    noise = torch.randn(sample["latents"].shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logit = model(add_noise(sample["latents"][None], noise[None], torch.tensor([0.7])), torch.tensor([700.0]),
                      sample["context"][None]).item()
    assert rows[3]["logit"] == pytest.approx(logit, abs=1e-5)
    assert rows[3]["probability"] == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-6)

    missing = subprocess.run([sys.executable, "runners/score.py", "--reward", str(tmp_path / "pavrm"), "--folder",
                              str(tmp_path), "--out", str(tmp_path / "x.csv")], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "holds no *.safetensors samples" in missing.stderr


def test_sigma_warmup_scales_the_training_sigmas_by_optimizer_step():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x, t, context, clip_fea=None, y=None):
            seen.append(t)
            return x.flatten(1).mean(dim=1)

    batch = synthetic_batch("ce")
    unscaled = RewardStep(load_config(None, []).reward)
    unscaled(Recorder(), batch, SampleRandomness(0, [0, 1, 2, 3], micro_batch=5))
    config = load_config(None, ["reward.sigma_warmup_steps=4"]).reward
    for optimizer_step in (0, 1, 3, 10):
        RewardStep(config)(Recorder(), batch, SampleRandomness(0, [0, 1, 2, 3], micro_batch=5, step=optimizer_step))
    full, *ramped = seen
    for t, scale in zip(ramped, (0.25, 0.5, 1.0, 1.0)):
        torch.testing.assert_close(t, full * scale)
    with pytest.raises(ConfigError, match="reward.sigma_warmup_steps=-1"):
        load_config(None, ["reward.sigma_warmup_steps=-1"])
