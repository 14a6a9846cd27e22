"""The Mamba block: mamba_ssm.Mamba's parameter layout and init, the fast scan against the per-token recurrence, the
PyTorch path against transformers' MambaMixer, and (with CUDA + mamba_ssm) the kernel path against the PyTorch path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer

from r2gen_mamba.mamba_block import R2GenMambaBlock, selective_scan_chunked, selective_scan_ref

MAMBA_SHAPES = {
    "in_proj.weight": (2048, 512),
    "conv1d.weight": (1024, 1, 4),
    "conv1d.bias": (1024,),
    "x_proj.weight": (64, 1024),
    "dt_proj.weight": (1024, 32),
    "dt_proj.bias": (1024,),
    "A_log": (1024, 16),
    "D": (1024,),
    "out_proj.weight": (512, 1024),
}


def test_paper_block_has_mamba_ssm_parameter_layout():
    block = R2GenMambaBlock(512, d_state=16, d_conv=4, expand=2)
    shapes = {name: tuple(p.shape) for name, p in block.named_parameters()}
    assert shapes == MAMBA_SHAPES
    assert block.dt_rank == 32 and block.d_inner == 1024
    assert sum(p.numel() for p in block.parameters()) == 1_694_720
    assert block.A_log._no_weight_decay and block.D._no_weight_decay


def test_bias_options_add_the_mamba_ssm_biases():
    block = R2GenMambaBlock(64, conv_bias=False, bias=True, dt_rank=3)
    names = {name for name, _ in block.named_parameters()}
    assert {"in_proj.bias", "out_proj.bias"} <= names and "conv1d.bias" not in names
    assert block.dt_proj.weight.shape == (128, 3) and block.x_proj.weight.shape == (3 + 32, 128)


def test_invalid_init_arguments_raise():
    with pytest.raises(ValueError, match="dt_init"):
        R2GenMambaBlock(32, dt_init="uniform")
    with pytest.raises(ValueError, match="dt_min"):
        R2GenMambaBlock(32, dt_min=0.2, dt_max=0.1)


@pytest.mark.parametrize("dt_init", ["random", "constant"])
def test_reset_parameters_gives_the_s4d_init(dt_init):
    block = R2GenMambaBlock(64, d_state=8, dt_init=dt_init, dt_min=0.002, dt_max=0.05, dt_scale=2.0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    block.reset_parameters()
    expected_A_log = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(128, 8)
    torch.testing.assert_close(block.A_log, expected_A_log, rtol=0, atol=0)
    assert torch.equal(block.D, torch.ones(128))
    bound = block.dt_rank**-0.5 * 2.0
    if dt_init == "constant":
        assert torch.allclose(block.dt_proj.weight, torch.full_like(block.dt_proj.weight, bound))
    else:
        assert block.dt_proj.weight.abs().max() <= bound
        assert block.dt_proj.weight.std() > bound / 4  # spread over the range, not constant
    # The bias is softplus^-1 of dt: softplus(bias) is back in [dt_min, dt_max], log-uniformly spread.
    dt = F.softplus(block.dt_proj.bias.double())
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert dt.log().std() > 0.5  # log-uniform over log(25) ~ 3.2 has std ~0.93


def test_dt_floor_applies():
    block = R2GenMambaBlock(32, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3)
    torch.testing.assert_close(F.softplus(block.dt_proj.bias), torch.full((64,), 1e-3), rtol=1e-4, atol=0)


def _scan_inputs(batch: int, d_inner: int, d_state: int, seq_len: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    return dict(
        u=randn(batch, d_inner, seq_len),
        delta=randn(batch, d_inner, seq_len, scale=0.5),
        # Trained-looking A: S4D-real magnitudes 1..d_state, perturbed.
        A=-(torch.arange(1, d_state + 1, dtype=torch.float64) * torch.exp(randn(d_inner, d_state, scale=0.3))).to(
            dtype
        ),
        B=randn(batch, d_state, seq_len),
        C=randn(batch, d_state, seq_len),
        D=randn(d_inner),
        z=randn(batch, d_inner, seq_len),
        delta_bias=torch.log(torch.expm1(torch.full((d_inner,), 0.05, dtype=torch.float64))).to(dtype)
        + randn(d_inner),
    )


@pytest.mark.parametrize(
    "seq_len,chunk_size",
    [(1, None), (2, None), (7, None), (16, 4), (37, None), (37, 5), (37, 64), (100, None), (100, 1), (130, 16)],
)
def test_chunked_scan_matches_the_recurrence_forward_and_backward(seq_len, chunk_size):
    inputs = _scan_inputs(2, 6, 4, seq_len)
    grads = {}
    outputs = {}
    for name, scan in (("ref", selective_scan_ref), ("chunked", selective_scan_chunked)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        kwargs = {"chunk_size": chunk_size} if name == "chunked" else {}
        y = scan(**leaves, delta_softplus=True, **kwargs)
        # A fixed random cotangent so that every output position drives the gradients.
        cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        (y * cotangent).sum().backward()
        outputs[name] = y.detach()
        grads[name] = {k: v.grad for k, v in leaves.items()}
    assert outputs["ref"].shape == (2, 6, seq_len)
    torch.testing.assert_close(outputs["chunked"], outputs["ref"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference recomputes the decays instead of keeping them: same result
        y_no_grad = selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=chunk_size)
    torch.testing.assert_close(y_no_grad, outputs["ref"], rtol=1e-5, atol=1e-5)
    for key in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
        torch.testing.assert_close(grads["chunked"][key], grads["ref"][key], rtol=1e-5, atol=1e-5, msg=key)


def test_chunked_scan_without_optional_inputs():
    inputs = _scan_inputs(1, 4, 3, 29)
    inputs["delta"] = inputs["delta"].abs()  # no softplus: time steps given directly, >= 0 as in a real model
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")]
    torch.testing.assert_close(selective_scan_chunked(*args), selective_scan_ref(*args), rtol=1e-5, atol=1e-5)


def test_chunked_scan_is_stable_for_large_steps_and_long_sequences():
    # Large time steps make exp(delta * A) underflow to 0 and cumulative log-decays reach ~ -1e5: a scan that
    # exponentiated cumulative sums (exp(-cumsum)) would overflow to inf here.
    inputs = _scan_inputs(1, 8, 4, 1000, seed=3)
    inputs["delta"] = inputs["delta"].abs() * 40
    y_ref = selective_scan_ref(**inputs, delta_softplus=True)
    y = selective_scan_chunked(**inputs, delta_softplus=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_scans_keep_float64_and_return_the_input_dtype():
    inputs64 = _scan_inputs(1, 3, 2, 11, dtype=torch.float64)
    y64 = selective_scan_chunked(**inputs64, delta_softplus=True)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, selective_scan_ref(**inputs64, delta_softplus=True), rtol=1e-12, atol=1e-12)
    inputs16 = {k: v.to(torch.bfloat16) for k, v in _scan_inputs(1, 3, 2, 11).items()}
    assert selective_scan_chunked(**inputs16).dtype == torch.bfloat16


def _mixer_with_weights_of(block: R2GenMambaBlock) -> MambaMixer:
    config = MambaConfig(
        hidden_size=block.d_model,
        state_size=block.d_state,
        conv_kernel=block.d_conv,
        expand=block.expand,
        time_step_rank=block.dt_rank,
        use_bias=block.in_proj.bias is not None,
        use_conv_bias=block.conv1d.bias is not None,
        hidden_act="silu",
        num_hidden_layers=1,
    )
    mixer = MambaMixer(config, layer_idx=0)
    mixer.load_state_dict(block.state_dict(), strict=True)
    return mixer.eval()


def _assert_same_outputs_and_grads(
    module: torch.nn.Module, other: torch.nn.Module, hidden: torch.Tensor, rtol: float, atol: float, param_rtol: float
) -> torch.Tensor:
    """Both modules (same parameter names) give the same output, input gradient and parameter gradients on
    `hidden`; returns `module`'s output."""
    hidden_a = hidden.clone().requires_grad_(True)
    hidden_b = hidden.clone().requires_grad_(True)
    out, expected = module(hidden_a), other(hidden_b)
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    cotangent = torch.randn_like(out)
    (out * cotangent).sum().backward()
    (expected * cotangent).sum().backward()
    torch.testing.assert_close(hidden_a.grad, hidden_b.grad, rtol=rtol, atol=atol)
    other_params = dict(other.named_parameters())
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, other_params[name].grad, rtol=param_rtol, atol=atol, msg=name)
    return out


