"""The oneDNN packed-weight path for CPU float32 inference (`r2gen_mamba.packed_linear`) and its use in the model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_labels, tiny_model, tiny_pixel_values
from torch.profiler import profile

from r2gen_mamba import packed_linear as pl
from r2gen_mamba.packed_linear import FusedPackedLinear, R2GenLinear, packed_linears

pytestmark = pytest.mark.skipif(not pl.packed_linear_available(), reason="this PyTorch has no oneDNN packed linear")

PACKED_OP = "mkldnn::_linear_pointwise"


def ran_packed_op(fn) -> tuple[bool, object]:
    """Run `fn` under the profiler: whether the packed oneDNN linear ran, and `fn`'s result."""
    with profile() as prof:
        result = fn()
    return any(event.name == PACKED_OP for event in prof.events()), result


def linear(in_features=48, out_features=24, seed=0) -> R2GenLinear:
    torch.manual_seed(seed)
    return R2GenLinear(in_features, out_features)


def test_plain_outside_a_block_and_packed_inside():
    layer, x = linear(), torch.randn(2, 5, 48)
    used, plain = ran_packed_op(lambda: layer(x))
    assert not used and torch.equal(plain, F.linear(x, layer.weight, layer.bias))
    with torch.no_grad(), packed_linears([layer]) as packed:
        assert packed and layer.packed is not None
        used, out = ran_packed_op(lambda: layer(x))
    assert used
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    assert layer.packed is None  # dropped at the end of the block


def test_autograd_keeps_the_plain_path_inside_a_block():
    layer, x = linear(), torch.randn(3, 48, requires_grad=True)
    with packed_linears([layer]):
        used, out = ran_packed_op(lambda: layer(x))
        out.sum().backward()
    assert not used
    assert layer.weight.grad is not None and x.grad is not None


def test_copies_follow_weight_changes_between_blocks_and_are_dropped_on_error():
    layer, x = linear(), torch.randn(4, 48)
    with torch.no_grad(), packed_linears([layer]):
        before = layer(x)
    with torch.no_grad():
        layer.weight.data.mul_(2.0)  # `.data` does not bump the version counter: a versioned cache would go stale
    with torch.no_grad(), packed_linears([layer]):
        after = layer(x)
    torch.testing.assert_close(after - layer.bias, 2.0 * (before - layer.bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="boom"), packed_linears([layer]):
        raise RuntimeError("boom")
    assert layer.packed is None


def test_trainable_bias_or_autocast_keeps_the_plain_path():
    layer, x = linear(), torch.randn(3, 48)
    layer.weight.requires_grad_(False)  # frozen weight, trainable bias
    with packed_linears([layer]):
        used, out = ran_packed_op(lambda: layer(x))
        out.sum().backward()
        assert not used and layer.bias.grad is not None
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            used, _ = ran_packed_op(lambda: layer(x))
        assert not used


def test_copying_or_saving_a_model_inside_a_block_drops_the_packed_copies(tmp_path):
    model = tiny_model()
    pixel_values, labels = tiny_pixel_values(model.config), tiny_labels(model.config)
    with torch.no_grad(), model.packed_cpu_weights():
        twin = copy.deepcopy(model)
        torch.save(model, tmp_path / "model.pt")
    linears = [m for m in twin.modules() if isinstance(m, R2GenLinear)]
    assert linears and all(m.packed is None for m in linears)
    assert twin.model.decoder.packed_condition_fc1 is None and twin.model.decoder.relational_memory.packed_qkv is None
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, labels=labels).logits
        assert torch.equal(twin(pixel_values=pixel_values, labels=labels).logits, expected)
        assert torch.equal(loaded(pixel_values=pixel_values, labels=labels).logits, expected)


def test_reentrant_blocks_keep_the_outer_copy():
    layer = linear()
    with packed_linears([layer]):
        outer = layer.packed
        with packed_linears([layer]) as packed:
            assert packed and layer.packed is outer
        assert layer.packed is outer  # the inner block does not drop what the outer one made
    assert layer.packed is None


def test_switched_off_or_not_float32_runs_plain():
    layer = linear()
    previous = pl.set_packed_linear_enabled(False)
    try:
        with packed_linears([layer]) as packed:
            assert not packed and layer.packed is None
    finally:
        pl.set_packed_linear_enabled(previous)
    double = linear().double()
    x = torch.randn(2, 48, dtype=torch.float64)
    with torch.no_grad(), packed_linears([double]) as packed:
        assert not packed
        assert torch.equal(double(x), F.linear(x, double.weight, double.bias))


