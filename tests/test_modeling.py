"""Core model: config, forward/loss, save/load, gradients, cached decoding, generation, parameter counts."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config, tiny_labels, tiny_model, tiny_pixel_values
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, ResNetModel

from r2gen_mamba import (
    R2GenMambaCache,
    R2GenMambaConfig,
    R2GenMambaDecoderConfig,
    R2GenMambaEncoderConfig,
    R2GenMambaForConditionalGeneration,
    R2GenMambaModel,
    resnet101_config,
)
from r2gen_mamba.modeling_r2gen_mamba import (
    R2GenAttention,
    R2GenConditionalLayerNorm,
    R2GenMambaEncoder,
    R2GenTransformerEncoder,
    repeated_row_group,
    sinusoidal_positions,
)


def random_prefix(config, batch_size: int, length: int, seed: int = 1) -> torch.LongTensor:
    """Decoder inputs as generation makes them: start id 0, then real tokens (no 0 after the start)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch_size, length), generator=generator)
    ids[:, 0] = config.decoder_start_token_id
    return ids


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------


def test_config_round_trip(tmp_path):
    config = tiny_config(encoder_type="transformer", encoder_layers=2, use_mcln=False, num_views=1)
    config.save_pretrained(tmp_path)
    loaded = R2GenMambaConfig.from_pretrained(tmp_path)
    auto = AutoConfig.from_pretrained(tmp_path)
    expected = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    for other in (loaded, auto, R2GenMambaConfig.from_dict(config.to_dict())):
        assert type(other) is R2GenMambaConfig
        assert {k: v for k, v in other.to_dict().items() if k != "_name_or_path"} == expected
    assert loaded.encoder_type == "transformer" and loaded.encoder_layers == 2
    assert loaded.use_mcln is False and loaded.num_views == 1 and loaded.d_model == 32
    assert loaded.vision_config.hidden_sizes == [8, 16, 16, 32]
    assert loaded.visual_feature_size == 32


def test_config_published_defaults():
    config = R2GenMambaConfig()
    assert (config.d_model, config.vocab_size, config.num_views, config.patch_dropout) == (512, 761, 2, 0.5)
    assert (config.encoder_type, config.encoder_layers, config.d_state, config.d_conv, config.expand) == (
        "mamba",
        1,
        16,
        4,
        2,
    )
    assert config.encoder_config.time_step_rank == "auto" and config.encoder_config.dt_rank == 32
    assert (config.decoder_layers, config.num_heads, config.d_ff, config.rm_num_slots, config.use_mcln) == (
        3,
        8,
        512,
        3,
        True,
    )
    assert config.visual_feature_size == 2048
    assert R2GenMambaConfig(encoder_type="transformer").encoder_layers == 3


def test_config_auto_dt_rank_follows_the_width():
    # A flat d_model applied to an existing encoder sub-config must not leave a stale dt rank behind.
    config = R2GenMambaConfig(encoder_config=R2GenMambaEncoderConfig(), d_model=64, num_heads=4, rm_num_heads=4)
    assert config.encoder_config.dt_rank == 4
    block = R2GenMambaForConditionalGeneration(tiny_config()).model.encoder.layers[0].mixer
    assert block.dt_proj.weight.shape[1] == math.ceil(32 / 16)
    assert R2GenMambaEncoderConfig(time_step_rank=5).dt_rank == 5
    with pytest.raises(ValueError, match="time_step_rank must be a positive integer or 'auto'"):
        R2GenMambaEncoderConfig(time_step_rank=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(encoder_type="lstm"), "encoder_type"),
        (dict(use_relational_memory=False, use_mcln=True), "use_mcln"),
        (dict(num_heads=5), "divisible"),
        (dict(d_model=33, num_heads=3, rm_num_heads=3), "must be even"),
        (dict(num_views=0), "num_views"),
        (dict(patch_dropout=1.0), "patch_dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(vocab_size=1), "vocab_size"),
        (dict(bos_token_id=30), "bos_token_id"),
        (dict(vision_config="resnet"), "vision_config"),
    ],
)
def test_config_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_config_width_mismatch_error():
    with pytest.raises(ValueError, match=r"encoder hidden_size \(64\) must equal decoder hidden_size \(512\)"):
        R2GenMambaConfig(encoder_config=R2GenMambaEncoderConfig(hidden_size=64))


# (flat attribute, value, extra constructor kwargs): each setting the constructor rejects.
_INVALID_FLAT_SETTINGS = [
    ("d_model", 34, {}),  # not divisible by the 4 decoder heads
    ("d_model", 33, {}),  # odd
    ("d_model", 0, {}),
    ("d_model", 36, dict(encoder_type="transformer")),  # not divisible by the 8 encoder heads
    ("num_heads", 5, {}),
    ("num_heads", 0, {}),
    ("rm_num_heads", 5, {}),
    ("vocab_size", 1, {}),
    ("dropout", 1.0, {}),
    ("use_relational_memory", False, {}),
    ("encoder_type", "lstm", {}),
    ("encoder_layers", 0, {}),
    ("d_state", 0, {}),
    ("expand", 0, {}),
]


