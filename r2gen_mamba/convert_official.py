"""Convert an official R2Gen-Mamba checkpoint (`model_best.pth`) into a Hugging Face model folder.

`r2gen-mamba convert-official --checkpoint model_best.pth --annotation annotation.json --dataset iu_xray --output DIR`

The official code (GitHub `YonghengSun1997/R2Gen-Mamba`, built on `zhjohnchan/R2Gen`) saves
`{"epoch", "state_dict", "optimizer", "monitor_best"}`. Every key of `state_dict` is mapped by the rules in
`KEY_RULES` (strictly: a key no rule maps, a key the model needs but the checkpoint lacks, or a shape mismatch is an
error naming the key). The architecture is read from the tensor shapes (vocabulary, widths, decoder depth, ResNet
layout); only the attention head counts cannot be seen in shapes and come from flags (default 8, as the official
scripts). The vocabulary is rebuilt from the annotation with the official tokenizer rules and must have exactly the
checkpoint's size. The folder (model in safetensors, processor, generation config) is written to a temporary
directory next to `--output` and renamed at the end, so a failed conversion never leaves a partial folder.

Checkpoints of the original R2Gen (`zhjohnchan/R2Gen`: the same model with a 3-layer Transformer encoder) convert
too, to `encoder_type="transformer"`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.utils import logging

from .configuration_r2gen_mamba import R2GenMambaConfig, R2GenMambaEncoderConfig, resnet101_config
from .modeling_r2gen_mamba import GENERATION_DEFAULTS, R2GenMambaForConditionalGeneration, sinusoidal_positions

logger = logging.get_logger(__name__)

# Per-dataset settings of the official scripts (architecture.md, "Recipe").
DATASET_DEFAULTS: dict[str, dict[str, int]] = {
    "iu_xray": {"num_views": 2, "max_length": 60, "threshold": 3},
    "mimic_cxr": {"num_views": 1, "max_length": 100, "threshold": 10},
}

# The sinusoidal position table of the official decoder: a buffer, not a weight. It is checked and dropped.
POSITION_TABLE_KEY = "encoder_decoder.model.tgt_embed.1.pe"


class ConversionError(ValueError):
    """The checkpoint does not fit the R2Gen-Mamba layout (the message names the key and what was expected)."""


# --------------------------------------------------------------------------------------------------------------
# Key mapping. A rule is a pair of templates with `{placeholders}`; both directions use the same table, so the
# converter can name the *official* key that is missing as well as the official key that maps nowhere.
# --------------------------------------------------------------------------------------------------------------

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_WB = ("weight", "bias")
_MAMBA = (
    "in_proj.weight",
    "in_proj.bias",
    "conv1d.weight",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
    "out_proj.bias",
)


@dataclass(frozen=True)
class _Slot:
    """How one placeholder's official text becomes ours: an integer offset, or a lookup table."""

    offset: int | None = None
    table: Mapping[str, str] = field(default_factory=dict)

    @property
    def official_pattern(self) -> str:
        return r"\d+" if self.offset is not None else "|".join(re.escape(k) for k in self.table)

    @property
    def hf_pattern(self) -> str:
        return r"\d+" if self.offset is not None else "|".join(re.escape(v) for v in self.table.values())

    def to_hf(self, text: str) -> str:
        return str(int(text) - self.offset) if self.offset is not None else self.table[text]

    def to_official(self, text: str) -> str:
        if self.offset is not None:
            return str(int(text) + self.offset)
        return {v: k for k, v in self.table.items()}[text]


def _same(*names: str) -> dict[str, str]:
    return {name: name for name in names}


