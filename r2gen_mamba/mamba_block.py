"""The Mamba block of R2Gen-Mamba's encoder, with the parameter layout of `mamba_ssm.Mamba` (v1.x).

R2Gen-Mamba encodes the visual patch tokens with ONE bare `mamba_ssm.Mamba(d_model=512, d_state=16, d_conv=4,
expand=2)` block (no norm, no residual). This module computes the same function with the same parameter names and
shapes, so official checkpoints load unchanged, and runs in two ways:

- the fused `mamba_ssm` / `causal_conv1d` CUDA kernels, when they are installed, `use_kernels=True` and the tensors
  are on CUDA (the optional `[cuda]` extra);
- otherwise a pure-PyTorch path built on `selective_scan_chunked`, a chunked scan that computes the exact recurrence
  with a few hundred vectorised steps instead of one Python step per token.

`selective_scan_ref` is the plain per-token recurrence, kept as the reference the fast scan is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The kernels are optional: a missing package, or a build that does not match the installed torch/CUDA, must not
# break the import of the model; the PyTorch path is then used.
try:
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
except (ImportError, OSError, RuntimeError):
    mamba_inner_fn, selective_scan_fn = None, None

try:
    from causal_conv1d import causal_conv1d_fn
except (ImportError, OSError, RuntimeError):
    causal_conv1d_fn = None

is_fast_path_available = all(fn is not None for fn in (mamba_inner_fn, selective_scan_fn, causal_conv1d_fn))


def _discretization_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, ...]:
    """Casts to fp32 (as the kernel computes; fp64 stays fp64) and applies `delta_bias` / softplus.
    Token-major: u, delta `[batch, seq_len, d_inner]`, delta_bias `[d_inner]`."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A, B, C