@pytest.mark.parametrize("name, value, base", _INVALID_FLAT_SETTINGS)
def test_config_flat_setter_validates_like_the_constructor(name, value, base):
    with pytest.raises(ValueError) as from_constructor:
        tiny_config(**base, **{name: value})
    config = tiny_config(**base)
    before = config.to_dict()
    with pytest.raises(ValueError) as from_setter:
        setattr(config, name, value)
    assert str(from_setter.value) == str(from_constructor.value)
    # The rejected value is rolled back: the config stays as it was, and consistent.
    assert config.to_dict() == before
    R2GenMambaConfig.from_dict(config.to_dict())


def test_config_flat_d_model_setter_updates_both_widths(tmp_path):
    config = tiny_config()
    encoder_config, decoder_config = config.encoder_config, config.decoder_config
    config.d_model = 64
    assert config.encoder_config is encoder_config and config.decoder_config is decoder_config
    assert (config.d_model, encoder_config.hidden_size, decoder_config.hidden_size) == (64, 64, 64)
    assert encoder_config.dt_rank == 4
    config.num_heads = 8
    config.encoder_type = "transformer"
    reference = tiny_config(d_model=64, num_heads=8, encoder_type="transformer", encoder_layers=1)
    assert config.to_dict() == reference.to_dict()
    config.save_pretrained(tmp_path)
    expected = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    for other in (
        copy.deepcopy(config),
        R2GenMambaConfig.from_dict(config.to_dict()),
        R2GenMambaConfig.from_pretrained(tmp_path),
        AutoConfig.from_pretrained(tmp_path),
    ):
        assert {k: v for k, v in other.to_dict().items() if k != "_name_or_path"} == expected
    # Flat kwargs of from_pretrained go through the same setters.
    assert R2GenMambaConfig.from_pretrained(tmp_path, d_model=128).encoder_config.hidden_size == 128
    with pytest.raises(ValueError, match="divisible"):
        AutoConfig.from_pretrained(tmp_path, d_model=100)