@pytest.mark.parametrize("d_model,d_state,seq_len,bias", [(32, 4, 1, False), (32, 4, 23, False), (48, 16, 70, True)])
def test_block_matches_transformers_mamba_mixer(d_model, d_state, seq_len, bias):
    block = R2GenMambaBlock(d_model, d_state=d_state, bias=bias).eval()
    with torch.no_grad():  # move away from the init so that every parameter matters
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mixer = _mixer_with_weights_of(block)
    hidden = torch.randn(3, seq_len, d_model)
    out = _assert_same_outputs_and_grads(block, mixer, hidden, rtol=1e-5, atol=1e-5, param_rtol=1e-4)
    assert out.shape == (3, seq_len, d_model)


def test_block_is_causal():
    block = R2GenMambaBlock(32, d_state=4).eval()
    hidden = torch.randn(1, 20, 32)
    changed = hidden.clone()
    changed[:, 12:] += 1.0
    with torch.no_grad():
        a, b = block(hidden), block(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_cpu_tensors_use_the_pytorch_path():
    block = R2GenMambaBlock(32, d_state=4, use_kernels=True)
    assert not block._use_kernel_path(torch.zeros(1, 3, 32))


@pytest.mark.cuda
@pytest.mark.parametrize("seq_len", [1, 98, 300])
def test_kernel_path_matches_pytorch_path(seq_len):
    pytest.importorskip("mamba_ssm")
    pytest.importorskip("causal_conv1d")
    from r2gen_mamba import mamba_block

    assert mamba_block.is_fast_path_available, "mamba_ssm imports but the kernels failed to load"
    torch.manual_seed(0)
    kernel_block = R2GenMambaBlock(64, d_state=16, use_kernels=True).cuda()
    torch_block = R2GenMambaBlock(64, d_state=16, use_kernels=False).cuda()
    torch_block.load_state_dict(kernel_block.state_dict())
    assert kernel_block._use_kernel_path(torch.zeros(1, 1, 64, device="cuda"))
    hidden = torch.randn(2, seq_len, 64, device="cuda")
    _assert_same_outputs_and_grads(kernel_block, torch_block, hidden, rtol=6e-4, atol=2e-3, param_rtol=6e-4)


def test_dt_rank_auto_is_ceil_d_model_over_16():
    assert R2GenMambaBlock(40, d_state=2).dt_rank == math.ceil(40 / 16) == 3