def _skip_and_gate(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """`y + D * u`, then `* silu(z)`, as the tail of `selective_scan_fn`. All `[batch, seq_len, d_inner]`."""
    if D is not None:
        y = torch.addcmul(y, u, D.to(y.dtype))
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The selective scan as the plain per-token recurrence (reference; slow).

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,  y_t = <C_t, h_t> + D * u_t,  y_t *= silu(z_t).

    Args:
        u: `[batch, d_inner, seq_len]` input.
        delta: `[batch, d_inner, seq_len]` time steps (before `delta_bias` / softplus).
        A: `[d_inner, d_state]` (negative) state matrix, diagonal per channel.
        B, C: `[batch, d_state, seq_len]` input-dependent input / output projections.
        D: `[d_inner]` skip weight. z: `[batch, d_inner, seq_len]` gate.
        delta_bias: `[d_inner]` added to `delta` before the optional softplus.

    Returns:
        `[batch, d_inner, seq_len]` in the dtype of `u`.
    """
    dtype = u.dtype
    # Token-major inside, as the shared helpers and the block's projections.
    u, delta, B, C = (t.transpose(1, 2) for t in (u, delta, B, C))
    u, delta, A, B, C = _discretization_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, seq_len, d_inner = u.shape
    state = u.new_zeros(batch, d_inner, A.shape[1])  # [batch, d_inner, d_state]
    outputs = []
    for t in range(seq_len):
        decay = torch.exp(delta[:, t, :, None] * A)  # [batch, d_inner, d_state]
        state = decay * state + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        outputs.append(torch.einsum("bdn,bn->bd", state, C[:, t]))
    y = torch.stack(outputs, dim=1)  # [batch, seq_len, d_inner]
    return _skip_and_gate(y, u, D, None if z is None else z.transpose(1, 2), dtype).transpose(1, 2)


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The selective scan of `selective_scan_ref`, computed chunk-parallel in pure PyTorch (differentiable).

    Arguments, shapes and result as `selective_scan_ref` (`mamba_ssm` layout, `[batch, channels, seq_len]`);
    `chunk_size` defaults to `default_chunk_size`. See `selective_scan_chunked_tokens` for the algorithm.
    """
    y = selective_scan_chunked_tokens(
        u.transpose(1, 2),
        delta.transpose(1, 2),
        A,
        B.transpose(1, 2),
        C.transpose(1, 2),
        D=D,
        z=None if z is None else z.transpose(1, 2),
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        chunk_size=chunk_size,
    )
    return y.transpose(1, 2)


# Elements of one step's state tensor [batch, num_chunks, d_inner, d_state] (2 MiB in fp32): small enough to stay in
# a CPU's L2/L3 cache, large enough that the per-op Python overhead does not dominate. Measured on CPU: at batch 1,
# 6272 tokens, d_inner 1024 (32 chunks) the scan took 0.40 s vs 0.49 s with num_chunks = sqrt(seq_len) (one thread).
_STEP_ELEMENTS = 2**19


def default_chunk_size(seq_len: int, batch_size: int = 1, d_inner: int = 1, d_state: int = 1) -> int:
    """About sqrt(seq_len) chunks of about sqrt(seq_len) tokens (fewest Python steps, ~2 * chunk_size +
    num_chunks), but no more chunks than keep one step's state within `_STEP_ELEMENTS`."""
    num_chunks = min(math.ceil(math.sqrt(seq_len)), max(1, _STEP_ELEMENTS // (batch_size * d_inner * d_state)))
    return math.ceil(seq_len / num_chunks)


def selective_scan_chunked_tokens(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`selective_scan_chunked` on token-major tensors, the layout the block's projections produce (no transposes).

    The sequence is cut into `num_chunks` chunks of `chunk_size` tokens, and the recurrence runs over the positions
    of all chunks at once:

    1. each chunk's end state, as if it started from zero (`chunk_size` vectorised steps over all chunks);
    2. the true start state of every chunk, carried across chunks with the chunk's total decay
       `exp(A * sum(delta))` (`num_chunks` small steps);
    3. the recurrence again inside all chunks in parallel, now from the true start states, reading out `y`.

    So a sequence of L tokens takes about 3*sqrt(L) Python steps instead of L, and work stays linear in L. Every
    decay is `exp(A * delta)` or `exp(A * sum(delta))` with `A < 0` and `delta >= 0`: a factor in (0, 1], never the
    exponential of a large positive number, so no chunk length can overflow.

    Args:
        u, delta: `[batch, seq_len, d_inner]`. A: `[d_inner, d_state]`. B, C: `[batch, seq_len, d_state]`.
        D: `[d_inner]`. z: `[batch, seq_len, d_inner]`. delta_bias: `[d_inner]`.

    Returns:
        `[batch, seq_len, d_inner]` in the dtype of `u`.
    """
    dtype = u.dtype
    u, delta, A, B, C = _discretization_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, seq_len, d_inner = u.shape
    d_state = A.shape[1]
    chunk_size = chunk_size or default_chunk_size(seq_len, batch, d_inner, d_state)
    num_chunks = math.ceil(seq_len / chunk_size)
    pad = num_chunks * chunk_size - seq_len

    def chunked(x: torch.Tensor) -> torch.Tensor:
        # [batch, seq_len, channels] -> [batch, num_chunks, chunk_size, channels] (a view unless padded). Zero padding
        # at the end is harmless: delta = 0 keeps the state and adds nothing; padded outputs are dropped.
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(batch, num_chunks, chunk_size, x.shape[-1])

    delta_chunks = chunked(delta)  # [batch, num_chunks, chunk_size, d_inner]
    # Per-position slices as `unbind` views, not `x[:, :, t]` in the loops: the backward of `unbind` stacks the
    # gradients once, while every indexing op's backward fills a zero tensor of the full size (at batch 16, 98
    # tokens: 147 fills of 3.2 MB; the block's forward+backward went from 0.356 to 0.332 s).
    delta_steps = delta_chunks.unbind(2)  # chunk_size x [batch, num_chunks, d_inner]
    delta_u_steps = chunked(delta * u).unbind(2)  # chunk_size x [batch, num_chunks, d_inner]
    B_steps = chunked(B).unbind(2)  # chunk_size x [batch, num_chunks, d_state]
    C_steps = chunked(C).unbind(2)  # chunk_size x [batch, num_chunks, d_state]

    # Autograd keeps every step's decay for the backward pass anyway, so steps 1 and 3 share them then (half the
    # exps and no second copy); without autograd they are recomputed, which keeps inference memory at one step's.
    keep_decays = torch.is_grad_enabled()
    decays = []

    def step(state: torch.Tensor, t: int) -> torch.Tensor:
        if t < len(decays):
            decay = decays[t]
        else:
            decay = torch.exp(delta_steps[t][..., None] * A)  # [batch, num_chunks, d_inner, d_state]
            if keep_decays:
                decays.append(decay)
        # decay * state + delta * u * B, with the multiply-add fused (the scan is memory-bound on CPU).
        return torch.addcmul(delta_u_steps[t][..., None] * B_steps[t][..., None, :], decay, state)

    # 1. End state of each chunk from a zero start.
    state = u.new_zeros(batch, num_chunks, d_inner, d_state)
    for t in range(chunk_size):
        state = step(state, t)
    local_end = state  # [batch, num_chunks, d_inner, d_state]

    # 2. True start state of each chunk: start_{c+1} = exp(A * sum_c(delta)) * start_c + local_end_c.
    chunk_decay = torch.exp(delta_chunks.sum(2)[..., None] * A)  # [batch, num_chunks, d_inner, d_state]
    starts = [u.new_zeros(batch, d_inner, d_state)]
    for c in range(num_chunks - 1):
        starts.append(torch.addcmul(local_end[:, c], chunk_decay[:, c], starts[-1]))
    state = torch.stack(starts, dim=1)  # [batch, num_chunks, d_inner, d_state]

    # 3. The exact recurrence inside every chunk from its true start, reading out y_t = <C_t, h_t>.
    outputs = []
    for t in range(chunk_size):
        state = step(state, t)
        outputs.append(torch.einsum("bcdn,bcn->bcd", state, C_steps[t]))
    y = torch.stack(outputs, dim=2).reshape(batch, num_chunks * chunk_size, d_inner)[:, :seq_len]
    return _skip_and_gate(y, u, D, z, dtype)


class R2GenMambaBlock(nn.Module):
    """One Mamba block (selective SSM), parameter-compatible with `mamba_ssm.Mamba` v1.x.

    Parameters (names and shapes as `mamba_ssm.Mamba`; `d_inner = expand * d_model`,
    `dt_rank = ceil(d_model / 16)` for "auto"): `in_proj` [2*d_inner, d_model], `conv1d` depthwise
    [d_inner, 1, d_conv] (+ bias), `x_proj` [dt_rank + 2*d_state, d_inner], `dt_proj` [d_inner, dt_rank] + bias,
    `A_log` [d_inner, d_state], `D` [d_inner], `out_proj` [d_model, d_inner]. The paper's block (d_model 512) has
    1,694,720 parameters.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_kernels: bool = True,
    ) -> None:
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.dt_min, self.dt_max, self.dt_init = dt_min, dt_max, dt_init
        self.dt_scale, self.dt_init_floor = dt_scale, dt_init_floor
        self.use_kernels = use_kernels

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        # Depthwise and causal: padded by d_conv - 1 on both sides, the output is cut back to seq_len.
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        # As in mamba_ssm: optimizers should not decay these (the training recipe reads this flag).
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """`mamba_ssm.Mamba`'s initialisation of the SSM parameters (the linears keep PyTorch's default init).

        A_log = log(1..d_state) per channel (S4D-real), D = 1, dt_proj.weight ~ U(+-dt_rank**-0.5 * dt_scale)
        (or that constant), and dt_proj.bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored.
        """
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        dt_init_std = self.dt_rank**-0.5 * self.dt_scale
        if self.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        log_dt = torch.rand(self.d_inner) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min)
        dt = torch.exp(log_dt).clamp(min=self.dt_init_floor)
        # softplus^-1(dt) = dt + log(1 - exp(-dt)), written with expm1 to stay accurate for small dt.
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _use_kernel_path(self, hidden_states: torch.Tensor) -> bool:
        on_cuda = hidden_states.is_cuda and self.in_proj.weight.is_cuda
        if self.use_kernels and on_cuda and is_fast_path_available:
            logger.info_once("R2GenMambaBlock: using the mamba_ssm / causal_conv1d CUDA kernels")
            return True
        if self.use_kernels and on_cuda:
            logger.warning_once(
                "R2GenMambaBlock: the mamba_ssm / causal_conv1d CUDA kernels are not installed; using the "
                "pure-PyTorch selective scan (same result, slower). Install them with `pip install r2gen-mamba[cuda]`."
            )
        else:
            logger.info_once("R2GenMambaBlock: using the pure-PyTorch chunked selective scan")
        return False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Args: hidden_states `[batch, seq_len, d_model]`. Returns `[batch, seq_len, d_model]`."""
        seq_len = hidden_states.shape[1]
        A = -torch.exp(self.A_log.float())  # [d_inner, d_state]
        xz = self.in_proj(hidden_states)  # [batch, seq_len, 2*d_inner]

        if self._use_kernel_path(hidden_states):
            # One fused kernel for conv -> x_proj -> dt_proj -> scan -> gate -> out_proj, as mamba_ssm.Mamba does.
            return mamba_inner_fn(
                xz.transpose(1, 2),  # the kernel's layout, [batch, 2*d_inner, seq_len]
                self.conv1d.weight,
                self.conv1d.bias,
                self.x_proj.weight,
                self.dt_proj.weight,
                self.out_proj.weight,
                self.out_proj.bias,
                A,
                None,  # B and C are input-dependent: computed inside from x_proj
                None,
                self.D.float(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            )

        x, z = xz.chunk(2, dim=-1)  # each [batch, seq_len, d_inner]
        # Causal depthwise conv over the sequence: keep the first seq_len outputs of the both-sides-padded conv.
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :seq_len]).transpose(1, 2)  # [batch, seq_len, d_inner]
        x_dbl = self.x_proj(x)  # [batch, seq_len, dt_rank + 2*d_state]
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj without its bias: the bias is added inside the softplus, as the kernel's delta_bias.
        dt = dt @ self.dt_proj.weight.t()  # [batch, seq_len, d_inner]
        y = selective_scan_chunked_tokens(
            x,
            dt,
            A,
            B,
            C,
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )  # [batch, seq_len, d_inner]
        return self.out_proj(y)
