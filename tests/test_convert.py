"""Official-checkpoint conversion: key mapping, strictness, the CLI round trip, and the ResNet mapping checked
numerically against a torchvision-layout ResNet written here in plain PyTorch (torchvision itself is not installed)."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from helpers import tiny_config, tiny_pixel_values
from torch import nn
from transformers import ResNetModel

from r2gen_mamba import resnet101_config
from r2gen_mamba.cli import main as cli_main
from r2gen_mamba.convert_official import (
    POSITION_TABLE_KEY,
    ConversionError,
    convert_checkpoint,
    convert_state_dict,
    hf_to_official_key,
    infer_config,
    official_to_hf_key,
)

# --------------------------------------------------------------------------------------------------------------
# A torchvision-layout ResNet (same child and attribute names as torchvision.models.resnet), written from scratch
# --------------------------------------------------------------------------------------------------------------


class TorchvisionBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TorchvisionResNet(nn.Module):
    def __init__(self, stem: int, widths: list[int], depths: list[int]):
        super().__init__()
        self.inplanes = stem
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0] // 4, depths[0], 1)
        self.layer2 = self._make_layer(widths[1] // 4, depths[1], 2)
        self.layer3 = self._make_layer(widths[2] // 4, depths[2], 2)
        self.layer4 = self._make_layer(widths[3] // 4, depths[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], 10)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        layers = [TorchvisionBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [TorchvisionBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


def official_visual_extractor(stem: int, widths: list[int], depths: list[int]) -> nn.Sequential:
    """The official `VisualExtractor.model`: a torchvision ResNet's children without avgpool and fc, with random
    weights and random BatchNorm statistics (so a wrong mapping cannot hide behind an identity BN)."""
    extractor = nn.Sequential(*list(TorchvisionResNet(stem, widths, depths).children())[:-2])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in extractor.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return extractor.eval()


# --------------------------------------------------------------------------------------------------------------
# Our names -> official names, written independently of the converter's rule table
# --------------------------------------------------------------------------------------------------------------

_PROJ = {"q_proj": "0", "k_proj": "1", "v_proj": "2", "o_proj": "3"}
_SUBLAYER = {"self_attn_norm": "0", "cross_attn_norm": "1", "ffn_norm": "2"}


def to_official_name(key: str) -> str:
    if key.startswith("model.visual_extractor."):
        rest = key[len("model.visual_extractor.") :]
        if rest.startswith("embedder.embedder.convolution."):
            return "visual_extractor.model.0." + rest.split(".")[-1]
        if rest.startswith("embedder.embedder.normalization."):
            return "visual_extractor.model.1." + rest.split(".")[-1]
        parts = rest.split(".")  # encoder.stages.S.layers.B.(layer.I|shortcut).(convolution|normalization).P
        stage, block = int(parts[2]) + 4, parts[4]
        if parts[5] == "shortcut":
            index = "0" if parts[6] == "convolution" else "1"
            return f"visual_extractor.model.{stage}.{block}.downsample.{index}.{parts[7]}"
        kind = "conv" if parts[7] == "convolution" else "bn"
        return f"visual_extractor.model.{stage}.{block}.{kind}{int(parts[6]) + 1}.{parts[8]}"
    if key.startswith("model.patch_embed.proj."):
        return "encoder_decoder.att_embed.0." + key.split(".")[-1]
    if key.startswith("model.encoder.layers.0.mixer."):
        return "encoder_decoder.model.encoder." + key[len("model.encoder.layers.0.mixer.") :]
    if key.startswith("model.encoder."):  # R2Gen's Transformer encoder
        rest = key[len("model.encoder.") :]
        rest = re.sub(r"self_attn\.(\w_proj)\.", lambda m: f"self_attn.linears.{_PROJ[m.group(1)]}.", rest)
        rest = rest.replace("feed_forward.fc1.", "feed_forward.w_1.").replace("feed_forward.fc2.", "feed_forward.w_2.")
        rest = rest.replace("self_attn_norm.", "sublayer.0.norm.").replace("ffn_norm.", "sublayer.1.norm.")
        return "encoder_decoder.model.encoder." + rest
    if key == "model.decoder.embed_tokens.weight":
        return "encoder_decoder.model.tgt_embed.0.lut.weight"
    if key.startswith("lm_head."):
        return "encoder_decoder.logit." + key.split(".")[-1]
    if key.startswith("model.decoder.relational_memory."):
        rest = key[len("model.decoder.relational_memory.") :]
        rest = re.sub(r"attn\.(\w_proj)\.", lambda m: f"attn.linears.{_PROJ[m.group(1)]}.", rest)
        rest = rest.replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.2.")
        return "encoder_decoder.model.rm." + rest
    if key.startswith("model.decoder.norm."):
        return "encoder_decoder.model.decoder.norm." + key.split(".")[-1]
    match = re.fullmatch(r"model\.decoder\.layers\.(\d+)\.(.+)", key)
    assert match, key
    layer, rest = match.groups()
    rest = re.sub(
        r"^(self_attn|cross_attn)\.(\w_proj)\.", lambda m: f"{m.group(1)}.linears.{_PROJ[m.group(2)]}.", rest
    )
    rest = rest.replace("cross_attn.", "src_attn.")
    rest = rest.replace("feed_forward.fc1.", "feed_forward.w_1.").replace("feed_forward.fc2.", "feed_forward.w_2.")
    rest = re.sub(r"^(\w+_norm)\.", lambda m: f"sublayer.{_SUBLAYER[m.group(1)]}.norm.", rest)
    rest = re.sub(r"(mlp_gamma|mlp_beta)\.fc1\.", r"\1.0.", rest)
    rest = re.sub(r"(mlp_gamma|mlp_beta)\.fc2\.", r"\1.2.", rest)
    return f"encoder_decoder.model.decoder.layers.{layer}.{rest}"


def sinusoid(num_positions: int, dim: int) -> torch.Tensor:
    table = torch.zeros(num_positions, dim)
    for pos in range(num_positions):
        for i in range(0, dim, 2):
            angle = pos / (10000 ** (i / dim))
            table[pos, i], table[pos, i + 1] = math.sin(angle), math.cos(angle)
    return table


VISION = dict(embedding_size=8, hidden_sizes=[16, 16, 32, 32], depths=[2, 1, 1, 2])
WORDS = [f"word{chr(97 + i)}{chr(97 + j)}" for i in range(6) for j in range(6)]


def convert_config(**overrides):
    return tiny_config(vision_config=resnet101_config(**VISION), max_position_embeddings=64, **overrides)


def write_annotation(path, num_words: int) -> str:
    """An annotation whose train split gives `num_words` words with count >= 3, plus "." and `<unk>`: a tokenizer of
    `num_words + 3` ids (with id 0)."""
    train = [{"id": f"s{i}", "report": " ".join(WORDS[:num_words]) + ".", "split": "train"} for i in range(3)]
    train.append({"id": "rare", "report": "onlyonce twice twice.", "split": "train"})
    with open(path, "w") as f:
        json.dump({"train": train, "val": [], "test": []}, f)
    return str(path)


def build_source(config):
    from r2gen_mamba.modeling_r2gen_mamba import R2GenMambaForConditionalGeneration

    torch.manual_seed(3)
    model = R2GenMambaForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(5)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    official = {to_official_name(k): v.clone() for k, v in model.state_dict().items()}
    official[POSITION_TABLE_KEY] = sinusoid(config.max_position_embeddings, config.d_model).unsqueeze(0)
    return model, official


@pytest.fixture(scope="module")
def source():
    """Our tiny model with random (non-default) weights and its state dict in the official layout."""
    return build_source(convert_config())


def save_official(path, state_dict) -> str:
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "amsgrad": True}]}
    torch.save({"epoch": 12, "state_dict": state_dict, "optimizer": optimizer, "monitor_best": 0.17}, path)
    return str(path)


def cli_args(checkpoint, annotation, output, *extra):
    return [
        "convert-official",
        "--checkpoint",
        checkpoint,
        "--annotation",
        annotation,
        "--dataset",
        "iu_xray",
        "--output",
        str(output),
        "--num-heads",
        "4",
        "--rm-num-heads",
        "4",
        "--image-size",
        "64",
        *extra,
    ]


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


def test_rules_match_independent_mapping_on_the_full_size_model():
    from r2gen_mamba import R2GenMambaConfig
    from r2gen_mamba.modeling_r2gen_mamba import R2GenMambaForConditionalGeneration

    with torch.device("meta"):
        model = R2GenMambaForConditionalGeneration(R2GenMambaConfig())
    keys = list(model.state_dict())
    official = [to_official_name(k) for k in keys]
    assert [hf_to_official_key(k) for k in keys] == official
    assert [official_to_hf_key(k) for k in official] == keys
    # torchvision resnet101 children 0..7: stem conv (1 tensor) + stem BN (5 tensors) + the bottleneck blocks.
    assert sum(k.startswith("visual_extractor.model.") for k in official) == 1 + 5 + _resnet101_tensors()


def _resnet101_tensors() -> int:
    # Bottleneck: 3 convs (1 tensor) + 3 BNs (5 tensors); each stage's first block adds a downsample conv + BN.
    blocks = 3 + 4 + 23 + 3
    return blocks * (3 + 3 * 5) + 4 * (1 + 5)


def test_visual_extractor_mapping_is_numerically_exact():
    """A torchvision-layout ResNet and transformers' ResNetModel with converted weights give the same features."""
    extractor = official_visual_extractor(VISION["embedding_size"], VISION["hidden_sizes"], VISION["depths"])
    ours = ResNetModel(resnet101_config(**VISION)).eval()
    mapped = {official_to_hf_key(f"visual_extractor.model.{k}"): v for k, v in extractor.state_dict().items()}
    prefix = "model.visual_extractor."
    assert all(k is not None and k.startswith(prefix) for k in mapped)
    missing, unexpected = ours.load_state_dict({k[len(prefix) :]: v for k, v in mapped.items()}, strict=True)
    assert not missing and not unexpected
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = extractor(images)
        got = ours(images).last_hidden_state
    assert got.shape == expected.shape == (2, 32, 2, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_cli_round_trip(tmp_path, source):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, official = source
    checkpoint = save_official(tmp_path / "model_best.pth", official)
    annotation = write_annotation(tmp_path / "annotation.json", model.config.vocab_size - 3)
    output = tmp_path / "converted"
    assert cli_main(cli_args(checkpoint, annotation, output)) == 0

    loaded = AutoModelForImageTextToText.from_pretrained(output).eval()
    assert type(loaded) is type(model)
    assert loaded.config.vocab_size == model.config.vocab_size
    assert loaded.config.num_views == 2 and loaded.config.decoder_layers == model.config.decoder_layers
    assert loaded.generation_config.num_beams == 3 and loaded.generation_config.max_length == 61
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded_state[key], tensor), key
        assert torch.equal(loaded_state[key], official[to_official_name(key)]), key

    pixel_values = tiny_pixel_values(model.config)
    decoder_input_ids = torch.tensor([[0, 5, 9, 3, 12], [0, 7, 2, 0, 0]])
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids).logits
        got = loaded(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids).logits
    assert torch.equal(got, expected)

    processor = AutoProcessor.from_pretrained(output)
    assert len(processor.tokenizer) == model.config.vocab_size
    assert processor.num_views == 2
    assert not [p for p in os.listdir(tmp_path) if "partial" in p or ".old-" in p]