def test_config_flat_overrides_do_not_depend_on_their_order(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    for overrides in (
        {"use_relational_memory": False, "use_mcln": False},
        {"use_mcln": False, "use_relational_memory": False},
        {"num_heads": 3, "d_model": 48},
        {"d_model": 48, "num_heads": 3},
    ):
        for load in (R2GenMambaConfig.from_pretrained, AutoConfig.from_pretrained):
            config = load(tmp_path, **overrides)
            assert {name: getattr(config, name) for name in overrides} == overrides
        config = tiny_config()
        config.update(overrides)
        assert {name: getattr(config, name) for name in overrides} == overrides
    with pytest.raises(ValueError, match="divisible"):
        R2GenMambaConfig.from_pretrained(tmp_path, d_model=30)


def test_config_update_rejects_and_rolls_back_together():
    config = tiny_config()
    encoder = config.encoder_config
    with pytest.raises(ValueError, match="divisible"):
        config.update({"vocab_size": 50, "d_model": 30})
    assert (config.vocab_size, config.d_model, encoder.hidden_size) == (30, 32, 32)
    assert config.encoder_config is encoder  # restored in place


def test_config_does_not_mutate_sub_configs_passed_in():
    encoder_config, decoder_config = R2GenMambaEncoderConfig(), R2GenMambaDecoderConfig()
    encoder_before, decoder_before = encoder_config.to_dict(), decoder_config.to_dict()
    config = R2GenMambaConfig(
        encoder_config=encoder_config, decoder_config=decoder_config, d_model=256, d_state=8, vocab_size=50
    )
    assert (config.d_model, config.d_state, config.vocab_size) == (256, 8, 50)
    assert encoder_config.to_dict() == encoder_before and decoder_config.to_dict() == decoder_before
    # Rejected overrides leave them untouched as well.
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        R2GenMambaConfig(encoder_config=encoder_config, decoder_config=decoder_config, d_model=0)
    assert encoder_config.to_dict() == encoder_before and decoder_config.to_dict() == decoder_before
    # Nor does the config share them: later flat assignments stay inside the config.
    config = R2GenMambaConfig.from_sub_configs(resnet101_config(), encoder_config, decoder_config)
    config.d_model = 256
    assert encoder_config.hidden_size == 512 and decoder_config.hidden_size == 512


def test_config_from_sub_configs():
    config = R2GenMambaConfig.from_sub_configs(
        resnet101_config(),
        R2GenMambaEncoderConfig(hidden_size=64, state_size=8),
        R2GenMambaDecoderConfig(hidden_size=64, vocab_size=50),
        num_views=1,
    )
    assert (config.d_model, config.d_state, config.vocab_size, config.num_views) == (64, 8, 50, 1)


# --------------------------------------------------------------------------------------------------------------------
# Forward, loss, masks, input checks
# --------------------------------------------------------------------------------------------------------------------


def test_output_and_loss_shapes():
    model = tiny_model()
    config = model.config
    pixel_values, labels = tiny_pixel_values(config), tiny_labels(config)
    out = model(pixel_values=pixel_values, labels=labels)
    # 64 px through a 32x-downsampling ResNet: 2x2 patches per view, 2 views.
    assert out.encoder_last_hidden_state.shape == (2, 8, config.d_model)
    assert out.logits.shape == (*labels.shape, config.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.cache is None
    as_tuple = model(pixel_values=pixel_values, labels=labels, return_dict=False)
    assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)


def test_loss_equals_hand_computed_masked_nll():
    model = tiny_model()
    config = model.config
    labels = tiny_labels(config, lengths=(7, 3))
    with torch.no_grad():
        out = model(pixel_values=tiny_pixel_values(config), labels=labels)
    log_probs = torch.log_softmax(out.logits, dim=-1)
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for position in range(labels.shape[1]):
            target = int(labels[row, position])
            if target != -100:
                total -= float(log_probs[row, position, target])
                count += 1
    assert count == 8 + 4
    assert out.loss.item() == pytest.approx(total / count, rel=1e-6, abs=1e-6)


def test_decoder_inputs_are_shifted_labels_and_default_mask_is_r2gen_seq_mask():
    model = tiny_model()
    config = model.config
    pixel_values, labels = tiny_pixel_values(config), tiny_labels(config, lengths=(7, 3))
    decoder_input_ids = torch.zeros_like(labels)
    decoder_input_ids[:, 1:] = labels[:, :-1].clamp(min=0)
    seq_mask = (decoder_input_ids != 0).long()
    seq_mask[:, 0] = 1
    implicit = model(pixel_values=pixel_values, labels=labels).logits
    explicit = model(
        pixel_values=pixel_values,
        labels=labels,
        decoder_input_ids=decoder_input_ids,
        decoder_attention_mask=seq_mask,
    ).logits
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    # The padding mask matters: with every key visible the padded row's late positions change.
    unmasked = model(
        pixel_values=pixel_values, decoder_input_ids=decoder_input_ids, decoder_attention_mask=torch.ones_like(labels)
    ).logits
    assert not torch.allclose(unmasked[1, 5:], implicit[1, 5:])
    torch.testing.assert_close(unmasked[0], implicit[0])  # row 0 has no padding


def test_fully_masked_query_row_stays_finite():
    model = tiny_model()
    ids = random_prefix(model.config, batch_size=2, length=4)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0  # position 0 then sees no key at all: R2Gen's -1e9 fill attends uniformly instead of NaN
    pixel_values = tiny_pixel_values(model.config)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, decoder_input_ids=ids, decoder_attention_mask=mask).logits
    assert torch.isfinite(logits).all()


def test_eval_is_deterministic_and_train_uses_dropout():
    model = tiny_model()
    config = model.config
    pixel_values, labels = tiny_pixel_values(config), tiny_labels(config)
    first = model(pixel_values=pixel_values, labels=labels).logits
    second = model(pixel_values=pixel_values, labels=labels).logits
    assert torch.equal(first, second)
    model.train()
    assert not torch.allclose(model(pixel_values=pixel_values, labels=labels).logits, first)


def test_pixel_values_shape_errors():
    model = tiny_model()
    config = model.config
    good = tiny_pixel_values(config)
    with pytest.raises(ValueError, match=r"expected shape \[batch, views=2.*got 1"):
        model(pixel_values=good[:, :1], labels=tiny_labels(config))
    with pytest.raises(ValueError, match=r"expected .*\[batch, views=2.*got a 4-D"):
        model(pixel_values=good[:, 0], labels=tiny_labels(config))
    with pytest.raises(ValueError, match=r"expected 3 channels, got 1"):
        model(pixel_values=good[:, :, :1], labels=tiny_labels(config))
    with pytest.raises(ValueError, match="views=2"):
        model.generate(pixel_values=good[:, :1], max_length=5)


def test_single_view_model_accepts_4d_pixel_values():
    model = tiny_model(num_views=1)
    pixel_values = tiny_pixel_values(model.config)  # [2, 1, 3, 64, 64]
    labels = tiny_labels(model.config)
    five_d = model(pixel_values=pixel_values, labels=labels).logits
    four_d = model(pixel_values=pixel_values[:, 0], labels=labels).logits
    assert torch.equal(five_d, four_d)
    assert model(pixel_values=pixel_values, labels=labels).encoder_last_hidden_state.shape[1] == 4