def test_fused_packed_linear_matches_its_parts():
    parts = [linear(16, n, seed=i) for i, n in enumerate((8, 12, 8))]
    x = torch.randn(5, 1, 16)
    with torch.no_grad():
        fused = FusedPackedLinear(parts)
        out = fused(x, relu=True)
        expected = torch.cat([F.relu(part(x)) for part in parts], dim=-1)
    assert fused.split_sizes == [8, 12, 8]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decoder_logits_and_condition_offsets_match_the_plain_path():
    model = tiny_model()
    pixel_values, labels = tiny_pixel_values(model.config), tiny_labels(model.config)
    decoder = model.model.decoder
    with torch.no_grad():
        plain = model(pixel_values=pixel_values, labels=labels).logits
        memory = torch.randn(2, 3, model.config.rm_num_slots * model.config.d_model)
        assert decoder.condition_offsets(memory) is None  # outside the block each MCLN computes its own
        with model.packed_cpu_weights() as packed:
            assert packed
            used, packed_logits = ran_packed_op(lambda: model(pixel_values=pixel_values, labels=labels).logits)
            offsets = decoder.condition_offsets(memory)
    assert used
    torch.testing.assert_close(packed_logits, plain, rtol=1e-5, atol=1e-5)
    mlps = decoder.condition_mlps()
    assert len(offsets) == 3 * model.config.decoder_layers and len(mlps) == 2 * len(offsets)
    for (gamma, beta), mlp_gamma, mlp_beta in zip(offsets, mlps[0::2], mlps[1::2]):
        with torch.no_grad():
            torch.testing.assert_close(gamma, mlp_gamma(memory), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(beta, mlp_beta(memory), rtol=1e-5, atol=1e-5)
    assert decoder.packed_condition_fc1 is None and decoder.relational_memory.packed_qkv is None


@pytest.mark.parametrize("overrides", [{}, {"use_mcln": False}], ids=["mcln", "plain-layernorm"])
def test_generate_packs_for_the_call_and_gives_the_same_reports(overrides):
    model = tiny_model(**overrides)
    pixel_values = tiny_pixel_values(model.config, batch_size=3)
    kwargs = dict(num_beams=3, max_length=12, min_length=12)
    previous = pl.set_packed_linear_enabled(False)
    try:
        used, plain = ran_packed_op(lambda: model.generate(pixel_values=pixel_values, **kwargs))
    finally:
        pl.set_packed_linear_enabled(previous)
    assert not used
    used, packed = ran_packed_op(lambda: model.generate(pixel_values=pixel_values, **kwargs))
    assert used
    assert torch.equal(packed, plain)
    linears = [m for m in model.modules() if isinstance(m, R2GenLinear)]
    assert linears and all(m.packed is None for m in linears)  # nothing left attached after the call


def test_training_is_untouched():
    model = tiny_model().train()
    pixel_values, labels = tiny_pixel_values(model.config), tiny_labels(model.config)
    with model.packed_cpu_weights():
        used, loss = ran_packed_op(lambda: model(pixel_values=pixel_values, labels=labels).loss)
        loss.backward()
    assert not used
    assert model.model.decoder.layers[0].ffn_norm.mlp_gamma.fc1.weight.grad is not None


needs_bf16 = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN runs no bfloat16 on this CPU"
)


@needs_bf16
def test_bfloat16_packing_is_close_and_returns_float32():
    layer, x = linear(), torch.randn(6, 48)
    with torch.no_grad(), packed_linears([layer], dtype=torch.bfloat16):
        assert layer.packed.dtype == torch.bfloat16 and layer.packed.bias.dtype == torch.bfloat16
        used, out = ran_packed_op(lambda: layer(x))
        expected = F.linear(x, layer.weight, layer.bias)
    assert used and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    assert not torch.equal(out, expected)  # really rounded to bfloat16
    with pytest.raises(ValueError, match="float32 or torch.bfloat16"), packed_linears([layer], dtype=torch.float16):
        pass


@needs_bf16
def test_generate_inside_a_bfloat16_block_keeps_the_bfloat16_copies():
    model = tiny_model()
    pixel_values = tiny_pixel_values(model.config, batch_size=2)
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(module.packed.dtype))
    with model.packed_cpu_weights(torch.bfloat16) as packed:
        assert packed
        ids = model.generate(pixel_values=pixel_values, num_beams=3, max_length=8, min_length=8)
        hook.remove()
        with torch.no_grad():
            low = model(pixel_values=pixel_values, decoder_input_ids=ids).logits
    assert ids.shape == (2, 8) and seen and set(seen) == {torch.bfloat16}  # generate() did not repack in float32
    with torch.no_grad():
        full = model(pixel_values=pixel_values, decoder_input_ids=ids).logits
    torch.testing.assert_close(low, full, rtol=5e-2, atol=5e-2)
    assert model.lm_head.packed is None and model.model.decoder.packed_condition_fc1 is None
