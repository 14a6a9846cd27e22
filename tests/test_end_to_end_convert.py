"""Official checkpoint -> `r2gen-mamba convert-official` -> `push_to_hub.py --dry-run` -> pipeline, end to end.

The test builds a tiny model, writes its weights in the official R2Gen-Mamba checkpoint layout (key names from
`r2gen_mamba.convert_official`, which follows docs/architecture.md; `torch.save({"epoch", "state_dict",
"optimizer", "monitor_best"})`), and checks that the report the pipeline produces from image files in the pushed
folder is the one the original model generates directly with the official decoding (beam 3, no length penalty).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from inference_utils import IMAGE_SIZE, REPORTS, load_push_to_hub_script, write_study
from transformers import pipeline

from r2gen_mamba import R2GenMambaForConditionalGeneration, R2GenMambaProcessor, R2GenMambaTokenizer
from r2gen_mamba.cli import main as cli_main
from r2gen_mamba.convert_official import (
    POSITION_TABLE_KEY,
    official_state_dict_from_hf,
    sinusoidal_position_table,
)

MAX_LENGTH = 10  # report tokens after the start token (the official max_seq_length)


def _write_annotation(path: Path) -> Path:
    # Every word appears 3 times in train, so the official IU X-Ray threshold (3) keeps them all.
    train = [
        {"id": f"tr{i}", "report": report, "image_path": [], "split": "train"} for i, report in enumerate(REPORTS * 3)
    ]
    path.write_text(json.dumps({"train": train, "val": [], "test": []}))
    return path


@pytest.mark.slow
def test_official_checkpoint_to_pipeline(tmp_path):
    annotation = _write_annotation(tmp_path / "annotation.json")
    vocab_size = len(R2GenMambaTokenizer.from_annotation(annotation, dataset_name="iu_xray", threshold=3))

    torch.manual_seed(0)
    original = R2GenMambaForConditionalGeneration(
        tiny_config(vocab_size=vocab_size, num_views=2, image_size=IMAGE_SIZE)
    ).eval()
    with torch.no_grad():  # long, image-dependent reports (see inference_utils.tiny_model)
        original.lm_head.bias[0] -= 4.0
        original.model.encoder.layers[0].mixer.out_proj.weight *= 30.0
        original.model.patch_embed.proj.weight *= 3.0
    state_dict = official_state_dict_from_hf(original.state_dict())
    assert all(key.startswith(("visual_extractor.model.", "encoder_decoder.")) for key in state_dict)
    assert "encoder_decoder.model.encoder.A_log" in state_dict and "encoder_decoder.logit.weight" in state_dict
    table = sinusoidal_position_table(original.config.max_position_embeddings, original.config.d_model)
    state_dict[POSITION_TABLE_KEY] = table.unsqueeze(0)
    checkpoint = tmp_path / "model_best.pth"
    torch.save({"epoch": 7, "state_dict": state_dict, "optimizer": {}, "monitor_best": 0.1}, checkpoint)

    converted = tmp_path / "converted"
    argv = ["convert-official", "--checkpoint", str(checkpoint), "--annotation", str(annotation)]
    argv += ["--dataset", "iu_xray", "--output", str(converted), "--num-heads", "4", "--rm-num-heads", "4"]
    argv += ["--image-size", str(IMAGE_SIZE), "--max-length", str(MAX_LENGTH)]
    assert cli_main(argv) == 0

    hub_dir = tmp_path / "hub"
    push_argv = ["--model", str(converted), "--repo-id", "someone/r2gen-mamba-converted"]
    assert load_push_to_hub_script().main([*push_argv, "--dry-run", "--output-dir", str(hub_dir)]) == 0

    studies = [
        write_study(tmp_path / "images" / f"s{i}", kinds, i)
        for i, kinds in enumerate([("png", "dcm"), ("jpg", "png")])
    ]
    pipe = pipeline(model=str(hub_dir), trust_remote_code=True, device="cpu")
    assert pipe.task == "radiology-report-generation"
    # The pipeline class comes from the folder's copy (custom_pipelines); for the model, transformers 5 prefers the
    # classes `import r2gen_mamba` registered over the folder's copy (its "explicit local code" rule).
    assert type(pipe).__module__.startswith("transformers_modules.")
    assert type(pipe.model).__module__ == "r2gen_mamba.modeling_r2gen_mamba"
    texts = [out[0]["generated_text"] for out in pipe(studies)]

    processor = R2GenMambaProcessor.from_pretrained(hub_dir)
    pixel_values = processor(images=studies, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ids = original.generate(pixel_values=pixel_values, num_beams=3, max_length=MAX_LENGTH + 1, length_penalty=0.0)
    expected = processor.batch_decode(ids, skip_special_tokens=True)
    assert texts == expected
    assert len(set(texts)) == 2 and all(len(text.split()) >= 3 for text in texts)
