"""R2Gen-Mamba: ResNet-101 patch tokens -> Mamba encoder -> R2Gen's memory-driven Transformer decoder.

Read top to bottom: the R2Gen building blocks (LayerNorm quirk, attention, feed-forward), the relational memory and
the memory-driven conditional layer norm (MCLN), the two encoders, the decoder with its incremental-decoding cache,
then the `PreTrainedModel` classes. The math follows the official R2Gen / R2Gen-Mamba code exactly (see
`docs/architecture.md` of the project); the parameter names are ours (the converter maps the official ones).

Speed (generation and training): everything in the relational memory that does not depend on the memory is computed
for all tokens at once, so only the memory path runs in the per-token loop; generation decodes incrementally with a
cache of self-attention keys/values, cross-attention keys/values and the memory state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LogitsProcessor, PreTrainedModel, ResNetModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.utils import logging

from .configuration_r2gen_mamba import R2GenMambaConfig, R2GenMambaDecoderConfig, R2GenMambaEncoderConfig
from .mamba_block import R2GenMambaBlock
from .packed_linear import FusedPackedLinear, R2GenLinear, packed_linears

logger = logging.get_logger(__name__)

# R2Gen's LayerNorm eps (added to the std, see `R2GenLayerNorm`); the Transformer encoder has no config field for it.
R2GEN_LAYER_NORM_EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# R2Gen building blocks
# ---------------------------------------------------------------------------------------------------------------------


def r2gen_normalize(hidden_states: torch.Tensor, eps: float) -> torch.Tensor:
    """R2Gen's normalisation: `(x - mean) / (std + eps)` with the *unbiased* std and eps added to the std (not to the
    variance). Parity with the official checkpoints needs this exact form."""
    mean = hidden_states.mean(-1, keepdim=True)
    std = hidden_states.std(-1, keepdim=True)
    return (hidden_states - mean) / (std + eps)


class R2GenLayerNorm(nn.Module):
    """R2Gen's LayerNorm (parameters `gamma`, `beta`), see `r2gen_normalize`."""

    def __init__(self, hidden_size: int, eps: float = R2GEN_LAYER_NORM_EPS) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(hidden_size))
        self.beta = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.gamma * r2gen_normalize(hidden_states, self.eps) + self.beta


class R2GenAttention(nn.Module):
    """Multi-head attention with biased q/k/v/o projections (R2Gen's `MultiHeadedAttention`)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.q_proj = R2GenLinear(hidden_size, hidden_size)
        self.k_proj = R2GenLinear(hidden_size, hidden_size)
        self.v_proj = R2GenLinear(hidden_size, hidden_size)
        self.o_proj = R2GenLinear(hidden_size, hidden_size)

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:
        """`[batch, seq, hidden]` -> `[batch, heads, seq, head_dim]`."""
        batch, seq_len, _ = states.shape
        return states.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(
        self,
        query_states: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        query_group: int = 1,
    ) -> torch.Tensor:
        """Attention of `query_states` `[batch, q_len, hidden]` over projected `key`/`value` `[batch, heads, k_len,
        head_dim]`; `attention_mask` is boolean (True = may attend), broadcastable to `[batch, heads, q_len, k_len]`.
        `query_group` > 1: consecutive runs of that many batch rows share one row of `key`/`value` (which then have
        `batch / query_group` rows; beams of one study over its encoder output), and there is no mask.
        Returns `[batch, q_len, hidden]` after `o_proj`."""
        query = self.split_heads(self.q_proj(query_states))
        batch, heads, q_len, head_dim = query.shape
        if query_group > 1:
            # The group's queries become extra query positions of its shared row: the same softmax per query.
            query = query.view(batch // query_group, query_group, heads, q_len, head_dim).transpose(1, 2)
            query = query.reshape(batch // query_group, heads, query_group * q_len, head_dim)
        if attention_mask is not None:
            # R2Gen fills masked scores with -1e9, so a fully masked row attends uniformly (a boolean SDPA mask would
            # give NaN there); the minimum of the query's dtype does the same and stays finite in fp16/bf16.
            additive = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
            attention_mask = additive.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
        out = out.view(batch // query_group, heads, query_group, q_len, head_dim).permute(0, 2, 3, 1, 4)
        return self.o_proj(out.reshape(batch, q_len, heads * head_dim))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention: `[batch, seq, hidden]` -> `[batch, seq, hidden]`."""
        key = self.split_heads(self.k_proj(hidden_states))
        value = self.split_heads(self.v_proj(hidden_states))
        return self.attend(hidden_states, key, value, attention_mask)