def test_cpu_resnet_runs_channels_last_with_the_same_features():
    model = tiny_model()
    pixel_values = tiny_pixel_values(model.config)
    layouts = []
    hook = model.model.visual_extractor.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        features = model.model.visual_features(pixel_values)
        hook.remove()
        reference = model.model.visual_extractor(pixel_values.flatten(0, 1).contiguous()).last_hidden_state
    assert layouts == [True]
    torch.testing.assert_close(features, reference, rtol=1e-5, atol=1e-5)


def test_views_are_concatenated_in_order():
    model = tiny_model()
    pixel_values = tiny_pixel_values(model.config)
    tokens = model.model.encode_images(pixel_values)
    model.model.encoder = torch.nn.Identity()  # patch tokens only, to check the layout
    patches = model.model.encode_images(pixel_values)
    swapped = model.model.encode_images(pixel_values.flip(1))
    torch.testing.assert_close(patches[:, :4], swapped[:, 4:])
    torch.testing.assert_close(patches[:, 4:], swapped[:, :4])
    assert tokens.shape == patches.shape


# --------------------------------------------------------------------------------------------------------------------
# R2Gen components against straightforward re-implementations of architecture.md
# --------------------------------------------------------------------------------------------------------------------


def reference_relational_memory(rm, inputs: torch.Tensor) -> torch.Tensor:
    """architecture.md, literally: q = M, k = v = [M; x_t], full MHA, MLP, gates; one token at a time."""
    batch, seq_len, hidden = inputs.shape
    heads, head_dim = rm.attn.num_heads, hidden // rm.attn.num_heads
    memory = torch.zeros(batch, rm.num_slots, hidden)
    memory[:, range(rm.num_slots), range(rm.num_slots)] = 1.0
    outputs = []
    for t in range(seq_len):
        x = inputs[:, t : t + 1]
        kv = torch.cat([memory, x], dim=1)

        def heads_of(states):
            return states.view(batch, -1, heads, head_dim).transpose(1, 2)

        q, k, v = heads_of(rm.attn.q_proj(memory)), heads_of(rm.attn.k_proj(kv)), heads_of(rm.attn.v_proj(kv))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        attended = rm.attn.o_proj((probs @ v).transpose(1, 2).reshape(batch, rm.num_slots, hidden))
        next_memory = memory + attended
        next_memory = next_memory + F.relu(rm.mlp.fc2(F.relu(rm.mlp.fc1(next_memory))))
        gates = rm.W(x) + rm.U(torch.tanh(memory))
        input_gate, forget_gate = torch.sigmoid(gates[..., :hidden]), torch.sigmoid(gates[..., hidden:])
        memory = input_gate * torch.tanh(next_memory) + forget_gate * memory
        outputs.append(memory.reshape(batch, -1))
    return torch.stack(outputs, dim=1)


def test_relational_memory_matches_reference():
    model = tiny_model()
    rm = model.model.decoder.relational_memory
    inputs = torch.randn(3, 6, model.config.d_model)
    with torch.no_grad():
        ours = rm(inputs, rm.initial_memory(3, inputs.device, inputs.dtype)).flatten(2)
        reference = reference_relational_memory(rm, inputs)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_initial_memory_is_identity_rows():
    model = tiny_model(rm_num_slots=3)
    memory = model.model.decoder.relational_memory.initial_memory(2, torch.device("cpu"), torch.float32)
    assert memory.shape == (2, 3, 32)
    assert torch.equal(memory[0, :, :3], torch.eye(3)) and memory[:, :, 3:].abs().sum() == 0


def test_mcln_and_layer_norm_quirk():
    decoder = tiny_model().model.decoder
    memory = torch.randn(2, 5, decoder.config.rm_num_slots * decoder.hidden_size)
    hidden = torch.randn(2, 5, decoder.hidden_size)
    norm = decoder.layers[1].cross_attn_norm
    assert isinstance(norm, R2GenConditionalLayerNorm)
    with torch.no_grad():
        # LayerNorm quirk: unbiased std, eps added to the std.
        mean = hidden.mean(-1, keepdim=True)
        std = torch.sqrt(((hidden - mean) ** 2).sum(-1, keepdim=True) / (hidden.shape[-1] - 1))
        gamma = norm.gamma + norm.mlp_gamma.fc2(torch.relu(norm.mlp_gamma.fc1(memory)))
        beta = norm.beta + norm.mlp_beta.fc2(torch.relu(norm.mlp_beta.fc1(memory)))
        expected = gamma * (hidden - mean) / (std + 1e-6) + beta
        torch.testing.assert_close(norm(hidden, memory), expected, rtol=1e-5, atol=1e-5)
        plain = decoder.norm
        torch.testing.assert_close(plain(hidden), plain.gamma * (hidden - mean) / (std + 1e-6) + plain.beta)


