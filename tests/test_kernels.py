"""Each Triton kernel against its PyTorch reference, forward and every gradient, fp32 and bf16, on odd shapes;
and the whole DiT with triton kernels against torch ones. On CPU they run under TRITON_INTERPRET=1 (conftest).

Tolerances (relative to the reference's largest magnitude): fp32 1e-5; bf16 2e-2 for outputs and input gradients
(a few bf16 ulps: kernel and reference round at different points), 1e-5 for fp32 modulation gradients.
"""

import dataclasses
import math

import pytest
import torch

import engine.kernels.rows
from conftest import dit_inputs, randomized_dit
from engine.model.dit import DiT, DiTConfig, rope_for_grid
from engine.model.dit import apply_rope as dit_apply_rope
from engine.kernels.modulated_layer_norm import (
    ModulatedLayerNormFunction,
    ResidualModulatedLayerNormFunction,
    modulated_layer_norm,
    modulated_layer_norm_reference,
    residual_modulated_layer_norm,
    residual_modulated_layer_norm_reference,
)
from engine.kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference
from engine.kernels.rope import RopeFunction, apply_rope, apply_rope_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Odd shapes: a non-power-of-two odd hidden size, Wan 1.3B's and 14B's hidden sizes, and a power of two (a row that
# is all head, its tail tile masked off).
SHAPES = [(3, 7, 45), (2, 5, 1536), (1, 3, 5120), (2, 3, 64)]


def assert_close_relative(actual, expected, tol, name):
    err = ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12)).item()
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.fixture(params=["one-row-per-program", "several-rows-per-program"])
def reduction_grid(request, monkeypatch):
    """The backward kernels' column reductions on their usual grid (on a CPU: about 4 x 132 programs, one row each
    here) and on a 1-SM grid (4 programs), where each program loops over several rows and the last is short."""
    if request.param == "several-rows-per-program":
        monkeypatch.setattr(engine.kernels.rows, "DEFAULT_MULTIPROCESSORS", 1)


