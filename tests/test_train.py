"""Training: the R2Gen recipe pieces (`r2gen_mamba.training`) and `train.py` end to end.

The in-process tests use the tiny model of `helpers.tiny_config`; the `slow` ones run `train.py` in subprocesses
(single process, 2-process torchrun/accelerate over gloo, kill-then-resume, determinism) on a tiny synthetic set.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, tiny_labels, tiny_pixel_values
from PIL import Image
from transformers import Seq2SeqTrainingArguments, TrainerCallback

from r2gen_mamba.data import R2GenMambaDataCollator, load_annotation_dataset
from r2gen_mamba.modeling_r2gen_mamba import R2GenMambaForConditionalGeneration
from r2gen_mamba.processing_r2gen_mamba import R2GenMambaImageProcessor, R2GenMambaProcessor, R2GenMambaTokenizer
from r2gen_mamba.synthetic import generate_demo_dataset
from r2gen_mamba.training import (
    PRESETS,
    R2GenMambaTrainer,
    build_optimizer,
    epoch_step_schedule,
    last_complete_checkpoint,
    no_decay_parameter_names,
    optimizer_parameter_groups,
)

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = str(REPO / "train.py")
# A tiny model for train.py runs (32 px images, d_model 32), given through --model-config.
TINY_MODEL = json.dumps(
    {
        "vision_config": {"embedding_size": 8, "hidden_sizes": [8, 16, 16, 32], "depths": [1, 1, 1, 1]},
        "d_model": 32,
        "num_heads": 4,
        "d_ff": 32,
        "decoder_layers": 1,
        "rm_num_heads": 4,
        "d_state": 4,
    }
)
CLIP = float(torch.tensor(0.1))  # 0.1 in float32, the bound clip_grad_value_ applies to float32 gradients
TEST_KEYS = {f"test_bleu_{n}" for n in range(1, 5)} | {"test_meteor", "test_rouge_l", "test_cider"}


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer groups, clipping, schedule
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder_type", ["mamba", "transformer"])
def test_parameter_groups_learning_rates_and_weight_decay(encoder_type):
    model = R2GenMambaForConditionalGeneration(tiny_config(encoder_type=encoder_type))
    groups = optimizer_parameter_groups(model, lr_visual=5e-5, lr_rest=1e-4, weight_decay=5e-5)
    by_name = {group["name"]: group for group in groups}
    assert set(by_name) == {"rest", "rest_no_decay", "visual_extractor", "visual_extractor_no_decay"}

    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(names.values()), "every parameter exactly once"
    for group in groups:
        visual = group["name"].startswith("visual_extractor")
        assert group["lr"] == (5e-5 if visual else 1e-4)
        assert group["weight_decay"] == (0.0 if group["name"].endswith("no_decay") else 5e-5)
        assert all(names[id(p)].startswith("model.visual_extractor.") == visual for p in group["params"])

    # Independent characterisation: in this model the no-decay parameters are exactly the 1-D ones (biases, norm
    # scales/shifts, Mamba's D) plus Mamba's 2-D A_log.
    no_decay = no_decay_parameter_names(model)
    expected = {n for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".A_log")}
    assert no_decay == expected
    decayed = {names[id(p)] for group in groups if not group["name"].endswith("no_decay") for p in group["params"]}
    assert decayed.isdisjoint(no_decay)
    assert any(n.endswith("normalization.weight") for n in no_decay)  # ResNet BatchNorm
    assert "model.decoder.norm.gamma" in no_decay
    assert any(n.endswith("_norm.gamma") for n in no_decay)  # MCLN
    assert any("mlp_gamma" in n and n.endswith(".weight") for n in decayed)  # MCLN's conditioning MLP is a weight
    assert "model.decoder.embed_tokens.weight" in decayed
    if encoder_type == "mamba":
        assert {n.rsplit(".", 1)[1] for n in no_decay if ".mixer." in n} == {"A_log", "D", "bias"}
        assert any(n.endswith("in_proj.weight") for n in decayed)


def test_parameter_groups_skip_frozen_parameters():
    model = R2GenMambaForConditionalGeneration(tiny_config())
    model.model.visual_extractor.requires_grad_(False)
    groups = optimizer_parameter_groups(model, 5e-5, 1e-4, 5e-5)
    assert {group["name"] for group in groups} == {"rest", "rest_no_decay"}


def _loss(model, scale=1.0):
    config = model.config
    return model(pixel_values=tiny_pixel_values(config), labels=tiny_labels(config)).loss * scale


def test_clip_by_value_clips_before_the_update():
    torch.manual_seed(0)
    model = R2GenMambaForConditionalGeneration(tiny_config())
    reference = R2GenMambaForConditionalGeneration(tiny_config())
    reference.load_state_dict(model.state_dict())
    model.train(False)
    reference.train(False)

    optimizer = build_optimizer(model, 5e-5, 1e-4, weight_decay=5e-5, clip_value=0.1)
    _loss(model, scale=1e3).backward()
    before = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    assert before > 0.1, "the test needs gradients larger than the clip value"
    optimizer.step()
    after = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    assert after <= CLIP

    # The update is plain Adam(amsgrad) on the clipped gradients.
    plain = torch.optim.Adam(optimizer_parameter_groups(reference, 5e-5, 1e-4, 5e-5), amsgrad=True)
    _loss(reference, scale=1e3).backward()
    torch.nn.utils.clip_grad_value_(reference.parameters(), 0.1)
    plain.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_no_clipping_when_disabled():
    model = R2GenMambaForConditionalGeneration(tiny_config())
    model.train(False)
    optimizer = build_optimizer(model, 5e-5, 1e-4, clip_value=None)
    _loss(model, scale=1e3).backward()
    optimizer.step()
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) > 0.1
    assert all(group["amsgrad"] for group in optimizer.param_groups)


def _schedule_lrs(scheduler, optimizer, steps):
    lrs = []
    for _ in range(steps):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def test_epoch_step_schedule_changes_only_at_epoch_boundaries_and_resumes():
    param = torch.nn.Parameter(torch.zeros(1))
    other = torch.nn.Parameter(torch.zeros(1))

    def make():
        optimizer = torch.optim.Adam([{"params": [param], "lr": 1e-4}, {"params": [other], "lr": 5e-5}])
        return optimizer, epoch_step_schedule(optimizer, steps_per_epoch=3, step_size=2, gamma=0.1)

    optimizer, scheduler = make()
    lrs = _schedule_lrs(scheduler, optimizer, 13)
    # Updates 0-5 are epochs 0-1 (full LR), 6-11 epochs 2-3 (x0.1), 12 epoch 4 (x0.01).
    for step, (rest, visual) in enumerate(lrs):
        factor = 0.1 ** (step // 6)
        assert rest == pytest.approx(1e-4 * factor) and visual == pytest.approx(5e-5 * factor), step

    # Resume at update 5 (mid-epoch): a fresh optimizer/scheduler loaded from the saved states continues identically.
    optimizer, scheduler = make()
    _schedule_lrs(scheduler, optimizer, 5)
    saved = scheduler.state_dict(), optimizer.state_dict()
    resumed_optimizer, resumed = make()
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    assert _schedule_lrs(resumed, resumed_optimizer, 8) == lrs[5:13]


def test_mimic_schedule_decays_every_epoch():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1e-4)
    preset = PRESETS["mimic_cxr"]
    scheduler = epoch_step_schedule(optimizer, 4, preset.lr_step_size, preset.lr_gamma)
    lrs = [lr for (lr,) in _schedule_lrs(scheduler, optimizer, 12)]
    assert lrs == pytest.approx([1e-4 * 0.8 ** (step // 4) for step in range(12)])


def test_presets_follow_the_paper_recipe():
    iu, mimic = PRESETS["iu_xray"], PRESETS["mimic_cxr"]
    assert (iu.lr_visual, iu.lr_rest, iu.weight_decay, iu.clip_value) == (5e-5, 1e-4, 5e-5, 0.1)
    assert (iu.lr_step_size, iu.lr_gamma, mimic.lr_step_size, mimic.lr_gamma) == (50, 0.1, 1, 0.8)
    assert (iu.seed, mimic.seed, iu.batch_size, mimic.batch_size) == (9223, 456789, 16, 16)
    assert (iu.epochs, mimic.epochs, iu.max_length, mimic.max_length) == (100, 30, 60, 100)
    assert (iu.threshold, mimic.threshold, iu.num_views, mimic.num_views) == (3, 10, 2, 1)
    assert iu.num_beams == mimic.num_beams == 3 and iu.early_stopping_patience == 50


# ---------------------------------------------------------------------------------------------------------------------
# The Trainer subclass, in process
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """24 synthetic studies (2 views, 32 px): 17 train / 2 val / 5 test."""
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_studies=24, image_size=32, seed=0)


class _GradientProbe(TrainerCallback):
    """Records the largest gradient element and the LRs right after each optimizer step (before zero_grad)."""

    def __init__(self):
        self.max_grad, self.lrs = [], []

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.max_grad.append(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))
        self.lrs.append({group["name"]: group["lr"] for group in optimizer.param_groups})


def test_trainer_builds_the_recipe_optimizer_and_clips(tiny_data, tmp_path):
    tokenizer = R2GenMambaTokenizer.from_annotation(tiny_data, threshold=1, model_max_length=20)
    image_processor = R2GenMambaImageProcessor(size={"height": 32, "width": 32}, train_resize_shortest_edge=36)
    processor = R2GenMambaProcessor(image_processor, tokenizer, num_views=2)
    dataset = load_annotation_dataset(tiny_data)
    model = R2GenMambaForConditionalGeneration(tiny_config(vocab_size=len(tokenizer), image_size=32))
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        weight_decay=5e-5,
        max_grad_norm=0.0,
        remove_unused_columns=False,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    probe = _GradientProbe()
    trainer = R2GenMambaTrainer(
        model=model,
        args=args,
        train_dataset=dataset["train"],
        data_collator=R2GenMambaDataCollator(processor, train=True),
        callbacks=[probe],
        lr_visual=5e-5,
        lr_rest=1e-3,
        lr_step_size=1,
        lr_gamma=0.5,
        clip_value=0.1,
    )
    trainer.train()
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert len(probe.max_grad) == 3 and max(probe.max_grad) <= CLIP
    # 17 train studies / batch 4 = 5 updates per epoch: all 3 updates are in epoch 0, at the base LRs.
    assert probe.lrs[0] == {
        "rest": 1e-3,
        "rest_no_decay": 1e-3,
        "visual_extractor": 5e-5,
        "visual_extractor_no_decay": 5e-5,
    }
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 5e-5


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint selection
# ---------------------------------------------------------------------------------------------------------------------


def _fake_checkpoint(root: Path, step: int, state: str | None, weights: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir()
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 8)
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_last_complete_checkpoint_skips_partial_ones(tmp_path):
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    assert last_complete_checkpoint(str(tmp_path)) is None
    _fake_checkpoint(tmp_path, 2, json.dumps({"global_step": 2}))
    _fake_checkpoint(tmp_path, 10, json.dumps({"global_step": 10}))
    truncated = _fake_checkpoint(tmp_path, 12, json.dumps({"global_step": 12, "log_history": []})[:15])
    no_state = _fake_checkpoint(tmp_path, 14, None)
    no_weights = _fake_checkpoint(tmp_path, 16, json.dumps({"global_step": 16}), weights=False)
    wrong_step = _fake_checkpoint(tmp_path, 18, json.dumps({"global_step": 4}))
    (tmp_path / "checkpoint-99-tmp").mkdir()
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert truncated.exists()
    assert last_complete_checkpoint(str(tmp_path), remove_incomplete=True) == str(tmp_path / "checkpoint-10")
    assert not any(p.exists() for p in (truncated, no_state, no_weights, wrong_step))
    assert (tmp_path / "checkpoint-2").exists() and (tmp_path / "checkpoint-99-tmp").exists()


# ---------------------------------------------------------------------------------------------------------------------
# train.py in subprocesses
# ---------------------------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process: several processes share few cores, and oversubscription only slows them down.
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _train_args(annotation: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--annotation",
        str(annotation),
        "--output-dir",
        str(output_dir),
        "--image-size",
        "32",
        "--model-config",
        TINY_MODEL,
        "--batch-size",
        "4",
        "--max-length",
        "20",
        "--logging-steps",
        "1",
        "--disable-tqdm",
        *extra,
    ]


def _run(command: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _read_predictions(output_dir: Path) -> list[dict[str, str]]:
    with open(output_dir / "predictions.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _check_outputs(output_dir: Path, annotation: Path) -> dict[str, float]:
    test_ids = [record["id"] for record in json.loads(annotation.read_text())["test"]]
    results = json.loads((output_dir / "test_results.json").read_text())
    assert TEST_KEYS | {"test_finding_accuracy"} <= set(results)
    assert all(0.0 <= results[key] <= 10.0 for key in TEST_KEYS)
    rows = _read_predictions(output_dir)
    assert [row["id"] for row in rows] == test_ids
    assert all(row["reference"] and set(row) == {"id", "reference", "generated"} for row in rows)
    with Image.open(output_dir / "training_curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
    return results


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_train_py_end_to_end_saves_reloads_and_generates(tiny_data, tmp_path):
    output_dir = tmp_path / "run"
    _run(
        [sys.executable, TRAIN_PY]
        + _train_args(
            tiny_data,
            output_dir,
            "--max-steps",
            "8",
            "--eval-steps",
            "4",
            "--num-beams",
            "2",
            "--lr-rest",
            "1e-3",
            "--lr-step-size",
            "1",
            "--lr-gamma",
            "0.5",
        )
    )
    results = _check_outputs(output_dir, tiny_data)
    assert 0.0 <= results["test_finding_accuracy"] <= 1.0

    # Logged LR (the one each update used): 17 train studies / batch 4 = 5 updates per epoch, x0.5 per epoch.
    state = json.loads((output_dir / "trainer_state.json").read_text())
    logged = {entry["step"]: entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry}
    assert logged == pytest.approx({step: 1e-3 * 0.5 ** ((step - 1) // 5) for step in range(1, 9)})
    assert any("eval_bleu_4" in entry for entry in state["log_history"])
    assert state["best_model_checkpoint"] is not None

    # The output folder and each checkpoint load on their own and generate what predictions.csv says.
    checkpoints = sorted(output_dir.glob("checkpoint-*"))
    assert checkpoints
    for folder in [output_dir, *checkpoints]:
        R2GenMambaProcessor.from_pretrained(folder)
    model = R2GenMambaForConditionalGeneration.from_pretrained(output_dir).eval()
    processor = R2GenMambaProcessor.from_pretrained(output_dir)
    # --max-length 20 is R2Gen's max_seq_length; the generation config counts the start token too.
    assert model.generation_config.num_beams == 2 and model.generation_config.max_length == 21
    test = load_annotation_dataset(tiny_data)["test"]
    inputs = processor(images=[list(test[0]["image_paths"])], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(pixel_values=inputs["pixel_values"])
    expected = _read_predictions(output_dir)[0]["generated"]
    assert processor.batch_decode(generated, skip_special_tokens=True)[0] == expected


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tiny_data, tmp_path):
    output_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(_free_port()), TRAIN_PY] + _train_args(tiny_data, output_dir, "--max-steps", "4")
    result = _run(command)
    log = result.stdout + result.stderr
    # Two ranks of batch 4 each: one DDP group, not two independent runs.
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in log
    _check_outputs(output_dir, tiny_data)
    model = R2GenMambaForConditionalGeneration.from_pretrained(output_dir)
    assert model.config.vocab_size == len(R2GenMambaProcessor.from_pretrained(output_dir).tokenizer)


@pytest.mark.slow
def test_accelerate_launch_two_processes_on_cpu(tiny_data, tmp_path):
    # accelerate 1.x runs `--cpu` through its single-process launcher (several CPU processes need mpirun), so the
    # 2-process CPU launch goes through `--multi_gpu`, i.e. torchrun; train.py then picks CPU + gloo itself.
    output_dir = tmp_path / "accelerate"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(_free_port()), TRAIN_PY]
    command += _train_args(tiny_data, output_dir, "--max-steps", "4", "--eval-strategy", "no")
    result = _run(command)
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in result.stdout + result.stderr
    _check_outputs(output_dir, tiny_data)
    R2GenMambaForConditionalGeneration.from_pretrained(output_dir)


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    found = []
    for path in output_dir.glob("checkpoint-*"):
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if state.get("global_step") == int(path.name.split("-")[1]):
            found.append(path)
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


@pytest.mark.slow
def test_killed_run_resumes_from_last_complete_checkpoint(tiny_data, tmp_path):
    output_dir = tmp_path / "resume"
    max_steps = 30
    args = _train_args(tiny_data, output_dir, "--max-steps", str(max_steps), "--eval-strategy", "no")
    process = subprocess.Popen(
        [sys.executable, TRAIN_PY, *args, "--save-steps", "1", "--save-total-limit", "3"],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while len(_complete_checkpoints(output_dir)) < 2:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (output_dir / "test_results.json").exists(), "the run was killed before finishing"

    # Make the newest complete checkpoint partial (a kill while writing trainer_state.json): resume must skip it.
    complete = _complete_checkpoints(output_dir)
    newest, previous = complete[-1], complete[-2]
    state_file = newest / "trainer_state.json"
    state_file.write_text(state_file.read_text()[:40])

    result = _run([sys.executable, TRAIN_PY, *args, "--resume-from-checkpoint", "last", "--save-steps", "100"])
    log = result.stdout + result.stderr
    assert f"Skipping incomplete checkpoint {newest}" in log
    resumed_step = int(previous.name.split("-")[1])
    assert f"global step {resumed_step}" in log
    final_state = json.loads((output_dir / "trainer_state.json").read_text())
    assert final_state["global_step"] == max_steps
    steps_logged = [entry["step"] for entry in final_state["log_history"] if "loss" in entry]
    assert steps_logged[-1] == max_steps and resumed_step + 1 in steps_logged
    _check_outputs(output_dir, tiny_data)
    R2GenMambaForConditionalGeneration.from_pretrained(output_dir)


@pytest.mark.slow
def test_same_seed_same_metrics(tiny_data, tmp_path):
    runs = []
    for name in ("a", "b"):
        output_dir = tmp_path / name
        args = _train_args(tiny_data, output_dir, "--max-steps", "5", "--eval-strategy", "no")
        _run([sys.executable, TRAIN_PY, *args])
        results = json.loads((output_dir / "test_results.json").read_text())
        state = json.loads((output_dir / "trainer_state.json").read_text())
        losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        runs.append(({k: v for k, v in results.items() if "runtime" not in k and "per_second" not in k}, losses))
        runs[-1] += (_read_predictions(output_dir),)
    (metrics_a, losses_a, rows_a), (metrics_b, losses_b, rows_b) = runs
    assert metrics_a == metrics_b
    assert losses_a == losses_b and len(losses_a) == 5
    assert rows_a == rows_b