_SLOTS: dict[str, _Slot] = {
    "i": _Slot(offset=0),  # a decoder layer / block index, unchanged
    "block": _Slot(offset=0),
    "stage": _Slot(offset=4),  # torchvision children 4..7 are layer1..layer4 (0 = conv1, 1 = bn1, 2 = relu, 3 = pool)
    "conv": _Slot(offset=1),  # conv1/bn1 -> layer.0, conv2/bn2 -> layer.1, conv3/bn3 -> layer.2
    "bn": _Slot(table=_same(*_BN)),
    "wb": _Slot(table=_same(*_WB)),
    "gb": _Slot(table=_same("gamma", "beta")),
    "gate": _Slot(table=_same("W", "U")),
    "mamba": _Slot(table=_same(*_MAMBA)),
    "proj": _Slot(table={"0": "q_proj", "1": "k_proj", "2": "v_proj", "3": "o_proj"}),
    "attn": _Slot(table={"self_attn": "self_attn", "src_attn": "cross_attn"}),
    "ffn": _Slot(table={"w_1": "fc1", "w_2": "fc2"}),
    "mlp": _Slot(table={"0": "fc1", "2": "fc2"}),
    "cond": _Slot(table=_same("mlp_gamma", "mlp_beta")),
    "norm": _Slot(table={"0": "self_attn_norm", "1": "cross_attn_norm", "2": "ffn_norm"}),
    "enorm": _Slot(table={"0": "self_attn_norm", "1": "ffn_norm"}),
}

_VE = "visual_extractor.model"
_HVE = "model.visual_extractor"
_ENC = "encoder_decoder.model.encoder"
_DEC = "encoder_decoder.model.decoder"
_HDEC = "model.decoder"
_RM = "encoder_decoder.model.rm"
_HRM = "model.decoder.relational_memory"

# (official template, our template)
KEY_RULES: list[tuple[str, str]] = [
    # torchvision ResNet children -> transformers ResNetModel
    (f"{_VE}.0.weight", f"{_HVE}.embedder.embedder.convolution.weight"),
    (f"{_VE}.1.{{bn}}", f"{_HVE}.embedder.embedder.normalization.{{bn}}"),
    (
        f"{_VE}.{{stage}}.{{block}}.conv{{conv}}.weight",
        f"{_HVE}.encoder.stages.{{stage}}.layers.{{block}}.layer.{{conv}}.convolution.weight",
    ),
    (
        f"{_VE}.{{stage}}.{{block}}.bn{{conv}}.{{bn}}",
        f"{_HVE}.encoder.stages.{{stage}}.layers.{{block}}.layer.{{conv}}.normalization.{{bn}}",
    ),
    (
        f"{_VE}.{{stage}}.{{block}}.downsample.0.weight",
        f"{_HVE}.encoder.stages.{{stage}}.layers.{{block}}.shortcut.convolution.weight",
    ),
    (
        f"{_VE}.{{stage}}.{{block}}.downsample.1.{{bn}}",
        f"{_HVE}.encoder.stages.{{stage}}.layers.{{block}}.shortcut.normalization.{{bn}}",
    ),
    # att_embed = Sequential(Linear, ReLU, Dropout)
    ("encoder_decoder.att_embed.0.{wb}", "model.patch_embed.proj.{wb}"),
    # the bare mamba_ssm.Mamba block
    ("encoder_decoder.model.encoder.{mamba}", "model.encoder.layers.0.mixer.{mamba}"),
    # or, in an original R2Gen checkpoint, its Transformer encoder
    (f"{_ENC}.layers.{{i}}.self_attn.linears.{{proj}}.{{wb}}", "model.encoder.layers.{i}.self_attn.{proj}.{wb}"),
    (f"{_ENC}.layers.{{i}}.feed_forward.{{ffn}}.{{wb}}", "model.encoder.layers.{i}.feed_forward.{ffn}.{wb}"),
    (f"{_ENC}.layers.{{i}}.sublayer.{{enorm}}.norm.{{gb}}", "model.encoder.layers.{i}.{enorm}.{gb}"),
    (f"{_ENC}.norm.{{gb}}", "model.encoder.norm.{gb}"),
    # decoder
    ("encoder_decoder.model.tgt_embed.0.lut.weight", f"{_HDEC}.embed_tokens.weight"),
    (f"{_DEC}.layers.{{i}}.{{attn}}.linears.{{proj}}.{{wb}}", f"{_HDEC}.layers.{{i}}.{{attn}}.{{proj}}.{{wb}}"),
    (f"{_DEC}.layers.{{i}}.feed_forward.{{ffn}}.{{wb}}", f"{_HDEC}.layers.{{i}}.feed_forward.{{ffn}}.{{wb}}"),
    (f"{_DEC}.layers.{{i}}.sublayer.{{norm}}.norm.{{gb}}", f"{_HDEC}.layers.{{i}}.{{norm}}.{{gb}}"),
    (
        f"{_DEC}.layers.{{i}}.sublayer.{{norm}}.norm.{{cond}}.{{mlp}}.{{wb}}",
        f"{_HDEC}.layers.{{i}}.{{norm}}.{{cond}}.{{mlp}}.{{wb}}",
    ),
    (f"{_DEC}.norm.{{gb}}", f"{_HDEC}.norm.{{gb}}"),
    # relational memory
    (f"{_RM}.attn.linears.{{proj}}.{{wb}}", f"{_HRM}.attn.{{proj}}.{{wb}}"),
    (f"{_RM}.mlp.{{mlp}}.{{wb}}", f"{_HRM}.mlp.{{mlp}}.{{wb}}"),
    (f"{_RM}.{{gate}}.{{wb}}", f"{_HRM}.{{gate}}.{{wb}}"),
    # output layer (vocab + 1 classes)
    ("encoder_decoder.logit.{wb}", "lm_head.{wb}"),
]

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(template: str, official: bool) -> re.Pattern:
    parts, last = [], 0
    for match in _PLACEHOLDER.finditer(template):
        slot = _SLOTS[match.group(1)]
        parts.append(re.escape(template[last : match.start()]))
        parts.append(f"(?P<{match.group(1)}>{slot.official_pattern if official else slot.hf_pattern})")
        last = match.end()
    parts.append(re.escape(template[last:]))
    return re.compile("".join(parts) + r"\Z")


