"""Configuration of R2Gen-Mamba (ResNet-101 -> Mamba encoder -> memory-driven Transformer decoder).

The configuration is composite, in the style of `VisionEncoderDecoderConfig`: one sub-config for the visual
extractor (a stock `ResNetConfig`), one for the encoder and one for the decoder. The defaults are the published
IU X-Ray model (see `docs/architecture.md` of the project and the paper, section 3.2). The most tuned values are
also reachable flat (`config.vocab_size`, `config.encoder_type`, `config.d_model`, ...) and can be passed flat to the
constructor, which routes them into the right sub-config.

Generation defaults (beam 3, max length 60 for IU X-Ray) live in the model's `generation_config`, not here.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

from transformers import PretrainedConfig, ResNetConfig

ENCODER_TYPES = ("mamba", "transformer")


def resnet101_config(**kwargs: Any) -> ResNetConfig:
    """The torchvision ResNet-101 layout (v1.5: stride in the 3x3 conv) as a `transformers` `ResNetConfig`."""
    defaults = dict(
        num_channels=3,
        embedding_size=64,
        hidden_sizes=[256, 512, 1024, 2048],
        depths=[3, 4, 23, 3],
        layer_type="bottleneck",
        hidden_act="relu",
        downsample_in_first_stage=False,
        downsample_in_bottleneck=False,
    )
    defaults.update(kwargs)
    return ResNetConfig(**defaults)


class R2GenMambaEncoderConfig(PretrainedConfig):
    r"""
    Configuration of the encoder that contextualises the projected patch tokens.

    Field names follow `transformers.MambaConfig` where they fit.

    Args:
        encoder_type (`str`, defaults to `"mamba"`):
            `"mamba"`: the published encoder, a `mamba_ssm.Mamba` block. `"transformer"`: R2Gen's Transformer
            encoder (the baseline of the paper's complexity comparison).
        hidden_size (`int`, defaults to 512): model width (`d_model`); must equal the decoder's.
        state_size (`int`, defaults to 16): SSM state size (`d_state`).
        conv_kernel (`int`, defaults to 4): width of the causal depthwise convolution (`d_conv`).
        expand (`int`, defaults to 2): block expansion factor; `d_inner = expand * hidden_size`.
        time_step_rank (`int` or `"auto"`, defaults to `"auto"`): rank of the dt projection; `"auto"` is
            `ceil(hidden_size / 16)` (32 for the paper).
        time_step_min / time_step_max / time_step_floor / time_step_scale / time_step_init_scheme:
            dt initialisation as in `mamba_ssm.Mamba` (0.001 / 0.1 / 1e-4 / 1.0 / `"random"`).
        use_bias (`bool`, defaults to `False`): bias in `in_proj`/`out_proj`.
        use_conv_bias (`bool`, defaults to `True`): bias in `conv1d`.
        num_hidden_layers (`int`, *optional*): Mamba: 1 is the official bare block (no norm, no residual);
            more than 1 is a pre-norm residual stack with a final norm. Transformer: number of layers.
            Defaults to 1 for Mamba and 3 for the Transformer.
        layer_norm_epsilon (`float`, defaults to 1e-5): RMS/LayerNorm eps of the residual Mamba stack.
        num_attention_heads (`int`, defaults to 8): Transformer encoder heads.
        intermediate_size (`int`, defaults to 512): Transformer encoder FFN width (`d_ff`).
        dropout (`float`, defaults to 0.1): Transformer encoder dropout.
        use_mamba_kernels (`bool`, defaults to `True`): use the `mamba_ssm`/`causal_conv1d` CUDA kernels when they are
            installed and the weights are on CUDA; otherwise the pure-PyTorch path runs.
    """

    model_type = "r2gen_mamba_encoder"

    def __init__(
        self,
        encoder_type: str = "mamba",
        hidden_size: int = 512,
        state_size: int = 16,
        conv_kernel: int = 4,
        expand: int = 2,
        time_step_rank: int | str = "auto",
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        time_step_scale: float = 1.0,
        time_step_init_scheme: str = "random",
        use_bias: bool = False,
        use_conv_bias: bool = True,
        num_hidden_layers: int | None = None,
        layer_norm_epsilon: float = 1e-5,
        num_attention_heads: int = 8,
        intermediate_size: int = 512,
        dropout: float = 0.1,
        use_mamba_kernels: bool = True,
        **kwargs: Any,
    ):
        if num_hidden_layers is None:
            num_hidden_layers = 1 if encoder_type == "mamba" else 3
        self.encoder_type = encoder_type
        self.hidden_size = hidden_size
        self.state_size = state_size
        self.conv_kernel = conv_kernel
        self.expand = expand
        # "auto" is kept as such (resolved by `dt_rank`), so it follows later changes of `hidden_size`.
        self.time_step_rank = time_step_rank
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_floor = time_step_floor
        self.time_step_scale = time_step_scale
        self.time_step_init_scheme = time_step_init_scheme
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.num_hidden_layers = num_hidden_layers
        self.layer_norm_epsilon = layer_norm_epsilon
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.dropout = dropout
        self.use_mamba_kernels = use_mamba_kernels
        super().__init__(**kwargs)
        self._validate()

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_size

    @property
    def dt_rank(self) -> int:
        """`time_step_rank` as a number: `ceil(hidden_size / 16)` for `"auto"`."""
        return math.ceil(self.hidden_size / 16) if self.time_step_rank == "auto" else self.time_step_rank

    def _validate(self) -> None:
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_type must be one of {ENCODER_TYPES}, got {self.encoder_type!r}")
        for name in ("hidden_size", "state_size", "conv_kernel", "expand", "num_hidden_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"encoder {name} must be a positive integer, got {value!r}")
        if not isinstance(self.dt_rank, int) or self.dt_rank < 1:
            raise ValueError(
                f"encoder time_step_rank must be a positive integer or 'auto', got {self.time_step_rank!r}"
            )
        if self.encoder_type == "transformer" and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"encoder hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if not 0.0 < self.time_step_min <= self.time_step_max:
            raise ValueError(
                f"need 0 < time_step_min <= time_step_max, got {self.time_step_min} and {self.time_step_max}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"encoder dropout must be in [0, 1), got {self.dropout}")


class R2GenMambaDecoderConfig(PretrainedConfig):
    r"""
    Configuration of R2Gen's memory-driven Transformer decoder.

    Args:
        vocab_size (`int`, defaults to 761): number of output classes = tokenizer size, i.e. the R2Gen vocabulary
            (760 tokens for IU X-Ray, ids 1..760) plus id 0 (shared bos/eos/pad).
        hidden_size (`int`, defaults to 512): `d_model` (even: the sinusoidal positions pair sin and cos).
        num_hidden_layers (`int`, defaults to 3): decoder layers.
        num_attention_heads (`int`, defaults to 8): heads of self- and cross-attention.
        intermediate_size (`int`, defaults to 512): FFN width (`d_ff`).
        dropout (`float`, defaults to 0.1): dropout of embeddings, attention and sublayers.
        use_relational_memory (`bool`, defaults to `True`): the relational memory (RM) of R2Gen.
        rm_num_slots (`int`, defaults to 3): memory slots.
        rm_num_heads (`int`, defaults to 8): heads of the memory's attention.
        use_mcln (`bool`, defaults to `True`): memory-driven conditional layer norm in every sublayer; `False` uses
            R2Gen's plain LayerNorm (needs no memory). Requires `use_relational_memory`.
        max_position_embeddings (`int`, defaults to 5000): length of the sinusoidal position table (the official
            `pe` buffer is 1 x 5000 x 512).
        layer_norm_eps (`float`, defaults to 1e-6): eps added to the *unbiased std* (R2Gen's LayerNorm quirk).
    """

    model_type = "r2gen_mamba_decoder"

    def __init__(
        self,
        vocab_size: int = 761,
        hidden_size: int = 512,
        num_hidden_layers: int = 3,
        num_attention_heads: int = 8,
        intermediate_size: int = 512,
        dropout: float = 0.1,
        use_relational_memory: bool = True,
        rm_num_slots: int = 3,
        rm_num_heads: int = 8,
        use_mcln: bool = True,
        max_position_embeddings: int = 5000,
        layer_norm_eps: float = 1e-6,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.dropout = dropout
        self.use_relational_memory = use_relational_memory
        self.rm_num_slots = rm_num_slots
        self.rm_num_heads = rm_num_heads
        self.use_mcln = use_mcln
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "rm_num_slots",
            "rm_num_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"decoder {name} must be a positive integer, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"decoder vocab_size must be at least 2 (id 0 plus one token), got {self.vocab_size}")
        if self.hidden_size % 2:
            raise ValueError(f"decoder hidden_size must be even (sinusoidal positions), got {self.hidden_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"decoder hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.use_relational_memory and self.hidden_size % self.rm_num_heads:
            raise ValueError(
                f"decoder hidden_size ({self.hidden_size}) must be divisible by rm_num_heads ({self.rm_num_heads})"
            )
        if self.use_mcln and not self.use_relational_memory:
            raise ValueError("use_mcln=True needs use_relational_memory=True (MCLN is conditioned on the memory)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"decoder dropout must be in [0, 1), got {self.dropout}")


# Flat names users tune -> (sub-config attribute, field in that sub-config).
_FLAT_FIELDS: dict[str, tuple[str, str]] = {
    "vocab_size": ("decoder_config", "vocab_size"),
    "d_model": ("decoder_config", "hidden_size"),
    "decoder_layers": ("decoder_config", "num_hidden_layers"),
    "num_heads": ("decoder_config", "num_attention_heads"),
    "d_ff": ("decoder_config", "intermediate_size"),
    "dropout": ("decoder_config", "dropout"),
    "use_relational_memory": ("decoder_config", "use_relational_memory"),
    "rm_num_slots": ("decoder_config", "rm_num_slots"),
    "rm_num_heads": ("decoder_config", "rm_num_heads"),
    "use_mcln": ("decoder_config", "use_mcln"),
    "max_position_embeddings": ("decoder_config", "max_position_embeddings"),
    "encoder_type": ("encoder_config", "encoder_type"),
    "encoder_layers": ("encoder_config", "num_hidden_layers"),
    "d_state": ("encoder_config", "state_size"),
    "d_conv": ("encoder_config", "conv_kernel"),
    "expand": ("encoder_config", "expand"),
}

# Flat names routed into each sub-config when it is built (`d_model` is handled apart: it sets both widths).
_ENCODER_INIT_FLAT = {k: field for k, (sub, field) in _FLAT_FIELDS.items() if sub == "encoder_config"}
_DECODER_INIT_FLAT = {
    k: field for k, (sub, field) in _FLAT_FIELDS.items() if sub == "decoder_config" and k != "d_model"
}


class R2GenMambaConfig(PretrainedConfig):
    r"""
    Configuration of [`R2GenMambaForConditionalGeneration`].

    Args:
        vision_config (`ResNetConfig` or `dict`, *optional*): the visual extractor; defaults to the torchvision
            ResNet-101 layout (`resnet101_config()`), whose last stage gives 7x7x2048 at 224 px.
        encoder_config (`R2GenMambaEncoderConfig` or `dict`, *optional*): the encoder (Mamba by default).
        decoder_config (`R2GenMambaDecoderConfig` or `dict`, *optional*): the memory-driven decoder.
        vision_model_name_or_path (`str`, *optional*): a Hub id (e.g. `"microsoft/resnet-101"`) or local folder of a
            `ResNetModel` whose ImageNet weights initialise the visual extractor of a *new* model
            (`R2GenMambaForConditionalGeneration.load_vision_weights`). Recorded for provenance.
        num_views (`int`, defaults to 2): images per study (2 for IU X-Ray, 1 for MIMIC-CXR). The patch tokens of the
            views are concatenated (98 tokens for 2 views at 224 px).
        image_size (`int`, defaults to 224): input resolution the model was trained at.
        patch_dropout (`float`, defaults to 0.5): dropout of the patch embedding (`att_embed`, 2048 -> d_model).
        bos_token_id / eos_token_id / pad_token_id / decoder_start_token_id (`int`, defaults to 0): R2Gen shares
            id 0 for all four.

    Flat keyword arguments (`vocab_size`, `d_model`, `encoder_type`, `encoder_layers`, `d_state`, `d_conv`,
    `expand`, `decoder_layers`, `num_heads`, `d_ff`, `dropout`, `use_relational_memory`, `rm_num_slots`,
    `rm_num_heads`, `use_mcln`, `max_position_embeddings`) are routed into the sub-configs and readable/settable as
    attributes. `d_model` sets both the encoder and the decoder width. Sub-config objects passed in are copied, never
    modified. A flat assignment is validated like the constructor: a value the constructor would reject raises the
    same `ValueError` and leaves the config unchanged (so change interdependent fields in a valid order, e.g.
    `use_mcln = False` before `use_relational_memory = False`).
    """

    model_type = "r2gen_mamba"
    sub_configs = {
        "vision_config": ResNetConfig,
        "encoder_config": R2GenMambaEncoderConfig,
        "decoder_config": R2GenMambaDecoderConfig,
    }

    def __init__(
        self,
        vision_config: ResNetConfig | dict | None = None,
        encoder_config: R2GenMambaEncoderConfig | dict | None = None,
        decoder_config: R2GenMambaDecoderConfig | dict | None = None,
        vision_model_name_or_path: str | None = None,
        num_views: int = 2,
        image_size: int = 224,
        patch_dropout: float = 0.5,
        bos_token_id: int = 0,
        eos_token_id: int = 0,
        pad_token_id: int = 0,
        decoder_start_token_id: int = 0,
        is_encoder_decoder: bool = True,
        **kwargs: Any,
    ):
        flat = {name: kwargs.pop(name) for name in list(kwargs) if name in _FLAT_FIELDS}
        d_model = flat.pop("d_model", None)

        if vision_config is None:
            vision_config = resnet101_config()
        elif isinstance(vision_config, dict):
            vision_config = ResNetConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        elif not isinstance(vision_config, ResNetConfig):
            raise ValueError(f"vision_config must be a ResNetConfig or dict, got {type(vision_config).__name__}")

        encoder_kwargs = {_ENCODER_INIT_FLAT[k]: flat.pop(k) for k in list(flat) if k in _ENCODER_INIT_FLAT}
        decoder_kwargs = {_DECODER_INIT_FLAT[k]: flat.pop(k) for k in list(flat) if k in _DECODER_INIT_FLAT}
        if d_model is not None:
            encoder_kwargs["hidden_size"] = decoder_kwargs["hidden_size"] = d_model
        encoder_config = self._build_sub(encoder_config, R2GenMambaEncoderConfig, encoder_kwargs, "encoder_config")
        decoder_config = self._build_sub(decoder_config, R2GenMambaDecoderConfig, decoder_kwargs, "decoder_config")

        self.vision_config = vision_config
        self.encoder_config = encoder_config
        self.decoder_config = decoder_config
        self.vision_model_name_or_path = vision_model_name_or_path
        self.num_views = num_views
        self.image_size = image_size
        self.patch_dropout = patch_dropout
        self.decoder_start_token_id = decoder_start_token_id
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            is_encoder_decoder=is_encoder_decoder,
            **kwargs,
        )
        self._validate()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        # Flat overrides (`from_pretrained(path, d_model=..., num_heads=...)`) go to the constructor together, which
        # validates them at once; transformers would otherwise set them one by one, each validated alone, so a valid
        # combination could fail or pass depending on the order of the keyword arguments.
        flat = {name: kwargs.pop(name) for name in list(kwargs) if name in _FLAT_FIELDS}
        return super().from_dict({**config_dict, **flat} if flat else config_dict, **kwargs)

    def update(self, config_dict: dict[str, Any]) -> None:
        """Set attributes from `config_dict`; the flat ones are validated together at the end (and all rolled back
        if the result is invalid), so their order does not matter."""
        with _deferred_validation(self):
            super().update(config_dict)

    @staticmethod
    def _build_sub(value, cls, overrides: dict, name: str):
        if value is None:
            return cls(**overrides)
        if isinstance(value, dict):
            merged = {k: v for k, v in value.items() if k != "model_type"}
            merged.update(overrides)
            return cls(**merged)
        if isinstance(value, cls):
            # A copy: the caller's object is neither modified by the overrides nor shared with this config.
            value = copy.deepcopy(value)
            for key, item in overrides.items():
                setattr(value, key, item)
            value._validate()
            return value
        raise ValueError(f"{name} must be a {cls.__name__} or dict, got {type(value).__name__}")

    @classmethod
    def from_sub_configs(
        cls,
        vision_config: ResNetConfig,
        encoder_config: R2GenMambaEncoderConfig,
        decoder_config: R2GenMambaDecoderConfig,
        **kwargs: Any,
    ) -> R2GenMambaConfig:
        """Build a config from the three sub-configs (plus top-level fields such as `num_views`)."""
        return cls(vision_config=vision_config, encoder_config=encoder_config, decoder_config=decoder_config, **kwargs)

    @property
    def visual_feature_size(self) -> int:
        """Channels of the visual extractor's last stage (2048 for ResNet-101)."""
        return self.vision_config.hidden_sizes[-1]

    def _validate(self) -> None:
        # Sub-configs first, in the order the constructor builds them, so a flat setter raises the same error.
        self.encoder_config._validate()
        self.decoder_config._validate()
        if not isinstance(self.num_views, int) or self.num_views < 1:
            raise ValueError(f"num_views must be a positive integer, got {self.num_views!r}")
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise ValueError(f"image_size must be an integer >= 32, got {self.image_size!r}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.encoder_config.hidden_size != self.decoder_config.hidden_size:
            raise ValueError(
                f"encoder hidden_size ({self.encoder_config.hidden_size}) must equal decoder hidden_size "
                f"({self.decoder_config.hidden_size}): the decoder's cross-attention reads the encoder output"
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.decoder_config.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary (size {self.decoder_config.vocab_size})")


# Configs inside `_deferred_validation` (by id): their flat setters assign without validating.
_DEFERRING: set[int] = set()


@contextlib.contextmanager
def _deferred_validation(config: R2GenMambaConfig) -> Iterator[None]:
    """Flat assignments in the block are validated once at its end; if invalid, both sub-configs are restored.
    Inside an outer block it does nothing (the outer block validates)."""
    if id(config) in _DEFERRING:
        yield
        return
    saved = [(sub, dict(vars(sub))) for sub in (config.encoder_config, config.decoder_config)]
    _DEFERRING.add(id(config))
    try:
        yield
    finally:
        _DEFERRING.discard(id(config))
    try:
        config._validate()
    except Exception:
        for sub, state in saved:
            vars(sub).clear()
            vars(sub).update(state)
        raise


def _flat_property(name: str) -> property:
    sub_name, field = _FLAT_FIELDS[name]

    def getter(self):
        return getattr(getattr(self, sub_name), field)

    def setter(self, value):
        # `d_model` is the width of both the encoder and the decoder (the field is `hidden_size` in each).
        # Validated on its own (a rejected value is rolled back), or with the rest of an `update`.
        subs = [self.encoder_config, self.decoder_config] if name == "d_model" else [getattr(self, sub_name)]
        with _deferred_validation(self):
            for sub in subs:
                setattr(sub, field, value)

    return property(getter, setter, doc=f"Flat view of `{sub_name}.{field}`.")


for _name in _FLAT_FIELDS:
    setattr(R2GenMambaConfig, _name, _flat_property(_name))


__all__ = ["R2GenMambaConfig", "R2GenMambaEncoderConfig", "R2GenMambaDecoderConfig", "resnet101_config"]