def test_module_prefix_and_numpy_scalar_are_accepted(tmp_path, source):
    import numpy as np

    model, official = source
    path = tmp_path / "dp.pth"
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in official.items()}, "monitor_best": np.float64(0.2)},
        path,
    )
    out = convert_checkpoint(
        str(path), None, "iu_xray", str(tmp_path / "out"), num_heads=4, rm_num_heads=4, image_size=64
    )
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def _convert(tmp_path, state_dict, annotation_words=None, **kwargs):
    checkpoint = save_official(tmp_path / "ckpt.pth", state_dict)
    annotation = write_annotation(tmp_path / "ann.json", annotation_words) if annotation_words else None
    return convert_checkpoint(
        checkpoint, annotation, "iu_xray", str(tmp_path / "out"), num_heads=4, rm_num_heads=4, image_size=64, **kwargs
    )


def test_missing_key_is_named(tmp_path, source):
    _, official = source
    broken = {k: v for k, v in official.items() if k != "encoder_decoder.model.rm.W.weight"}
    with pytest.raises(ConversionError, match=r"missing key encoder_decoder\.model\.rm\.W\.weight") as error:
        _convert(tmp_path, broken)
    assert str(error.value).startswith(f"{tmp_path / 'ckpt.pth'}: ")
    assert not os.path.exists(tmp_path / "out")