_COMPILED = [(_compile(official, True), _compile(ours, False), official, ours) for official, ours in KEY_RULES]


def official_to_hf_key(key: str) -> str | None:
    """Our name of an official state-dict key, or `None` when no rule maps it."""
    for official_re, _, _, ours in _COMPILED:
        match = official_re.match(key)
        if match:
            return ours.format(**{name: _SLOTS[name].to_hf(text) for name, text in match.groupdict().items()})
    return None


def hf_to_official_key(key: str) -> str | None:
    """The official name of one of our state-dict keys, or `None` when no rule maps it."""
    for _, hf_re, official, _ in _COMPILED:
        match = hf_re.match(key)
        if match:
            return official.format(
                **{name: _SLOTS[name].to_official(text) for name, text in match.groupdict().items()}
            )
    return None


def sinusoidal_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed sinusoidal table of the Transformer (sin on even, cos on odd dims), `[num_positions, dim]`, fp32:
    the decoder's own `sinusoidal_positions` for positions 0..num_positions-1."""
    return sinusoidal_positions(torch.arange(num_positions), dim)


# --------------------------------------------------------------------------------------------------------------
# Reading the checkpoint
# --------------------------------------------------------------------------------------------------------------

# Data-only numpy types an old checkpoint may hold in `monitor_best`/`epoch`; safe to allow under weights_only.
_NUMPY_DATA_GLOBALS = re.compile(r"numpy\.(_?core\.multiarray\.scalar|dtype|dtypes\.\w+DType)\Z")