def run(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.usefixtures("reduction_grid")
def test_rms_norm_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    weight = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    ours = run(lambda a, w: rms_norm(a, w, 1e-6), [x, weight], grad)
    ref = run(lambda a, w: rms_norm_reference(a, w, 1e-6), [x, weight], grad)
    for name, a, b in zip(["y", "dx", "dweight"], ours, ref):
        assert a.dtype == b.dtype
        assert_close_relative(a, b, TOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_frame", [False, True], ids=["per-sample", "per-frame"])
@pytest.mark.usefixtures("reduction_grid")
def test_modulated_layer_norm_matches_reference(shape, dtype, per_frame):
    batch, tokens, dim = shape
    groups = tokens if per_frame else 1  # per frame: here one token a frame, the finest grouping
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    shift, scale = torch.randn(2, batch, groups, dim, generator=g)  # modulation stays fp32, as in the DiT
    grad = torch.randn(shape, generator=g).to(dtype)
    ours = run(lambda a, sh, sc: modulated_layer_norm(a, sh, sc, 1e-6), [x, shift, scale], grad)
    ref = run(lambda a, sh, sc: modulated_layer_norm_reference(a, sh.repeat_interleave(tokens // groups, 1),
                                                               sc.repeat_interleave(tokens // groups, 1), 1e-6),
              [x, shift, scale], grad)
    for name, a, b in zip(["y", "dx", "dshift", "dscale"], ours, ref):
        assert a.dtype == b.dtype
        tol = TOL[dtype] if name in ("y", "dx") else 1e-5
        assert_close_relative(a, b, tol, name)


def test_modulated_layer_norm_rejects_mismatched_modulation():
    with pytest.raises(ValueError, match="shift/scale must be"):
        modulated_layer_norm(torch.randn(1, 6, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8), 1e-6)


@pytest.mark.parametrize("preset", ["tiny", "tiny-i2v"])
def test_dit_with_triton_kernels_matches_torch(preset):
    torch_model = randomized_dit(preset, kernel_backend="torch").train()
    triton_model = DiT(dataclasses.replace(torch_model.config, kernel_backend="triton")).train()
    triton_model.load_state_dict(torch_model.state_dict())
    inputs = dit_inputs(torch_model.config, batch=1, frames=3)
    outputs = []
    for model in (torch_model, triton_model):
        out = model(**inputs)
        out.square().mean().backward()
        outputs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert_close_relative(outputs[1][0], outputs[0][0], 1e-5, "output")
    for name, grad in outputs[0][1].items():
        assert_close_relative(outputs[1][1][name], grad, 1e-4, name)


KERNEL_FUNCTIONS = {"rms_norm": RMSNormFunction, "modulated_layer_norm": ModulatedLayerNormFunction,
                    "residual_modulated_layer_norm": ResidualModulatedLayerNormFunction, "rope": RopeFunction}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of each Triton kernel's autograd function (which still runs)."""
    calls = dict.fromkeys(KERNEL_FUNCTIONS, 0)
    for name, function in KERNEL_FUNCTIONS.items():
        def counted(*args, _name=name, _apply=function.apply):
            calls[_name] += 1
            return _apply(*args)
        monkeypatch.setattr(function, "apply", counted)
    return calls


def test_auto_backend_runs_plain_pytorch_for_cpu_tensors_on_a_machine_with_cuda(monkeypatch, kernel_calls):
    """A GPU machine's CPU-side uses of the DiT (tests, sampling on --device cpu, the memory model) must not reach
    Triton, which cannot run CPU tensors there: `auto` decides per call from the tensor's device."""
    reference = randomized_dit("tiny-i2v", kernel_backend="torch")
    inputs = dit_inputs(reference.config, batch=1, frames=3)
    expected = reference(**inputs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    auto = DiT(dataclasses.replace(reference.config, kernel_backend="auto")).eval()
    auto.load_state_dict(reference.state_dict())
    torch.testing.assert_close(auto(**inputs), expected, rtol=0, atol=0)
    assert set(kernel_calls.values()) == {0}
    with pytest.raises(ValueError, match="kernel_backend='cuda'"):
        DiTConfig(kernel_backend="cuda")


def test_triton_backend_runs_every_kernel_whatever_the_device(kernel_calls):
    model = randomized_dit("tiny", kernel_backend="triton")
    model(**dit_inputs(model.config, batch=1, frames=3))
    assert all(kernel_calls.values()), kernel_calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grid, heads, head_dim", [((3, 3, 5), 2, 20), ((2, 4, 6), 12, 128)], ids=str)
def test_rope_matches_reference_on_a_sequence_slice(grid, heads, head_dim, dtype):
    """Wan's tables for the grid, then the rows of one Ulysses-style slice (tokens 7.. of the sequence)."""
    rope = rope_for_grid(grid, head_dim, torch.device("cpu"))
    start = 7
    tokens = math.prod(grid) - start
    rope = rope.slice(start, start + tokens)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, tokens, heads, head_dim, generator=g).to(dtype)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    ours = run(lambda a: apply_rope(a, rope.cos, rope.sin), [x], grad)
    ref = run(lambda a: apply_rope_reference(a, rope.cos, rope.sin), [x], grad)
    for name, a, b in zip(["y", "dx"], ours, ref):
        assert a.dtype == b.dtype
        assert_close_relative(a, b, TOL[dtype], name)
    # The reference is Wan's rotation: the DiT's own fp32 implementation gives the same numbers.
    torch.testing.assert_close(ref[0].float(), dit_apply_rope(x, rope).to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain-add"])
@pytest.mark.parametrize("per_frame", [False, True], ids=["per-sample", "per-frame"])
@pytest.mark.usefixtures("reduction_grid")
def test_residual_modulated_layer_norm_matches_reference(y_dtype, gated, per_frame):
    """x' = x + gate * y, h = LN(x') * (1 + scale) + shift; x (residual stream) fp32, y in the compute dtype."""
    batch, tokens, dim = 2, 15, 1536
    groups = 3 if per_frame else 1
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, tokens, dim, generator=g) * 2
    y = torch.randn(batch, tokens, dim, generator=g).to(y_dtype)
    gate, shift, scale = torch.randn(3, batch, groups, dim, generator=g)
    grads = torch.randn(2, batch, tokens, dim, generator=g)

    def run_both(fn, expand):
        leaves = [t.detach().clone().requires_grad_() for t in (x, y, gate, shift, scale)]
        mods = [expand(t) for t in leaves[2:]]
        x_new, h = fn(leaves[0], leaves[1], mods[0] if gated else None, mods[1], mods[2], 1e-6)
        (x_new * grads[0] + h * grads[1]).sum().backward()
        return {"x_new": x_new, "h": h, "dx": leaves[0].grad, "dy": leaves[1].grad, "dgate": leaves[2].grad,
                "dshift": leaves[3].grad, "dscale": leaves[4].grad}

    ours = run_both(residual_modulated_layer_norm, lambda t: t)
    ref = run_both(residual_modulated_layer_norm_reference, lambda t: t.repeat_interleave(tokens // groups, 1))
    for name in ours:
        if name == "dgate" and not gated:
            assert ours[name] is None and ref[name] is None
            continue
        tol = TOL[y_dtype] if name == "dy" else 1e-5
        assert_close_relative(ours[name], ref[name], tol, name)