class R2GenFeedForward(nn.Module):
    """`fc2(dropout(relu(fc1(x))))` (R2Gen's `PositionwiseFeedForward`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = R2GenLinear(hidden_size, intermediate_size)
        self.fc2 = R2GenLinear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(hidden_states))))


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """R2Gen's sinusoidal position encodings for integer `positions` `[seq]` -> `[seq, dim]` (float32, computed
    with the official table's operations, so the values are bit-identical to its `pe` buffer)."""
    div_term = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) * -(math.log(10000.0) / dim)
    )
    angles = positions.float().unsqueeze(1) * div_term  # [seq, dim / 2]
    table = torch.zeros(positions.shape[0], dim, device=positions.device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


# ---------------------------------------------------------------------------------------------------------------------
# Relational memory and memory-driven conditional layer norm (R2Gen, sections 3.2-3.3 of its paper)
# ---------------------------------------------------------------------------------------------------------------------


class R2GenMemoryMLP(nn.Module):
    """`relu(fc2(relu(fc1(x))))`: the relational memory's MLP (ReLU after both layers, as R2Gen)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = R2GenLinear(hidden_size, hidden_size)
        self.fc2 = R2GenLinear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(hidden_states))))


class R2GenRelationalMemory(nn.Module):
    """R2Gen's relational memory: `num_slots` rows of `hidden_size`, updated once per target token.

    For token embedding x_t and memory M (q = M, k = v = [M; x_t]): M' = M + MHA(q, k, v); M' = M' + MLP(M');
    gates = W(x_t) + U(tanh(M)) -> input gate i, forget gate f (sigmoid); M_t = i * tanh(M') + f * M.
    The memory after token t conditions position t.
    """

    def __init__(self, config: R2GenMambaDecoderConfig) -> None:
        super().__init__()
        self.num_slots = config.rm_num_slots
        self.hidden_size = config.hidden_size
        self.attn = R2GenAttention(config.hidden_size, config.rm_num_heads, config.dropout)
        self.mlp = R2GenMemoryMLP(config.hidden_size)
        self.W = R2GenLinear(config.hidden_size, 2 * config.hidden_size)
        self.U = R2GenLinear(config.hidden_size, 2 * config.hidden_size)
        # q/k/v of the memory rows as one packed matmul, while `R2GenMambaDecoder.packed_weights` attaches it.
        self.packed_qkv: FusedPackedLinear | None = None

    def initial_memory(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Identity rows (slot i has a 1 at dim i), zero-padded (or cut) to `hidden_size`: `[batch, slots, hidden]`."""
        memory = torch.eye(self.num_slots, max(self.num_slots, self.hidden_size), device=device, dtype=dtype)
        return memory[:, : self.hidden_size].expand(batch_size, -1, -1).contiguous()

    def forward(self, inputs: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Run the memory over `inputs` `[batch, seq, hidden]` from `memory` `[batch, slots, hidden]`.

        Returns the memory after each token, `[batch, seq, slots, hidden]`.
        """
        batch, seq_len, hidden = inputs.shape
        attn, slots, heads, head_dim = self.attn, self.num_slots, self.attn.num_heads, self.attn.head_dim
        # Everything that depends only on the tokens is computed for all of them at once; the loop keeps the memory
        # path only. k/v of [M; x_t] = [k(M); k(x_t)], so the token rows are projected here.
        # unbind (not [:, t]) so that the backward pass stacks the per-token gradients once instead of scattering each
        # into a full-size zero tensor.
        input_gates = self.W(inputs).unsqueeze(2).unbind(1)  # seq x [batch, 1, 2*hidden]
        token_keys = attn.k_proj(inputs).view(batch, seq_len, heads, 1, head_dim).unbind(1)  # seq x [b, heads, 1, d]
        token_values = attn.v_proj(inputs).view(batch, seq_len, heads, 1, head_dim).unbind(1)
        if self.packed_qkv is not None and self.packed_qkv.applies(memory):
            project_qkv = self.packed_qkv
        else:
            qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # [3*hidden, hidden]
            qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])

            def project_qkv(states: torch.Tensor) -> torch.Tensor:
                return F.linear(states, qkv_weight, qkv_bias)

        dropout = attn.dropout if self.training else 0.0

        memories = []
        for t in range(seq_len):
            qkv = project_qkv(memory).view(batch, slots, 3, heads, head_dim)
            query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each [batch, heads, slots, head_dim]
            key = torch.cat([key, token_keys[t]], dim=2)  # [batch, heads, slots + 1, head_dim]
            value = torch.cat([value, token_values[t]], dim=2)
            attended = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
            attended = attn.o_proj(attended.transpose(1, 2).reshape(batch, slots, hidden))
            next_memory = memory + attended
            next_memory = next_memory + self.mlp(next_memory)
            input_gate, forget_gate = (input_gates[t] + self.U(torch.tanh(memory))).chunk(2, dim=-1)
            memory = torch.sigmoid(input_gate) * torch.tanh(next_memory) + torch.sigmoid(forget_gate) * memory
            memories.append(memory)
        return torch.stack(memories, dim=1)


class R2GenConditionMLP(nn.Module):
    """`fc2(relu(fc1(memory)))`: maps the flattened memory (slots * hidden) to a gamma or beta offset."""

    def __init__(self, memory_size: int, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = R2GenLinear(memory_size, hidden_size)
        self.fc2 = R2GenLinear(hidden_size, hidden_size)
        self.fc1._r2gen_init = self.fc2._r2gen_init = "condition"  # xavier weights, bias 0.1 (R2Gen)

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(memory)))


class R2GenConditionalLayerNorm(nn.Module):
    """Memory-driven conditional layer norm (MCLN): `(gamma + MLP_g(m_t)) * normalize(x) + beta + MLP_b(m_t)`.

    The 6 * num_layers MCLN MLPs all read the same memory. In training each MCLN runs its own (one concatenated /
    batched matmul did not pay with autograd on CPU: measured at the paper size, batch 16 x 59 tokens, one thread,
    0.92 s forward+backward as separate matmuls, 1.33 s with the second layers batched). In CPU inference the decoder
    runs all the first layers as one packed matmul (`R2GenMambaDecoder.condition_offsets`) and passes the offsets to
    `modulate`.
    """

    def __init__(self, hidden_size: int, memory_size: int, eps: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(hidden_size))
        self.beta = nn.Parameter(torch.zeros(hidden_size))
        self.mlp_gamma = R2GenConditionMLP(memory_size, hidden_size)
        self.mlp_beta = R2GenConditionMLP(memory_size, hidden_size)
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Args: hidden_states `[batch, seq, hidden]`; memory `[batch, seq, slots*hidden]` (after each token)."""
        return self.modulate(hidden_states, self.mlp_gamma(memory), self.mlp_beta(memory))

    def modulate(
        self, hidden_states: torch.Tensor, gamma_offset: torch.Tensor, beta_offset: torch.Tensor
    ) -> torch.Tensor:
        """The norm with the MLP outputs given: `(gamma + gamma_offset) * normalize(x) + beta + beta_offset`."""
        return (self.gamma + gamma_offset) * r2gen_normalize(hidden_states, self.eps) + (self.beta + beta_offset)


# ---------------------------------------------------------------------------------------------------------------------
# Encoders: the published Mamba block (or a residual stack of them) and R2Gen's Transformer encoder
# ---------------------------------------------------------------------------------------------------------------------


class R2GenMambaEncoderLayer(nn.Module):
    """`mixer` (an `R2GenMambaBlock`), pre-normed with a residual when the encoder stacks several layers."""

    def __init__(self, config: R2GenMambaEncoderConfig, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        if residual:
            self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = R2GenMambaBlock(
            config.hidden_size,
            d_state=config.state_size,
            d_conv=config.conv_kernel,
            expand=config.expand,
            dt_rank=config.dt_rank,
            dt_min=config.time_step_min,
            dt_max=config.time_step_max,
            dt_init=config.time_step_init_scheme,
            dt_scale=config.time_step_scale,
            dt_init_floor=config.time_step_floor,
            conv_bias=config.use_conv_bias,
            bias=config.use_bias,
            use_kernels=config.use_mamba_kernels,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.residual:
            return self.mixer(hidden_states)
        return hidden_states + self.mixer(self.norm(hidden_states))


class R2GenMambaEncoder(nn.Module):
    """The Mamba encoder. One layer = the official bare `mamba_ssm.Mamba` block (no norm, no residual, no mask); more
    layers = a pre-norm residual stack with a final `norm_f`. `[batch, tokens, hidden]` -> same shape."""

    def __init__(self, config: R2GenMambaEncoderConfig) -> None:
        super().__init__()
        stacked = config.num_hidden_layers > 1
        self.layers = nn.ModuleList(
            [R2GenMambaEncoderLayer(config, residual=stacked) for _ in range(config.num_hidden_layers)]
        )
        self.norm_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon) if stacked else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        if self.norm_f is not None:
            hidden_states = self.norm_f(hidden_states)
        return hidden_states


class R2GenTransformerEncoderLayer(nn.Module):
    """R2Gen's encoder layer: `x + dropout(self_attn(norm(x)))`, then `x + dropout(ffn(norm(x)))`."""

    def __init__(self, config: R2GenMambaEncoderConfig) -> None:
        super().__init__()
        self.self_attn = R2GenAttention(config.hidden_size, config.num_attention_heads, config.dropout)
        self.feed_forward = R2GenFeedForward(config.hidden_size, config.intermediate_size, config.dropout)
        self.self_attn_norm = R2GenLayerNorm(config.hidden_size)
        self.ffn_norm = R2GenLayerNorm(config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.dropout(self.self_attn(self.self_attn_norm(hidden_states)))
        return hidden_states + self.dropout(self.feed_forward(self.ffn_norm(hidden_states)))


class R2GenTransformerEncoder(nn.Module):
    """R2Gen's Transformer encoder (the paper's baseline): pre-norm layers, no mask, final norm.
    `[batch, tokens, hidden]` -> same shape."""

    def __init__(self, config: R2GenMambaEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([R2GenTransformerEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = R2GenLayerNorm(config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm(hidden_states)


class R2GenMambaPatchEmbedding(nn.Module):
    """R2Gen's `att_embed`: Linear(visual features -> d_model), ReLU, Dropout."""

    def __init__(self, in_features: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, hidden_size)
        self.proj._r2gen_init = "default"  # the official att_embed is outside the xavier loop
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.relu(self.proj(features)))


# ---------------------------------------------------------------------------------------------------------------------
# Decoder and its cache
# ---------------------------------------------------------------------------------------------------------------------


class R2GenMambaCache:
    """Incremental-decoding state of the decoder, per sequence of the batch (reordered with beams).

    Holds, per decoder layer, the self-attention keys/values of the tokens seen so far and the cross-attention
    keys/values of the encoder output (computed once), plus the relational memory after the last token and the
    key-padding mask of the tokens seen so far.
    """

    is_compileable = False

    def __init__(self, num_layers: int) -> None:
        self.self_keys: list[torch.Tensor | None] = [None] * num_layers  # [batch, heads, seen, head_dim]
        self.self_values: list[torch.Tensor | None] = [None] * num_layers
        self.cross_keys: list[torch.Tensor | None] = [None] * num_layers  # [batch, heads, tokens, head_dim]
        self.cross_values: list[torch.Tensor | None] = [None] * num_layers
        self.cross_group = 1  # runs of this many batch rows share one cross key/value row (beams of a study)
        self.memory: torch.Tensor | None = None  # [batch, slots, hidden]
        self.key_mask: torch.Tensor | None = None  # [batch, seen] bool

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of decoder tokens already processed."""
        keys = self.self_keys[layer_idx]
        return 0 if keys is None else keys.shape[2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select the batch rows `beam_idx` (beam search). Cross-attention keys/values are left alone: beams of one
        study share the encoder output and `beam_idx` never crosses studies."""

        def select(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.index_select(0, beam_idx.to(tensor.device))

        self.self_keys = [select(keys) for keys in self.self_keys]
        self.self_values = [select(values) for values in self.self_values]
        self.memory = select(self.memory)
        self.key_mask = select(self.key_mask)


class R2GenMambaDecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder output and FFN, each `x + dropout(f(norm(x, m_t)))`
    with MCLN (or R2Gen's plain LayerNorm when `use_mcln=False`)."""

    def __init__(self, config: R2GenMambaDecoderConfig) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = R2GenAttention(hidden, config.num_attention_heads, config.dropout)
        self.cross_attn = R2GenAttention(hidden, config.num_attention_heads, config.dropout)
        self.feed_forward = R2GenFeedForward(hidden, config.intermediate_size, config.dropout)
        if config.use_mcln:
            memory_size = config.rm_num_slots * hidden
            self.self_attn_norm = R2GenConditionalLayerNorm(hidden, memory_size, eps)
            self.cross_attn_norm = R2GenConditionalLayerNorm(hidden, memory_size, eps)
            self.ffn_norm = R2GenConditionalLayerNorm(hidden, memory_size, eps)
        else:
            self.self_attn_norm = R2GenLayerNorm(hidden, eps)
            self.cross_attn_norm = R2GenLayerNorm(hidden, eps)
            self.ffn_norm = R2GenLayerNorm(hidden, eps)
        self.dropout = nn.Dropout(config.dropout)

    @staticmethod
    def _norm(
        norm: nn.Module,
        hidden_states: torch.Tensor,
        memory: torch.Tensor | None,
        offsets: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        if offsets is not None:
            return norm.modulate(hidden_states, *offsets)
        return norm(hidden_states) if memory is None else norm(hidden_states, memory)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        self_attn_mask: torch.Tensor | None,
        memory: torch.Tensor | None,
        cache: R2GenMambaCache | None,
        layer_idx: int,
        condition_offsets: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        cross_group: int = 1,
    ) -> torch.Tensor:
        """Args: hidden_states `[batch, seq, hidden]` (new tokens only when a cache holds the earlier ones);
        encoder_hidden_states `[batch, tokens, hidden]`; self_attn_mask boolean `[batch, 1, seq, seen + seq]` or
        None; memory: the relational memory after each token `[batch, seq, slots*hidden]` for MCLN, or None;
        condition_offsets: the (gamma, beta) MLP outputs of this layer's three MCLNs, already computed from `memory`
        (see `R2GenMambaDecoder.condition_offsets`), or None; cross_group: runs of this many batch rows have the same
        encoder hidden states (see `repeated_row_group`), whose cross keys/values are computed and attended once."""
        offsets = condition_offsets if condition_offsets is not None else (None, None, None)

        normed = self._norm(self.self_attn_norm, hidden_states, memory, offsets[0])
        key = self.self_attn.split_heads(self.self_attn.k_proj(normed))
        value = self.self_attn.split_heads(self.self_attn.v_proj(normed))
        if cache is not None:
            if cache.self_keys[layer_idx] is not None:
                key = torch.cat([cache.self_keys[layer_idx], key], dim=2)
                value = torch.cat([cache.self_values[layer_idx], value], dim=2)
            cache.self_keys[layer_idx], cache.self_values[layer_idx] = key, value
        hidden_states = hidden_states + self.dropout(self.self_attn.attend(normed, key, value, self_attn_mask))

        if cache is not None and cache.cross_keys[layer_idx] is not None:
            key, value = cache.cross_keys[layer_idx], cache.cross_values[layer_idx]
        else:
            shared = encoder_hidden_states[::cross_group] if cross_group > 1 else encoder_hidden_states
            key = self.cross_attn.split_heads(self.cross_attn.k_proj(shared))
            value = self.cross_attn.split_heads(self.cross_attn.v_proj(shared))
            if cache is not None:
                cache.cross_keys[layer_idx], cache.cross_values[layer_idx] = key, value
        normed = self._norm(self.cross_attn_norm, hidden_states, memory, offsets[1])
        attended = self.cross_attn.attend(normed, key, value, query_group=cross_group)
        hidden_states = hidden_states + self.dropout(attended)

        normed = self._norm(self.ffn_norm, hidden_states, memory, offsets[2])
        return hidden_states + self.dropout(self.feed_forward(normed))


class R2GenMambaDecoder(nn.Module):
    """R2Gen's memory-driven Transformer decoder: sqrt(d)-scaled embeddings + sinusoidal positions, relational memory,
    layers with MCLN, final (quirky) LayerNorm. Returns hidden states; the LM head lives outside."""

    def __init__(self, config: R2GenMambaDecoderConfig, pad_token_id: int = 0) -> None:
        super().__init__()
        self.config = config
        self.pad_token_id = pad_token_id
        self.hidden_size = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # The memory reaches the decoder only through MCLN: without MCLN it would be dead weight, so it is not built.
        if config.use_relational_memory and not config.use_mcln:
            logger.warning_once(
                "use_relational_memory=True has no effect with use_mcln=False (the memory conditions the decoder only "
                "through MCLN); the relational memory is not built."
            )
        self.relational_memory = R2GenRelationalMemory(config) if config.use_mcln else None
        self.layers = nn.ModuleList([R2GenMambaDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = R2GenLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        # The first layers of all MCLN MLPs as one packed matmul, while `packed_weights` attaches it.
        self.packed_condition_fc1: FusedPackedLinear | None = None

    def condition_mlps(self) -> list[R2GenConditionMLP]:
        """All MCLN MLPs, in layer order, each layer's (self-attention, cross-attention, FFN) norms, gamma before
        beta; empty without MCLN."""
        norms = [
            norm for layer in self.layers for norm in (layer.self_attn_norm, layer.cross_attn_norm, layer.ffn_norm)
        ]
        return [
            mlp
            for norm in norms
            if isinstance(norm, R2GenConditionalLayerNorm)
            for mlp in (norm.mlp_gamma, norm.mlp_beta)
        ]

    @contextlib.contextmanager
    def packed_weights(self, dtype: torch.dtype = torch.float32) -> Iterator[bool]:
        """CPU float32 inference with oneDNN-packed `dtype` weights for the block (see `packed_linear`), plus two
        fusions of linears that read the same input: the relational memory's q/k/v, and the first layers of all MCLN
        MLPs. Yields whether packing applies (otherwise the block runs the plain path). Re-entrant."""
        fc1s = [mlp.fc1 for mlp in self.condition_mlps()]  # only ever run through the fused copy: not packed alone
        rm_query = [self.relational_memory.attn.q_proj] if self.relational_memory is not None else []
        with packed_linears([self], skip=fc1s + rm_query, dtype=dtype) as packed:
            attach = packed and self.relational_memory is not None and self.packed_condition_fc1 is None
            try:
                if attach:
                    attn = self.relational_memory.attn
                    qkv = FusedPackedLinear([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
                    condition_fc1 = FusedPackedLinear(fc1s, dtype)
                    self.relational_memory.packed_qkv, self.packed_condition_fc1 = qkv, condition_fc1
                yield packed
            finally:
                if attach:
                    self.relational_memory.packed_qkv = self.packed_condition_fc1 = None

    def condition_offsets(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The (gamma, beta) offsets of every MCLN (order of `condition_mlps`, paired per norm) from the memory
        `[batch, seq, slots*hidden]`, with the first MLP layers as one packed matmul; None outside `packed_weights`
        or where the packed path does not apply (then each MCLN computes its own)."""
        fused = self.packed_condition_fc1
        if fused is None or not fused.applies(memory):
            return None
        hidden = fused(memory, relu=True).split(fused.split_sizes, dim=-1)
        offsets = [mlp.fc2(chunk) for mlp, chunk in zip(self.condition_mlps(), hidden)]
        return list(zip(offsets[0::2], offsets[1::2]))

    def forward(
        self,
        input_ids: torch.LongTensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: R2GenMambaCache | None = None,
    ) -> torch.Tensor:
        """
        Args:
            input_ids: `[batch, seq]` decoder input ids (only the new ones when `cache` holds earlier tokens).
            encoder_hidden_states: `[batch, tokens, hidden]`.
            attention_mask: `[batch, seen + seq]`, 1 for keys that may be attended (a causal mask is always added).
                None: R2Gen's `seq_mask`, i.e. keys whose id is the pad id are masked, except position 0.
            cache: filled in place when given.
        Returns: `[batch, seq, hidden]`.
        """
        batch, seq_len = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if past + seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"decoder sequence of {past + seq_len} tokens exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        positions = torch.arange(past, past + seq_len, device=input_ids.device)
        embeddings = self.embed_tokens(input_ids) * math.sqrt(self.hidden_size)
        embeddings = embeddings + sinusoidal_positions(positions, self.hidden_size).to(embeddings.dtype)
        # The official decoder embeds the tokens twice (memory input, layer input): two independent dropout masks.
        hidden_states = self.dropout(embeddings)

        memory_per_token = None
        if self.relational_memory is not None:
            if cache is not None and cache.memory is not None:
                memory = cache.memory
            else:
                memory = self.relational_memory.initial_memory(batch, embeddings.device, embeddings.dtype)
            memories = self.relational_memory(self.dropout(embeddings), memory)  # [batch, seq, slots, hidden]
            if cache is not None:
                cache.memory = memories[:, -1]
            memory_per_token = memories.flatten(2)  # [batch, seq, slots*hidden]

        self_attn_mask = self._self_attention_mask(input_ids, attention_mask, cache, past)
        offsets = self.condition_offsets(memory_per_token) if memory_per_token is not None else None
        if cache is not None and cache.cross_keys[0] is not None:
            cross_group = cache.cross_group
        else:
            # Beam search repeats each study's encoder output once per beam: attend to one copy (inference only).
            cross_group = 1 if torch.is_grad_enabled() else repeated_row_group(encoder_hidden_states)
            if cache is not None:
                cache.cross_group = cross_group
        for idx, layer in enumerate(self.layers):
            layer_offsets = offsets[3 * idx : 3 * idx + 3] if offsets is not None else None
            hidden_states = layer(
                hidden_states,
                encoder_hidden_states,
                self_attn_mask,
                memory_per_token,
                cache,
                idx,
                layer_offsets,
                cross_group,
            )
        return self.norm(hidden_states)

    def _self_attention_mask(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        cache: R2GenMambaCache | None,
        past: int,
    ) -> torch.Tensor | None:
        """Boolean mask `[batch, 1, seq, past + seq]`, True where the key mask and causality allow attention, or None
        when nothing is masked (one new token attending to an all-visible prefix)."""
        batch, seq_len = input_ids.shape
        total = past + seq_len
        if attention_mask is not None:
            if attention_mask.shape != (batch, total):
                raise ValueError(
                    f"decoder_attention_mask must have shape [batch, seen + new tokens] = {[batch, total]}, "
                    f"got {list(attention_mask.shape)}"
                )
            key_mask = attention_mask.bool()
        else:
            positions = torch.arange(past, total, device=input_ids.device)
            new_mask = (input_ids != self.pad_token_id) | (positions == 0)
            past_mask = cache.key_mask if cache is not None else None
            key_mask = new_mask if past_mask is None else torch.cat([past_mask, new_mask], dim=1)
        if cache is not None:
            cache.key_mask = key_mask
        if seq_len == 1 and bool(key_mask.all()):
            return None
        query_positions = torch.arange(past, total, device=input_ids.device).unsqueeze(1)
        causal = torch.arange(total, device=input_ids.device).unsqueeze(0) <= query_positions  # [seq, total]
        return (causal.unsqueeze(0) & key_mask.unsqueeze(1)).unsqueeze(1)  # [batch, 1, seq, total]


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face models
# ---------------------------------------------------------------------------------------------------------------------


def repeated_row_group(states: torch.Tensor) -> int:
    """The largest g such that the batch rows of `states` come in consecutive runs of g identical rows (as beam search
    expands each study's encoder output), or 1. Exact: runs are compared element by element."""
    batch = states.shape[0]
    group = 1
    while group < batch and torch.equal(states[group], states[0]):
        group += 1
    if group == 1 or batch % group:
        return 1
    runs = states.view(batch // group, group, *states.shape[1:])
    return group if torch.equal(runs, runs[:, :1].expand_as(runs)) else 1


def shift_tokens_right(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.LongTensor:
    """Decoder inputs from targets: `[start] + labels[:, :-1]`, with -100 replaced by the pad id."""
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


def _default_linear_init(module: nn.Linear) -> None:
    """PyTorch's own `nn.Linear` initialisation (what the official code leaves on `att_embed` and `logit`)."""
    init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if module.bias is not None:
        bound = 1 / math.sqrt(module.weight.shape[1])
        init.uniform_(module.bias, -bound, bound)


def _xavier_linear_init(module: nn.Linear) -> None:
    """R2Gen re-initialises every parameter with dim > 1 by xavier-uniform; biases keep PyTorch's default."""
    init.xavier_uniform_(module.weight)
    if module.bias is not None:
        bound = 1 / math.sqrt(module.weight.shape[1])
        init.uniform_(module.bias, -bound, bound)


class R2GenMambaPreTrainedModel(PreTrainedModel):
    config_class = R2GenMambaConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["R2GenMambaDecoderLayer", "R2GenMambaEncoderLayer", "R2GenTransformerEncoderLayer"]
    # The loss is R2Gen's per-batch mean; the Trainer scales it for gradient accumulation itself.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialisation as the official code: xavier-uniform for every matrix of the encoder/decoder Transformer
        parts (biases: PyTorch default), MCLN MLP biases 0.1, `mamba_ssm`'s own init for the Mamba block (its S4D
        `A_log` and `D` are *not* overwritten, unlike the official blanket xavier loop), PyTorch defaults for the
        patch embedding and the LM head. The ResNet keeps its own init (a sub-`PreTrainedModel`).

        transformers only visits modules that own parameters, children first; containers without parameters are
        skipped, so linears say which scheme they need through `_r2gen_init` (set where they are built)."""
        if isinstance(module, nn.Linear):
            scheme = getattr(module, "_r2gen_init", "xavier")
            if scheme == "xavier":
                _xavier_linear_init(module)
            elif scheme == "condition":
                init.xavier_uniform_(module.weight)
                init.constant_(module.bias, 0.1)
            else:
                _default_linear_init(module)
        elif isinstance(module, nn.Embedding):
            init.xavier_uniform_(module.weight)
        elif isinstance(module, (R2GenLayerNorm, R2GenConditionalLayerNorm)):
            init.ones_(module.gamma)
            init.zeros_(module.beta)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, R2GenMambaBlock):
            # Visited after its linears (which got the generic rule): back to mamba_ssm's init for the whole block.
            for child in (module.in_proj, module.conv1d, module.x_proj, module.dt_proj, module.out_proj):
                child.reset_parameters()  # torch's init functions, guarded against loaded weights by transformers
            special = (module.A_log, module.D, module.dt_proj.weight, module.dt_proj.bias)
            if not any(getattr(param, "_is_hf_initialized", False) for param in special):
                module.reset_parameters()


class _ImageEncoder:
    """What `generate()` calls as "the encoder": pixel values -> encoder hidden states. A plain callable (not an
    `nn.Module`) so the modules it uses are not registered twice."""

    main_input_name = "pixel_values"

    def __init__(self, model: R2GenMambaModel) -> None:
        self.model = model

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.model.encode_images(pixel_values))

    __call__ = forward


class R2GenMambaModel(R2GenMambaPreTrainedModel):
    """Visual extractor (ResNet), patch embedding, encoder and memory-driven decoder; returns decoder hidden states."""

    def __init__(self, config: R2GenMambaConfig) -> None:
        super().__init__(config)
        self.visual_extractor = ResNetModel(config.vision_config)
        self.patch_embed = R2GenMambaPatchEmbedding(config.visual_feature_size, config.d_model, config.patch_dropout)
        if config.encoder_type == "mamba":
            self.encoder = R2GenMambaEncoder(config.encoder_config)
        else:
            self.encoder = R2GenTransformerEncoder(config.encoder_config)
        self.decoder = R2GenMambaDecoder(config.decoder_config, pad_token_id=config.pad_token_id)
        self.post_init()

    def get_encoder(self, modality: str | None = None) -> _ImageEncoder:
        return _ImageEncoder(self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.decoder.embed_tokens = value

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        views, channels = self.config.num_views, self.config.vision_config.num_channels
        expected = f"pixel_values: expected shape [batch, views={views}, channels={channels}, height, width]"
        if views == 1:
            expected += " (or [batch, channels, height, width])"
        if pixel_values.ndim == 4 and views == 1:
            pixel_values = pixel_values.unsqueeze(1)
        if pixel_values.ndim != 5:
            raise ValueError(f"{expected}, got a {pixel_values.ndim}-D tensor of shape {list(pixel_values.shape)}")
        if pixel_values.shape[1] != views:
            raise ValueError(
                f"{expected}: the model takes {views} view(s) per study, got {pixel_values.shape[1]} "
                f"(shape {list(pixel_values.shape)})"
            )
        if pixel_values.shape[2] != channels:
            raise ValueError(
                f"{expected}: expected {channels} channels, got {pixel_values.shape[2]} "
                f"(shape {list(pixel_values.shape)})"
            )
        return pixel_values

    def visual_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ResNet's last stage for every view: `[batch, views, 3, H, W]` -> `[batch * views, C, h, w]`.

        On the CPU the images go in channels-last layout, in which oneDNN runs the ResNet-101 faster (measured on the
        2-core benchmark machine: forward of 8 images 0.77 -> 0.63 s, forward+backward of 32 images 10.1 -> 8.2 s;
        outputs equal to fp32 rounding)."""
        images = self._check_pixel_values(pixel_values).flatten(0, 1)
        if images.device.type == "cpu":
            images = images.contiguous(memory_format=torch.channels_last)
        return self.visual_extractor(images).last_hidden_state

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[batch, views, 3, H, W]` -> encoder hidden states `[batch, views * h * w, d_model]` (98 tokens for 2
        views at 224 px): each view's last ResNet stage flattened to h*w patch tokens, the views concatenated."""
        # `visual_features` checks the shape; the batch is dim 0 of a 5-D or (one view) 4-D tensor alike.
        return self.encode_visual_features(self.visual_features(pixel_values), pixel_values.shape[0])

    def encode_visual_features(self, features: torch.Tensor, batch_size: int) -> torch.Tensor:
        """`visual_features` output `[batch * views, C, h, w]` -> encoder hidden states `[batch, views * h * w,
        d_model]` (patch tokens, views concatenated in order, patch embedding, encoder)."""
        tokens = features.flatten(2).transpose(1, 2)  # [batch*views, h*w, C]
        tokens = tokens.reshape(batch_size, -1, tokens.shape[2])  # views concatenated
        return self.encoder(self.patch_embed(tokens))

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: R2GenMambaCache | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqModelOutput | tuple:
        """
        Args:
            pixel_values: `[batch, views, 3, H, W]` (4-D accepted for 1-view models); not needed with encoder_outputs.
            decoder_input_ids: `[batch, seq]` (new tokens only when `cache` holds earlier ones).
            decoder_attention_mask: `[batch, seen + seq]`; see `R2GenMambaDecoder.forward`.
            encoder_outputs: precomputed encoder hidden states `[batch, tokens, d_model]` (`BaseModelOutput`/tuple).
            cache: an `R2GenMambaCache` to continue from; `use_cache=True` creates one when None.
        Returns: `Seq2SeqModelOutput` with `last_hidden_state` `[batch, seq, d_model]`, `cache`,
            `encoder_last_hidden_state`.
        """
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids are required (or pass labels to R2GenMambaForConditionalGeneration)")
        if encoder_outputs is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or encoder_outputs")
            encoder_hidden_states = self.encode_images(pixel_values)
        elif isinstance(encoder_outputs, (tuple, list)):
            encoder_hidden_states = encoder_outputs[0]
        else:
            encoder_hidden_states = encoder_outputs.last_hidden_state
        if cache is None and use_cache:
            cache = R2GenMambaCache(len(self.decoder.layers))
        hidden_states = self.decoder(decoder_input_ids, encoder_hidden_states, decoder_attention_mask, cache)
        if return_dict is False:
            return tuple(v for v in (hidden_states, cache, encoder_hidden_states) if v is not None)
        return Seq2SeqModelOutput(
            last_hidden_state=hidden_states, cache=cache, encoder_last_hidden_state=encoder_hidden_states
        )

    def load_vision_weights(self, name_or_path: str, **kwargs: Any) -> None:
        """Copy the weights of a `transformers` `ResNetModel` (a Hub id such as `"microsoft/resnet-101"` when online,
        or a local folder) into the visual extractor. The architectures must match exactly (ValueError otherwise);
        the source is recorded in `config.vision_model_name_or_path`. `kwargs` go to `ResNetModel.from_pretrained`."""
        source = ResNetModel.from_pretrained(name_or_path, **kwargs)
        fields = ("num_channels", "embedding_size", "hidden_sizes", "depths", "layer_type")
        fields += ("downsample_in_first_stage", "downsample_in_bottleneck")
        different = [
            f"{f}: expected {getattr(self.config.vision_config, f, None)!r}, got {getattr(source.config, f, None)!r}"
            for f in fields
            if getattr(source.config, f, None) != getattr(self.config.vision_config, f, None)
        ]
        if different:
            raise ValueError(f"ResNet at {name_or_path!r} does not match the visual extractor: {'; '.join(different)}")
        target = self.visual_extractor.state_dict()
        state = source.state_dict()
        missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
        mismatched = [k for k in target if k in state and state[k].shape != target[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"ResNet at {name_or_path!r} does not match the visual extractor: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}"
            )
        self.visual_extractor.load_state_dict(state, strict=True)
        self.config.vision_model_name_or_path = name_or_path
        logger.info(f"Loaded visual extractor weights from {name_or_path}")


# The published decoding setup (architecture.md): beam 3, up to 60 tokens after the start token (IU X-Ray); the
# official beam search ranks finished beams by summed log-prob, i.e. no length penalty. `max_length` counts the start
# token, hence 61 (checked against the official decoder by the converter's parity run).
GENERATION_DEFAULTS = {"num_beams": 3, "max_length": 61, "length_penalty": 0.0}


class R2GenMambaForConditionalGeneration(R2GenMambaPreTrainedModel, GenerationMixin):
    """R2Gen-Mamba with its LM head: `log_softmax(logits)` are R2Gen's log-probs; `loss` is R2Gen's masked NLL."""

    def __init__(self, config: R2GenMambaConfig) -> None:
        super().__init__(config)
        self.model = R2GenMambaModel(config)
        self.lm_head = R2GenLinear(config.d_model, config.vocab_size)
        self.lm_head._r2gen_init = "default"  # the official `logit` is outside the xavier loop
        self.post_init()
        for name, value in GENERATION_DEFAULTS.items():
            setattr(self.generation_config, name, value)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            setattr(self.generation_config, name, getattr(config, name))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The decoder brings its own cache (attention keys/values plus the relational memory), made in `forward`.
        return False

    def get_encoder(self, modality: str | None = None) -> _ImageEncoder:
        return self.model.get_encoder(modality)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def load_vision_weights(self, name_or_path: str, **kwargs: Any) -> None:
        """See `R2GenMambaModel.load_vision_weights`."""
        self.model.load_vision_weights(name_or_path, **kwargs)

    @contextlib.contextmanager
    def packed_cpu_weights(self, dtype: torch.dtype = torch.float32) -> Iterator[bool]:
        """Decoder and LM head on oneDNN-packed weights for the block, when the model is float32 on the CPU (yields
        whether packing applies; see `r2gen_mamba.packed_linear`). `generate()` enters it on every call; wrap a loop
        of `generate()` calls in it to pack once for all of them. Do not change the weights inside the block: the
        packed copies would not follow.

        `dtype=torch.bfloat16` (opt-in, CPUs with bfloat16 support): bfloat16 weight copies, half the bytes a decode
        step streams; the linears' inputs are rounded to bfloat16, so reports can differ from float32 decoding."""
        with self.model.decoder.packed_weights(dtype) as packed, packed_linears([self.lm_head], dtype=dtype):
            yield packed

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`GenerationMixin.generate`, run inside `packed_cpu_weights()` (a no-op off the CPU / float32)."""
        with self.packed_cpu_weights():
            return super().generate(*args, **kwargs)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: R2GenMambaCache | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        cache: R2GenMambaCache | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput | tuple:
        """
        Args:
            pixel_values: `[batch, views, 3, H, W]` (a 4-D `[batch, 3, H, W]` is accepted when `num_views == 1`).
            labels: `[batch, seq]` targets with -100 on padding (R2Gen encoding[1:]).
            decoder_input_ids: `[batch, seq]`; when omitted, `labels` shifted right with start id 0 (-100 -> pad).
            decoder_attention_mask: `[batch, seen + seq]` key mask; None = R2Gen's `seq_mask` (keys with the pad id
                masked, except position 0). A causal mask is always applied.
            encoder_outputs: precomputed encoder hidden states (as `generate()` passes them).
            cache / past_key_values: an `R2GenMambaCache` (`cache` is the name `generate()` uses in transformers 5).
            use_cache: return a cache for incremental decoding.
        Returns: `Seq2SeqLMOutput` with `loss` (mean NLL over labels != -100), `logits` `[batch, seq, vocab]`,
            `cache`, `encoder_last_hidden_state`.
        """
        cache = cache if cache is not None else past_key_values
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(
                labels, self.config.decoder_start_token_id, self.config.pad_token_id
            )
        outputs = self.model(
            pixel_values=pixel_values,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            use_cache=use_cache,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            # R2Gen's masked NLL of log_softmax(logits), averaged over the target positions that are not padding.
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), ignore_index=-100
            )
        if return_dict is False:
            output = (logits, outputs.cache, outputs.encoder_last_hidden_state)
            output = tuple(v for v in output if v is not None)
            return ((loss,) + output) if loss is not None else output
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
        )

    def _prepare_special_tokens(self, generation_config, kwargs_has_attention_mask=None, device=None, batch_size=None):
        # pad == eos == 0 makes transformers warn about a missing text attention mask; the inputs here are images
        # (nothing to pad), so that warning does not apply.
        return super()._prepare_special_tokens(generation_config, None, device=device, batch_size=batch_size)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        # R2Gen generates with the causal mask only (no padding mask on the prefix): an all-ones key mask says so.
        if kwargs.get("decoder_attention_mask") is None:
            kwargs["decoder_attention_mask"] = torch.ones_like(input_ids)
        return super().prepare_inputs_for_generation(input_ids, **kwargs)


class R2GenSoftTrigramPenaltyLogitsProcessor(LogitsProcessor):
    """The official greedy decoder's soft trigram block (R2Gen's `block_trigrams`, architecture.md "Generation").

    With (a, b) the last two generated tokens, each earlier occurrence of a trigram (a, b, c) in the same sequence
    lowers the score of c by `penalty` (R2Gen: 0.693 * 2). The decoder start token is not part of the trigrams. The
    official code applies it to log-probs; for greedy decoding that is the same argmax as applying it to logits.
    Official beam search applies no penalty, so use it with `num_beams=1`: `model.generate(..., num_beams=1,
    logits_processor=LogitsProcessorList([R2GenSoftTrigramPenaltyLogitsProcessor()]))`.
    """

    def __init__(self, penalty: float = 0.693 * 2.0, num_start_tokens: int = 1) -> None:
        self.penalty = penalty
        self.num_start_tokens = num_start_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.num_start_tokens :]  # [batch, generated]
        length = generated.shape[1]
        if length < 3:
            return scores
        # Earlier positions p whose two preceding tokens equal the last two tokens: the token at p gets penalised.
        last_two = generated[:, -2:]  # [batch, 2]
        matches = (generated[:, : length - 2] == last_two[:, :1]) & (generated[:, 1 : length - 1] == last_two[:, 1:])
        followers = generated[:, 2:]  # [batch, generated - 2], the token after each candidate pair
        penalty = torch.zeros_like(scores)
        penalty.scatter_add_(1, followers, matches.to(scores.dtype) * self.penalty)
        return scores - penalty


__all__ = [
    "R2GenMambaCache",
    "R2GenMambaDecoder",
    "R2GenMambaEncoder",
    "R2GenMambaForConditionalGeneration",
    "R2GenMambaModel",
    "R2GenMambaPreTrainedModel",
    "R2GenSoftTrigramPenaltyLogitsProcessor",
    "R2GenTransformerEncoder",
]
