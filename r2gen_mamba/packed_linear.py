"""CPU inference linears on oneDNN with weights packed once per `generate()` call.

A decode step multiplies a few rows (studies x beams) by every decoder weight matrix, so it is bound by how fast the
weights stream from memory. On the 2-core benchmark machine `F.linear` (MKL sgemm) streams them at about 10 GB/s at 12
rows, while the oneDNN kernel that PyTorch's inductor uses (`torch.ops.mkldnn._linear_pointwise` on a weight reordered
once by `_reorder_linear_weight`) reaches 15-26 GB/s; it is 1.15-1.8x faster from 1 to 2,832 rows (numbers in
`benchmarks/README` / the project README).

`R2GenLinear` is a plain `nn.Linear` (same parameters, same state dict, same init) that takes the packed path only
while a packed copy is attached to it and the call is packable: CPU, float32 input and weight, no autograd graph being
recorded. Copies are attached by `packed_linears(...)` for the duration of a `with` block and dropped at its end, so a
copy never outlives the weights it was made from (in-place updates through `.data` do not bump a tensor's version, so
a cache keyed on versions could go stale silently). Everything else, training included, runs `F.linear`.

Set the environment variable `R2GEN_MAMBA_PACKED_LINEAR=0` (or call `set_packed_linear_enabled(False)`) to turn the
packed path off.

Opt-in reduced precision: `packed_linears(..., dtype=torch.bfloat16)` packs bfloat16 copies instead (half the bytes to
stream). Each packed linear then rounds its input to bfloat16, multiplies with fp32 accumulation and returns float32;
everything else stays float32. The reports can differ from float32 decoding, so it is never the default.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

PACKED_DTYPES = (torch.float32, torch.bfloat16)
_enabled = os.environ.get("R2GEN_MAMBA_PACKED_LINEAR", "1").strip().lower() not in ("0", "false", "no", "off")
_available: bool | None = None


def set_packed_linear_enabled(enabled: bool) -> bool:
    """Turn the packed CPU path on or off for later `packed_linears` blocks; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def packed_linear_available() -> bool:
    """Whether this PyTorch build runs the oneDNN packed linear correctly (probed once, on a 2x3 example)."""
    global _available
    if _available is None:
        try:
            weight = torch.arange(6, dtype=torch.float32).view(2, 3)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), packed, None, "none", [], "")
            _available = bool(torch.backends.mkldnn.is_available() and torch.equal(out, weight.sum(1).view(1, 2)))
        except (AttributeError, RuntimeError, NotImplementedError):
            _available = False
    return _available


def check_packed_dtype(dtype: torch.dtype) -> None:
    """Raise a `ValueError` unless `dtype` can be packed here (float32; bfloat16 where oneDNN runs it)."""
    if dtype not in PACKED_DTYPES:
        raise ValueError(f"packed CPU weights can be torch.float32 or torch.bfloat16, got {dtype}")
    if dtype == torch.bfloat16 and not (packed_linear_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        raise ValueError("bfloat16 packed weights need a CPU on which oneDNN runs bfloat16 (e.g. AVX512-BF16 or AMX)")


def pack_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A oneDNN-packed `dtype` copy of a `[out, in]` CPU weight (an opaque tensor: no storage, not copyable)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), None)


def packed_linear(
    inputs: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False
) -> torch.Tensor:
    """`inputs @ weight.T + bias` (then ReLU when `relu`) with a weight from `pack_weight` and a detached bias of the
    packed dtype (as `packed_linears` and `FusedPackedLinear` keep them). A bfloat16 weight takes the inputs rounded
    to bfloat16 and returns the inputs' dtype (`.to` is a no-op when the dtypes match)."""
    low = inputs.to(packed_weight.dtype)
    out = torch.ops.mkldnn._linear_pointwise(low, packed_weight, bias, "relu" if relu else "none", [], "")
    return out.to(inputs.dtype)


def can_use_packed(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """CPU float32 without an autograd graph or autocast, oneDNN enabled: the case a packed weight is valid for."""
    grad = torch.is_grad_enabled() and (
        inputs.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return (
        inputs.device.type == "cpu"
        and inputs.dtype == torch.float32
        and weight.dtype == torch.float32
        and not grad
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.enabled
    )


def _dropped() -> None:
    return None


class PackedWeight:
    """A packed weight and its bias in the packed dtype, read together. Copying or pickling it (e.g. `deepcopy` or
    `torch.save` of a model inside a `packed_linears` block) gives None: the opaque oneDNN tensor cannot be copied,
    and the copy is not needed outside the block."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def __reduce__(self):
        return (_dropped, ())


class R2GenLinear(nn.Linear):
    """`nn.Linear` that uses a packed oneDNN copy of its weight while one is attached (see the module docstring)."""

    packed: PackedWeight | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        packed = self.packed  # read once: another thread's block may end meanwhile
        if packed is not None and can_use_packed(inputs, self.weight, self.bias):
            return packed_linear(inputs, packed.weight, packed.bias)
        return F.linear(inputs, self.weight, self.bias)


@contextlib.contextmanager
def packed_linears(
    modules: Iterable[nn.Module], skip: Iterable[nn.Module] = (), dtype: torch.dtype = torch.float32
) -> Iterator[bool]:
    """Attach packed `dtype` weights to every `R2GenLinear` under `modules`, except those in `skip` (run through a
    fused copy instead), for the block; yields whether packing applies.

    Re-entrant: inside an outer block the linears keep the outer block's copies (and dtype), which the outer block
    drops. Blocks of different dtypes on one model in concurrent threads are not supported (the inner one runs on
    the outer one's copies)."""
    check_packed_dtype(dtype)
    skipped = {id(m) for m in skip}
    linears = [m for module in modules for m in module.modules() if isinstance(m, R2GenLinear)]
    linears = [m for m in linears if id(m) not in skipped]
    fresh = [m for m in linears if m.packed is None and m.weight.device.type == "cpu"]
    fresh = [m for m in fresh if m.weight.dtype == torch.float32] if _enabled and packed_linear_available() else []
    try:
        for module in fresh:
            bias = None if module.bias is None else module.bias.detach().to(dtype)
            module.packed = PackedWeight(pack_weight(module.weight, dtype), bias)
        yield any(m.packed is not None for m in linears)
    finally:
        for module in fresh:
            module.packed = None


class FusedPackedLinear:
    """Several linears that read the same input, as one packed matmul: `[..., in]` -> `[..., sum(out)]`, output
    blocks in the order given. Built inside a `packed_linears` block, from `R2GenLinear`s with biases. Like
    `PackedWeight`, a copy or pickle of it is None."""

    def __init__(self, linears: Iterable[nn.Linear], dtype: torch.dtype = torch.float32) -> None:
        linears = list(linears)
        self.weight = pack_weight(torch.cat([linear.weight.detach() for linear in linears]), dtype)
        self.bias = torch.cat([linear.bias.detach() for linear in linears]).to(dtype)
        self.split_sizes = [linear.out_features for linear in linears]
        self.sources = linears  # what `applies` checks the inputs against

    def applies(self, inputs: torch.Tensor) -> bool:
        """`can_use_packed` for every linear this was built from."""
        return all(can_use_packed(inputs, linear.weight, linear.bias) for linear in self.sources)

    def __call__(self, inputs: torch.Tensor, relu: bool = False) -> torch.Tensor:
        return packed_linear(inputs, self.weight, self.bias, relu)

    def __reduce__(self):
        return (_dropped, ())