def load_official_checkpoint(path: str, unsafe_load: bool = False) -> dict[str, torch.Tensor]:
    """Read `model_best.pth` (or a bare state dict) and return its model state dict (`module.` prefixes removed).

    Loads with `torch.load(weights_only=True)`; numpy scalars (harmless data) are allowed. Anything else that needs
    arbitrary unpickling is refused unless `unsafe_load=True` (only for files you trust: unpickling runs code).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if unsafe_load:
        logger.warning("Loading %s with weights_only=False: this unpickles arbitrary objects.", path)
        blob = torch.load(path, map_location="cpu", weights_only=False)
    else:
        blob = _load_weights_only(path)

    if isinstance(blob, Mapping) and "state_dict" in blob:
        state_dict = blob["state_dict"]
    else:
        state_dict = blob
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ConversionError(
            f"{path} holds no state dict: expected the official {{'epoch', 'state_dict', 'optimizer', "
            f"'monitor_best'}} or a bare state dict, got {type(blob).__name__}"
        )
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConversionError(f"{path}: state dict entry {not_tensors[0]!r} is not a tensor")
    # A checkpoint saved through nn.DataParallel (official --n_gpu > 1) prefixes every key with "module.".
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _load_weights_only(path: str) -> object:
    """`torch.load(weights_only=True)`, additionally allowing numpy scalars/dtypes (data, no code) one by one."""
    import importlib

    allowed: dict[str, object] = {}
    while True:
        try:
            with torch.serialization.safe_globals(list(allowed.values())):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            # torch names the refused global either as "GLOBAL a.b.c" or as "<class 'a.b.c'>".
            names = re.findall(r"GLOBAL ([\w.]+)|<class '([\w.]+)'>", str(error))
            names = [a or b for a, b in names]
            refused = [n for n in names if n not in allowed]
            if not refused or not all(_NUMPY_DATA_GLOBALS.match(name) for name in refused):
                raise ConversionError(
                    f"{path} cannot be loaded with torch.load(weights_only=True): it holds objects other than "
                    f"tensors and plain containers ({', '.join(refused) or 'see the error above'}). If you trust this "
                    "file, pass --unsafe-load (weights_only=False, which runs the pickled code)."
                ) from error
            for name in refused:
                module_name, _, attr = name.rpartition(".")
                allowed[name] = getattr(importlib.import_module(module_name), attr)


# --------------------------------------------------------------------------------------------------------------
# Architecture from shapes
# --------------------------------------------------------------------------------------------------------------


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ConversionError(f"missing key {key!r} in the official checkpoint (needed to read the architecture)")
    return state_dict[key]


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    num_views: int = 2,
    num_heads: int = 8,
    rm_num_heads: int = 8,
    **overrides,
) -> R2GenMambaConfig:
    """Build the `R2GenMambaConfig` an official state dict implies.

    Read from shapes: vocabulary (`logit.weight` rows), d_model, d_ff, decoder depth, memory slots, max positions,
    the encoder (Mamba: d_state, d_conv, expand, dt_rank; an original R2Gen checkpoint: the Transformer encoder's
    depth and d_ff) and the ResNet layout (stem width, stage widths and depths,
    bottleneck or basic blocks). Head counts are not visible in shapes and are passed in.
    """
    logit = _require(state_dict, "encoder_decoder.logit.weight")  # [vocab_size, d_model]
    vocab_size, d_model = logit.shape
    d_ff = _require(state_dict, f"{_DEC}.layers.0.feed_forward.w_1.weight").shape[0]
    decoder_layers = _count_layers(state_dict, _DEC)
    rm_num_slots = _require(state_dict, f"{_DEC}.layers.0.sublayer.0.norm.mlp_gamma.0.weight").shape[1] // d_model
    max_positions = _require(state_dict, POSITION_TABLE_KEY).shape[1]

    if f"{_ENC}.A_log" in state_dict:  # R2Gen-Mamba: one bare Mamba block
        d_inner, d_state = state_dict[f"{_ENC}.A_log"].shape  # [d_inner, d_state]
        if d_inner % d_model:
            raise ConversionError(f"Mamba d_inner ({d_inner}, from A_log) is not a multiple of d_model ({d_model})")
        encoder_config = R2GenMambaEncoderConfig(
            encoder_type="mamba",
            hidden_size=d_model,
            num_hidden_layers=1,
            state_size=d_state,
            conv_kernel=_require(state_dict, f"{_ENC}.conv1d.weight").shape[-1],
            expand=d_inner // d_model,
            time_step_rank=_require(state_dict, f"{_ENC}.dt_proj.weight").shape[1],
        )
    elif f"{_ENC}.layers.0.feed_forward.w_1.weight" in state_dict:
        # Original R2Gen: a Transformer encoder built with the decoder's heads, d_ff and dropout.
        encoder_config = R2GenMambaEncoderConfig(
            encoder_type="transformer",
            hidden_size=d_model,
            num_hidden_layers=_count_layers(state_dict, _ENC),
            num_attention_heads=num_heads,
            intermediate_size=state_dict[f"{_ENC}.layers.0.feed_forward.w_1.weight"].shape[0],
        )
    else:
        raise ConversionError(
            f"missing key {_ENC}.A_log (R2Gen-Mamba) or {_ENC}.layers.0.* (R2Gen): the checkpoint has no encoder"
        )

    embedding_size = _require(state_dict, f"{_VE}.0.weight").shape[0]
    depths, hidden_sizes, layer_type = [], [], "bottleneck"
    for stage in range(4):
        blocks = {
            int(m.group(1)) for k in state_dict if (m := re.match(rf"{re.escape(_VE)}\.{stage + 4}\.(\d+)\.", k))
        }
        if not blocks:
            raise ConversionError(f"missing keys {_VE}.{stage + 4}.* (ResNet stage {stage + 1}) in the checkpoint")
        depths.append(max(blocks) + 1)
        last_conv = f"{_VE}.{stage + 4}.0.conv3.weight"
        if last_conv not in state_dict:
            layer_type, last_conv = "basic", f"{_VE}.{stage + 4}.0.conv2.weight"
        hidden_sizes.append(_require(state_dict, last_conv).shape[0])
    vision_config = resnet101_config(
        embedding_size=embedding_size, hidden_sizes=hidden_sizes, depths=depths, layer_type=layer_type
    )

    kwargs = dict(
        vision_config=vision_config,
        num_views=num_views,
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=d_ff,
        decoder_layers=decoder_layers,
        num_heads=num_heads,
        rm_num_slots=rm_num_slots,
        rm_num_heads=rm_num_heads,
        max_position_embeddings=max_positions,
        encoder_config=encoder_config,
    )
    kwargs.update(overrides)
    return R2GenMambaConfig(**kwargs)


def _count_layers(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"{re.escape(prefix)}\.layers\.(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    if not indices:
        raise ConversionError(f"missing keys {prefix}.layers.0.* in the official checkpoint")
    return max(indices) + 1


# --------------------------------------------------------------------------------------------------------------
# State dict conversion
# --------------------------------------------------------------------------------------------------------------


def _expected_shapes(config: R2GenMambaConfig) -> dict[str, torch.Size]:
    # Shapes only: build on the meta device (no memory, no init cost).
    with torch.device("meta"):
        model = R2GenMambaForConditionalGeneration(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_position_table(table: torch.Tensor, config: R2GenMambaConfig) -> None:
    """Check the official `pe` buffer `[1, max_len, d_model]` is the sinusoidal table our decoder computes."""
    if table.dim() != 3 or table.shape[0] != 1 or table.shape[2] != config.d_model:
        raise ConversionError(
            f"{POSITION_TABLE_KEY}: expected shape (1, max_len, {config.d_model}), got {tuple(table.shape)}"
        )
    reference = sinusoidal_position_table(table.shape[1], table.shape[2])
    difference = (table[0].float() - reference).abs().max().item()
    if difference > 1e-4:
        raise ConversionError(
            f"{POSITION_TABLE_KEY} is not the standard sinusoidal table (max abs difference {difference:.3g}); "
            "this decoder cannot reproduce it"
        )


def convert_state_dict(
    official_state_dict: Mapping[str, torch.Tensor], config: R2GenMambaConfig
) -> dict[str, torch.Tensor]:
    """Map an official R2Gen-Mamba state dict onto `R2GenMambaForConditionalGeneration(config)`'s names.

    Strict: raises `ConversionError` naming the key for a key no rule maps or our model does not have
    (unexpected), a key our model needs that the checkpoint lacks (missing), or a shape mismatch. The position
    buffer `encoder_decoder.model.tgt_embed.1.pe` is checked against the sinusoidal table and dropped.

    Returns:
        A state dict for `model.load_state_dict(..., strict=True)` (contiguous tensors, same dtype as the input).
    """
    expected = _expected_shapes(config)
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in official_state_dict.items():
        if key == POSITION_TABLE_KEY:
            check_position_table(tensor, config)
            continue
        ours = official_to_hf_key(key)
        if ours is None or ours not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[ours]):
            raise ConversionError(
                f"shape mismatch for {key!r} (-> {ours!r}): the checkpoint has {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[ours])}"
            )
        converted[ours] = tensor.detach().clone().contiguous()
    if unexpected:
        raise ConversionError(
            f"unexpected key {unexpected[0]!r} in the official checkpoint: it maps to no parameter of this model"
            + (f" (and {len(unexpected) - 1} more: {unexpected[1:6]})" if len(unexpected) > 1 else "")
        )
    missing = [k for k in expected if k not in converted]
    if missing:
        names = [f"{hf_to_official_key(k) or '?'} (-> {k})" for k in missing]
        raise ConversionError(
            f"missing key {names[0]} in the official checkpoint"
            + (f" (and {len(names) - 1} more: {names[1:6]})" if len(names) > 1 else "")
        )
    return converted


def official_state_dict_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse mapping (our names -> official names), plus the `pe` buffer; for exporting and for checks."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        official = hf_to_official_key(key)
        if official is None:
            raise ConversionError(f"no official name for {key!r}")
        out[official] = tensor
    return out


# --------------------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------------------


def generation_config_for(max_length: int) -> GenerationConfig:
    """Official decoding (the model's `GENERATION_DEFAULTS`: beam 3, summed log-prob ranking, no length penalty), up
    to `max_length` tokens.

    The official decoder emits up to `max_seq_length` tokens after the start token; `GenerationConfig.max_length`
    counts the start token too, hence `max_length + 1`.
    """
    return GenerationConfig(
        **{**GENERATION_DEFAULTS, "max_length": max_length + 1},
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        decoder_start_token_id=0,
    )


def convert_checkpoint(
    checkpoint: str,
    annotation: str | None,
    dataset: str,
    output: str,
    num_views: int | None = None,
    threshold: int | None = None,
    max_length: int | None = None,
    num_heads: int = 8,
    rm_num_heads: int = 8,
    image_size: int = 224,
    unsafe_load: bool = False,
    overwrite: bool = False,
) -> str:
    """Convert `checkpoint` and write the model folder `output` (returns its path). See the module docstring."""
    if dataset not in DATASET_DEFAULTS:
        raise ValueError(f"dataset must be one of {sorted(DATASET_DEFAULTS)}, got {dataset!r}")
    defaults = DATASET_DEFAULTS[dataset]
    num_views = defaults["num_views"] if num_views is None else num_views
    threshold = defaults["threshold"] if threshold is None else threshold
    max_length = defaults["max_length"] if max_length is None else max_length
    output = os.path.abspath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace it")

    official = load_official_checkpoint(checkpoint, unsafe_load=unsafe_load)
    try:
        config = infer_config(
            official, num_views=num_views, num_heads=num_heads, rm_num_heads=rm_num_heads, image_size=image_size
        )
        state_dict = convert_state_dict(official, config)
    except ConversionError as error:  # the state-dict functions do not know the file: name it
        raise ConversionError(f"{checkpoint}: {error}") from error
    processor = _build_processor(annotation, dataset, threshold, max_length, config) if annotation else None
    if processor is None:
        logger.warning("No --annotation given: the folder has no tokenizer/processor (vocabulary size unchecked).")

    model = R2GenMambaForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    model.generation_config = generation_config_for(max_length)

    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(staging)
        _replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Converted %s -> %s (%d tensors)", checkpoint, output, len(state_dict))
    return output


def _build_processor(annotation: str, dataset: str, threshold: int, max_length: int, config: R2GenMambaConfig):
    from .processing_r2gen_mamba import R2GenMambaImageProcessor, R2GenMambaProcessor, R2GenMambaTokenizer

    tokenizer = R2GenMambaTokenizer.from_annotation(annotation, dataset_name=dataset, threshold=threshold)
    tokenizer.model_max_length = max_length
    if len(tokenizer) != config.vocab_size:
        raise ConversionError(
            f"vocabulary size mismatch: the annotation {annotation} ({dataset}, threshold {threshold}, train split) "
            f"gives {len(tokenizer)} tokens (ids 0..{len(tokenizer) - 1}, 0 = bos/eos/pad) but the checkpoint has "
            f"{config.vocab_size} (encoder_decoder.logit.weight rows). Use the annotation, dataset and threshold the "
            "model was trained with (a MIMIC-CXR vocabulary is not an IU X-Ray one; threshold 3 vs 10 changes it)."
        )
    image_processor = R2GenMambaImageProcessor(size={"height": config.image_size, "width": config.image_size})
    return R2GenMambaProcessor(image_processor=image_processor, tokenizer=tokenizer, num_views=config.num_views)


def _replace_dir(staging: str, output: str) -> None:
    if not os.path.exists(output):
        os.rename(staging, output)
        return
    retired = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=os.path.dirname(output))
    os.rename(output, os.path.join(retired, "previous"))
    os.rename(staging, output)
    shutil.rmtree(retired, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="official checkpoint (model_best.pth)")
    parser.add_argument(
        "--annotation",
        help="annotation.json the model was trained with (rebuilds the vocabulary; strongly recommended)",
    )
    parser.add_argument("--dataset", required=True, choices=sorted(DATASET_DEFAULTS), help="dataset of the model")
    parser.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--num-views", type=int, help="images per study (default: 2 for iu_xray, 1 for mimic_cxr)")
    parser.add_argument("--threshold", type=int, help="vocabulary count threshold (default: 3 iu_xray, 10 mimic_cxr)")
    parser.add_argument("--max-length", type=int, help="max report tokens (default: 60 iu_xray, 100 mimic_cxr)")
    parser.add_argument("--num-heads", type=int, default=8, help="decoder attention heads (official --num_heads)")
    parser.add_argument(
        "--rm-num-heads", type=int, default=8, help="relational memory heads (official --rm_num_heads)"
    )
    parser.add_argument("--image-size", type=int, default=224, help="input resolution (default 224)")
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load with torch.load(weights_only=False); only for a checkpoint you trust (unpickling runs code)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output folder")


def run(args: argparse.Namespace) -> int:
    try:
        path = convert_checkpoint(
            checkpoint=args.checkpoint,
            annotation=args.annotation,
            dataset=args.dataset,
            output=args.output,
            num_views=args.num_views,
            threshold=args.threshold,
            max_length=args.max_length,
            num_heads=args.num_heads,
            rm_num_heads=args.rm_num_heads,
            image_size=args.image_size,
            unsafe_load=args.unsafe_load,
            overwrite=args.overwrite,
        )
    except (ConversionError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


__all__ = [
    "ConversionError",
    "DATASET_DEFAULTS",
    "KEY_RULES",
    "check_position_table",
    "convert_checkpoint",
    "convert_state_dict",
    "generation_config_for",
    "hf_to_official_key",
    "infer_config",
    "load_official_checkpoint",
    "official_state_dict_from_hf",
    "official_to_hf_key",
    "sinusoidal_position_table",
]