def test_sinusoidal_positions_match_r2gen_table():
    dim, length = 32, 50
    position = torch.arange(0, length).unsqueeze(1).float()
    div_term = torch.exp(torch.arange(0, dim, 2).float() * -(math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    assert torch.equal(sinusoidal_positions(torch.arange(length), dim), table)
    assert torch.equal(sinusoidal_positions(torch.arange(10, 20), dim), table[10:20])


def test_initialisation():
    model = tiny_model()
    mixer = model.model.encoder.layers[0].mixer
    expected_a_log = torch.log(torch.arange(1, model.config.d_state + 1, dtype=torch.float32))
    torch.testing.assert_close(mixer.A_log.detach(), expected_a_log.expand_as(mixer.A_log))
    assert torch.equal(mixer.D.detach(), torch.ones_like(mixer.D))
    norm = model.model.decoder.layers[0].self_attn_norm
    for linear in (norm.mlp_gamma.fc1, norm.mlp_gamma.fc2, norm.mlp_beta.fc1, norm.mlp_beta.fc2):
        assert torch.equal(linear.bias.detach(), torch.full_like(linear.bias, 0.1))
    # xavier-uniform bound sqrt(6 / (fan_in + fan_out)) on the decoder matrices.
    weight = model.model.decoder.layers[0].self_attn.q_proj.weight
    assert weight.abs().max() <= math.sqrt(6 / 64) and weight.abs().max() > 0.5 * math.sqrt(6 / 64)
    assert "model.decoder.embed_tokens.weight" in model.state_dict()
    assert not any("position" in key for key in model.state_dict())


# --------------------------------------------------------------------------------------------------------------------
# Gradients, save/load, Auto classes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder_type", ["mamba", "transformer"])
@pytest.mark.parametrize("encoder_layers", [1, 2])
@pytest.mark.parametrize("use_relational_memory, use_mcln", [(True, True), (True, False), (False, False)])
def test_every_parameter_gets_a_gradient(encoder_type, encoder_layers, use_relational_memory, use_mcln):
    model = tiny_model(
        encoder_type=encoder_type,
        encoder_layers=encoder_layers,
        use_relational_memory=use_relational_memory,
        use_mcln=use_mcln,
    ).train()
    config = model.config
    out = model(pixel_values=tiny_pixel_values(config), labels=tiny_labels(config))
    out.loss.backward()
    missing = [name for name, param in model.named_parameters() if param.grad is None]
    assert not missing
    zero = [name for name, param in model.named_parameters() if not param.grad.abs().sum() > 0]
    assert not zero
    names = dict(model.named_parameters())
    assert ("model.decoder.relational_memory.W.weight" in names) == use_mcln  # the memory only feeds MCLN
    assert ("model.decoder.layers.0.ffn_norm.mlp_beta.fc2.weight" in names) == use_mcln
    assert ("model.encoder.norm_f.weight" in names) == (encoder_type == "mamba" and encoder_layers > 1)


def test_save_load_reproduces_outputs_and_auto_classes_load(tmp_path):
    model = tiny_model()
    config = model.config
    pixel_values, labels = tiny_pixel_values(config), tiny_labels(config)
    expected = model(pixel_values=pixel_values, labels=labels)
    model.save_pretrained(tmp_path)
    saved = {path.name for path in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json"} <= saved
    # register_for_auto_class: the model files travel with the weights.
    assert {"modeling_r2gen_mamba.py", "configuration_r2gen_mamba.py", "mamba_block.py", "packed_linear.py"} <= saved

    for loaded in (
        R2GenMambaForConditionalGeneration.from_pretrained(tmp_path),
        AutoModelForImageTextToText.from_pretrained(tmp_path),
    ):
        assert type(loaded) is R2GenMambaForConditionalGeneration
        out = loaded.eval()(pixel_values=pixel_values, labels=labels)
        assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
        assert loaded.generation_config.num_beams == 3 and loaded.generation_config.max_length == 61
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is R2GenMambaModel
    torch.testing.assert_close(
        base.eval()(pixel_values=pixel_values, labels=None, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))
        .last_hidden_state.abs()
        .sum(),
        model.model(pixel_values=pixel_values, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))
        .last_hidden_state.abs()
        .sum(),
    )


def test_saved_folder_loads_as_remote_code_without_the_package(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    pixel_values = tiny_pixel_values(model.config, batch_size=1)
    torch.save(pixel_values, tmp_path / "pixel_values.pt")
    ids = torch.tensor([[0, 3, 5]])
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, decoder_input_ids=ids).logits
    # A fresh interpreter that cannot import r2gen_mamba: the copied model files must be enough.
    script = f"""
import sys, torch
sys.modules["r2gen_mamba"] = None  # any import of the package (installed or on the path) now fails
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
pixel_values = torch.load({str(tmp_path / "pixel_values.pt")!r})
with torch.no_grad():
    logits = model(pixel_values=pixel_values, decoder_input_ids=torch.tensor([[0, 3, 5]])).logits
torch.save(logits, {str(tmp_path / "logits.pt")!r})
"""
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_load_vision_weights_from_local_resnet(tmp_path):
    model = tiny_model()
    resnet = ResNetModel(model.config.vision_config)
    with torch.no_grad():
        for param in resnet.parameters():
            param.normal_()
    resnet.save_pretrained(tmp_path / "resnet")
    model.load_vision_weights(str(tmp_path / "resnet"))
    for key, value in resnet.state_dict().items():
        assert torch.equal(model.model.visual_extractor.state_dict()[key], value), key
    assert model.config.vision_model_name_or_path == str(tmp_path / "resnet")

    other = ResNetModel(resnet101_config(embedding_size=8, hidden_sizes=[8, 16, 16, 64], depths=[1, 1, 1, 1]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="hidden_sizes"):
        model.load_vision_weights(str(tmp_path / "other"))


# --------------------------------------------------------------------------------------------------------------------
# Cached decoding and generation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_relational_memory, use_mcln", [(True, True), (False, False)])
def test_teacher_forced_logits_equal_cached_steps(use_relational_memory, use_mcln):
    model = tiny_model(use_relational_memory=use_relational_memory, use_mcln=use_mcln)
    config = model.config
    pixel_values = tiny_pixel_values(config)
    ids = random_prefix(config, batch_size=2, length=9)
    with torch.no_grad():
        full = model(pixel_values=pixel_values, decoder_input_ids=ids).logits
        encoder_outputs = (model.model.encode_images(pixel_values),)
        # Prefill three tokens at once, then one token per step.
        out = model(encoder_outputs=encoder_outputs, decoder_input_ids=ids[:, :3], use_cache=True)
        steps, cache = [out.logits], out.cache
        assert isinstance(cache, R2GenMambaCache) and cache.get_seq_length() == 3
        for t in range(3, ids.shape[1]):
            out = model(encoder_outputs=encoder_outputs, decoder_input_ids=ids[:, t : t + 1], cache=cache)
            steps.append(out.logits)
        assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_cache_reorder_selects_rows():
    model = tiny_model()
    ids = random_prefix(model.config, batch_size=3, length=4)
    pixel_values = tiny_pixel_values(model.config, batch_size=3)
    with torch.no_grad():
        cache = model(pixel_values=pixel_values, decoder_input_ids=ids, use_cache=True).cache
        memory, keys = cache.memory.clone(), cache.self_keys[0].clone()
        cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.memory, memory[[2, 2, 0]]) and torch.equal(cache.self_keys[0], keys[[2, 2, 0]])


def test_repeated_row_group():
    a, b, c = torch.randn(3, 4, 5).unbind(0)
    assert repeated_row_group(torch.stack([a, a, a, b, b, b])) == 3
    assert repeated_row_group(torch.stack([a, a, a])) == 3
    assert repeated_row_group(torch.stack([a, b, c])) == 1
    assert repeated_row_group(torch.stack([a, a, b])) == 1  # runs of unequal length
    assert repeated_row_group(torch.stack([a, a, b, c])) == 1  # the second run is not a run
    near = a.clone()
    near[3, 4] += 1e-7
    assert repeated_row_group(torch.stack([a, near])) == 1  # exact comparison, no tolerance


def test_grouped_cross_attention_equals_repeated_keys():
    torch.manual_seed(0)
    attn = R2GenAttention(32, 4, 0.0).eval()
    encoder_states = torch.randn(2, 7, 32)
    queries = torch.randn(6, 3, 32)
    with torch.no_grad():
        key, value = attn.split_heads(attn.k_proj(encoder_states)), attn.split_heads(attn.v_proj(encoder_states))
        grouped = attn.attend(queries, key, value, query_group=3)
        repeated = attn.attend(queries, key.repeat_interleave(3, 0), value.repeat_interleave(3, 0))
    torch.testing.assert_close(grouped, repeated, rtol=1e-6, atol=1e-6)


def test_beam_expanded_encoder_output_is_attended_once():
    model = tiny_model()
    pixel_values = tiny_pixel_values(model.config, batch_size=2)
    ids = random_prefix(model.config, batch_size=6, length=5)
    with torch.no_grad():
        encoder_outputs = (model.model.encode_images(pixel_values).repeat_interleave(3, 0),)
        out = model(encoder_outputs=encoder_outputs, decoder_input_ids=ids, use_cache=True)
        heads, tokens = model.config.num_heads, encoder_outputs[0].shape[1]
        assert out.cache.cross_group == 3
        assert out.cache.cross_keys[0].shape == (2, heads, tokens, model.config.d_model // heads)
    with torch.enable_grad():  # the training path attends every row as it is
        ungrouped = model(encoder_outputs=encoder_outputs, decoder_input_ids=ids).logits
    torch.testing.assert_close(out.logits, ungrouped.detach(), rtol=1e-5, atol=1e-5)


def forced_generation(model, pixel_values, **kwargs):
    # An untrained model ends at once (id 0); min_new_tokens forces real decoding steps.
    with torch.no_grad():
        return model.generate(pixel_values=pixel_values, max_length=12, min_new_tokens=11, **kwargs)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_with_and_without_cache_is_identical(num_beams):
    model = tiny_model()
    pixel_values = tiny_pixel_values(model.config, batch_size=2)
    cached = forced_generation(model, pixel_values, num_beams=num_beams)
    uncached = forced_generation(model, pixel_values, num_beams=num_beams, use_cache=False)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_with_and_without_grouped_cross_attention_is_identical(num_beams, monkeypatch):
    from r2gen_mamba import modeling_r2gen_mamba

    model = tiny_model()
    pixel_values = tiny_pixel_values(model.config, batch_size=3)
    kwargs = dict(num_beams=num_beams, output_scores=True, return_dict_in_generate=True)
    grouped = forced_generation(model, pixel_values, **kwargs)
    monkeypatch.setattr(modeling_r2gen_mamba, "repeated_row_group", lambda states: 1)
    ungrouped = forced_generation(model, pixel_values, **kwargs)
    assert torch.equal(grouped.sequences, ungrouped.sequences)
    torch.testing.assert_close(torch.stack(grouped.scores), torch.stack(ungrouped.scores), rtol=1e-5, atol=1e-5)


def test_generation_modes_produce_valid_ids():
    model = tiny_model()
    config = model.config
    pixel_values = tiny_pixel_values(config, batch_size=2)
    assert model.generation_config.num_beams == 3 and model.generation_config.max_length == 61
    assert {model.generation_config.bos_token_id, model.generation_config.eos_token_id} == {0}
    assert {model.generation_config.pad_token_id, model.generation_config.decoder_start_token_id} == {0}
    outputs = {
        "beam_default": forced_generation(model, pixel_values),
        "greedy": forced_generation(model, pixel_values, num_beams=1),
        "sample": forced_generation(model, pixel_values, num_beams=1, do_sample=True, top_k=10),
        "no_repeat": forced_generation(model, pixel_values, no_repeat_ngram_size=2),
        "length_penalty": forced_generation(model, pixel_values, length_penalty=1.5),
        "return_sequences": forced_generation(model, pixel_values, num_return_sequences=3),
    }
    for name, ids in outputs.items():
        rows = 6 if name == "return_sequences" else 2
        assert ids.shape == (rows, 12), name
        assert ids.dtype == torch.long and int(ids.min()) >= 0 and int(ids.max()) < config.vocab_size, name
        assert torch.all(ids[:, 0] == 0), name
    for row in outputs["no_repeat"].tolist():
        bigrams = list(zip(row[1:], row[2:]))
        assert len(bigrams) == len(set(bigrams))
    # The untrained model repeats itself without the n-gram constraint (so the check above is not vacuous).
    repeats = [len(set(zip(row[1:], row[2:]))) < 10 for row in outputs["beam_default"].tolist()]
    assert any(repeats)


def test_generate_returns_scores_consistent_with_forward():
    model = tiny_model()
    pixel_values = tiny_pixel_values(model.config, batch_size=1)
    with torch.no_grad():
        result = model.generate(
            pixel_values=pixel_values,
            num_beams=1,
            max_length=6,
            min_new_tokens=5,
            output_logits=True,
            return_dict_in_generate=True,
        )
        sequences = result.sequences
        logits = model(pixel_values=pixel_values, decoder_input_ids=sequences[:, :-1]).logits
    torch.testing.assert_close(torch.stack(result.logits, dim=1), logits, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Encoders alone and full-size parameter counts
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder_type", ["mamba", "transformer"])
def test_encoders_alone(encoder_type):
    config = tiny_config(encoder_type=encoder_type).encoder_config
    encoder = R2GenMambaEncoder(config) if encoder_type == "mamba" else R2GenTransformerEncoder(config)
    hidden = torch.randn(2, 9, 32)
    assert encoder.eval()(hidden).shape == (2, 9, 32)
    if encoder_type == "mamba":
        # The official encoder is the bare block: no norm, no residual.
        assert torch.equal(encoder(hidden), encoder.layers[0].mixer(hidden))


def count(module: torch.nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


def test_full_size_parameter_counts():
    """architecture.md: total 75,433,273 (vocab 761); visual extractor 42,500,160; Mamba encoder 1,694,720; official
    `decoder` (layers + final norm) 26,782,720; relational memory 2,626,560. Our `model.decoder` also holds the token
    embedding (official `tgt_embed`) and the memory (official `rm`)."""
    model = R2GenMambaForConditionalGeneration(R2GenMambaConfig())
    decoder = model.model.decoder
    assert count(model) == 75_433_273
    assert count(model.model.visual_extractor) == 42_500_160
    assert count(model.model.encoder) == 1_694_720
    assert count(decoder.layers) + count(decoder.norm) == 26_782_720
    assert count(decoder.relational_memory) == 2_626_560
    assert count(decoder.embed_tokens) == 761 * 512
    assert count(decoder) == 26_782_720 + 2_626_560 + 761 * 512
    assert count(model.model.patch_embed) == 2048 * 512 + 512
    assert count(model.lm_head) == 512 * 761 + 761
    del model
    transformer = R2GenTransformerEncoder(R2GenMambaConfig(encoder_type="transformer").encoder_config)
    assert count(transformer) == 4_734_976


# ---------------------------------------------------------------------------------------------------------------------
# The official greedy decoder's soft trigram penalty
# ---------------------------------------------------------------------------------------------------------------------


def _trigram_penalty_loop(input_ids: torch.Tensor, scores: torch.Tensor, penalty: float) -> torch.Tensor:
    """Per-sequence loop, written from the rule: every earlier trigram (a, b, c) with (a, b) = the last two generated
    tokens lowers c by `penalty`, once per occurrence (position 0, the start token, excluded)."""
    scores = scores.clone()
    for row, sequence in enumerate(input_ids[:, 1:].tolist()):
        for p in range(2, len(sequence)):
            if sequence[p - 2 : p] == sequence[-2:]:
                scores[row, sequence[p]] -= penalty
    return scores


def test_soft_trigram_penalty_by_hand_and_against_a_loop():
    from r2gen_mamba import R2GenSoftTrigramPenaltyLogitsProcessor

    processor = R2GenSoftTrigramPenaltyLogitsProcessor()
    # (5, 6) was followed by 7 and by 8 before, and the sequence ends in (5, 6): 7 and 8 each lose 0.693 * 2.
    input_ids = torch.tensor([[0, 5, 6, 7, 5, 6, 8, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    scores = torch.zeros(2, 10)
    out = processor(input_ids, scores)
    expected = torch.zeros(2, 10)
    expected[0, 7] = expected[0, 8] = -0.693 * 2
    torch.testing.assert_close(out, expected)
    # A trigram repeated twice is penalised twice; the start token never counts.
    out = processor(torch.tensor([[0, 3, 3, 3, 3]]), torch.zeros(1, 5))
    assert out[0, 3].item() == pytest.approx(-0.693 * 2 * 2)

    generator = torch.Generator().manual_seed(0)
    for length in (1, 2, 3, 5, 12, 30):
        input_ids = torch.randint(0, 4, (6, length), generator=generator)
        scores = torch.randn(6, 4, generator=generator)
        torch.testing.assert_close(processor(input_ids, scores), _trigram_penalty_loop(input_ids, scores, 0.693 * 2))


def test_soft_trigram_penalty_in_greedy_generation():
    from transformers import LogitsProcessorList

    from r2gen_mamba import R2GenSoftTrigramPenaltyLogitsProcessor

    config = tiny_config()
    model = R2GenMambaForConditionalGeneration(config).eval()
    pixel_values = tiny_pixel_values(config)
    with torch.no_grad():
        out = model.generate(
            pixel_values=pixel_values,
            num_beams=1,
            length_penalty=None,
            max_length=20,
            logits_processor=LogitsProcessorList([R2GenSoftTrigramPenaltyLogitsProcessor()]),
            output_scores=True,
            return_dict_in_generate=True,
        )
    # Each step's processed scores equal the raw step logits minus the loop's penalty on the prefix so far.
    with torch.no_grad():
        full = model(pixel_values=pixel_values, decoder_input_ids=out.sequences[:, :-1]).logits
    penalised_steps = 0
    for step, processed in enumerate(out.scores):
        prefix = out.sequences[:, : step + 1]
        expected = _trigram_penalty_loop(prefix, full[:, step], 0.693 * 2)
        alive = (prefix[:, 1:] != 0).all(dim=1)  # rows that already ended are padded, not decoded
        torch.testing.assert_close(processed[alive], expected[alive], atol=1e-5, rtol=1e-5)
        penalised_steps += int((expected[alive] != full[alive, step]).any())
    assert penalised_steps > 0, "the untrained model repeated no trigram: the check above tested nothing"