def test_unexpected_key_is_named(tmp_path, source):
    _, official = source
    broken = dict(official, **{"encoder_decoder.model.decoder.layers.0.extra.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match=r"unexpected key 'encoder_decoder\.model\.decoder\.layers\.0\.extra"):
        _convert(tmp_path, broken)


def test_shape_mismatch_names_key_and_shapes(tmp_path, source):
    _, official = source
    key = "encoder_decoder.model.decoder.layers.1.feed_forward.w_2.weight"
    broken = dict(official, **{key: torch.zeros(32, 31)})
    with pytest.raises(ConversionError, match=re.escape(f"shape mismatch for '{key}'") + r".*\(32, 31\).*\(32, 32\)"):
        _convert(tmp_path, broken)


def test_vocabulary_size_mismatch_is_explained(tmp_path, source):
    model, official = source
    with pytest.raises(ConversionError, match=r"gives 29 tokens .* but the checkpoint has 30"):
        _convert(tmp_path, official, annotation_words=model.config.vocab_size - 4)
    assert not os.path.exists(tmp_path / "out")


def test_wrong_position_table_is_refused(tmp_path, source):
    _, official = source
    broken = dict(official, **{POSITION_TABLE_KEY: official[POSITION_TABLE_KEY] * 2})
    with pytest.raises(ConversionError, match="not the standard sinusoidal table"):
        _convert(tmp_path, broken)


def test_pickled_objects_need_unsafe_load(tmp_path, source):
    import argparse

    _, official = source
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": official, "args": argparse.Namespace(beam_size=3)}, path)
    with pytest.raises(ConversionError, match="--unsafe-load"):
        convert_checkpoint(str(path), None, "iu_xray", str(tmp_path / "out"), num_heads=4, rm_num_heads=4)
    out = convert_checkpoint(
        str(path), None, "iu_xray", str(tmp_path / "out"), num_heads=4, rm_num_heads=4, image_size=64, unsafe_load=True
    )
    assert os.path.isdir(out)


def test_cli_reports_errors_and_refuses_to_overwrite(tmp_path, source, capsys):
    model, official = source
    checkpoint = save_official(tmp_path / "model_best.pth", official)
    annotation = write_annotation(tmp_path / "annotation.json", model.config.vocab_size - 3)
    output = tmp_path / "converted"
    output.mkdir()
    (output / "keep.txt").write_text("x")
    assert cli_main(cli_args(checkpoint, annotation, output)) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(cli_args(checkpoint, annotation, output, "--overwrite")) == 0
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()


def test_infer_config_reads_the_architecture(source):
    model, official = source
    config = infer_config(official, num_views=2, num_heads=4, rm_num_heads=4)
    for name in ("vocab_size", "d_model", "d_ff", "decoder_layers", "rm_num_slots", "d_state", "d_conv", "expand"):
        assert getattr(config, name) == getattr(model.config, name), name
    assert config.vision_config.depths == VISION["depths"]
    assert config.vision_config.hidden_sizes == VISION["hidden_sizes"]
    assert config.encoder_config.dt_rank == model.config.encoder_config.dt_rank
    converted = convert_state_dict(official, config)
    assert set(converted) == set(model.state_dict())


def test_original_r2gen_checkpoint_converts_to_the_transformer_encoder():
    config = convert_config(encoder_type="transformer", encoder_layers=2)
    config.encoder_config.num_attention_heads = 4
    model, official = build_source(config)
    assert "encoder_decoder.model.encoder.layers.1.sublayer.1.norm.gamma" in official
    inferred = infer_config(official, num_views=2, num_heads=4, rm_num_heads=4, image_size=64)
    assert inferred.encoder_type == "transformer" and inferred.encoder_layers == 2
    assert inferred.encoder_config.intermediate_size == config.encoder_config.intermediate_size
    converted = convert_state_dict(official, inferred)
    from r2gen_mamba.modeling_r2gen_mamba import R2GenMambaForConditionalGeneration

    loaded = R2GenMambaForConditionalGeneration(inferred).eval()
    loaded.load_state_dict(converted, strict=True)
    pixel_values = tiny_pixel_values(config)
    decoder_input_ids = torch.tensor([[0, 5, 9, 3], [0, 7, 2, 0]])
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids).logits
        got = loaded(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids).logits
    assert torch.equal(got, expected)
