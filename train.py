"""Train R2Gen-Mamba with the Hugging Face `Seq2SeqTrainer`.

    python train.py                       # demo: synthetic data generated on the fly, small model, minutes on a CPU
    python train.py --preset iu_xray --annotation data/iu_xray/annotation.json --image-dir NLMCXR_png
    python train.py --preset mimic_cxr --annotation data/mimic_cxr/annotation.json --image-dir mimic-cxr-jpg/2.1.0
    torchrun --nproc_per_node 8 train.py --preset mimic_cxr ...                # DDP (CPU-only machines: gloo)
    accelerate launch --multi_gpu --num_processes 8 train.py --preset mimic_cxr ...
    accelerate launch --config_file fsdp.yaml train.py --preset mimic_cxr ...  # FSDP / DeepSpeed configs

Presets (`r2gen_mamba.training.PRESETS`) hold the paper recipe; every value can be overridden here. The run writes
into `--output-dir`: checkpoints (each with its processor), the best model and processor (`from_pretrained`-able),
`test_results.json`, `predictions.csv` and `training_curves.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import EarlyStoppingCallback, ResNetConfig, Seq2SeqTrainingArguments, set_seed
from transformers.utils import logging

import r2gen_mamba  # noqa: F401  (registers the Auto classes)
from r2gen_mamba.configuration_r2gen_mamba import R2GenMambaConfig
from r2gen_mamba.data import R2GenMambaDataCollator, check_images, load_annotation_dataset
from r2gen_mamba.modeling_r2gen_mamba import R2GenMambaForConditionalGeneration
from r2gen_mamba.processing_r2gen_mamba import R2GenMambaImageProcessor, R2GenMambaProcessor, R2GenMambaTokenizer
from r2gen_mamba.training import (
    PRESETS,
    R2GenMambaTrainer,
    ReportMetrics,
    TrainingPreset,
    configure_generation,
    last_complete_checkpoint,
    num_update_steps_per_epoch,
    plot_training_curves,
    write_predictions_csv,
)

logger = logging.get_logger("train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="recipe to start from (default: demo)")

    data = p.add_argument_group("data")
    data.add_argument("--annotation", help="annotation.json (R2Gen format); demo: generated when omitted")
    data.add_argument("--image-dir", help="root of the annotation's image paths (default: next to the annotation)")
    data.add_argument("--dataset-name", choices=["iu_xray", "mimic_cxr"], help="report cleaning variant")
    data.add_argument("--num-views", type=int, help="images per study (2 IU X-Ray, 1 MIMIC-CXR)")
    data.add_argument("--image-size", type=int, help="input resolution")
    data.add_argument("--max-length", type=int, help="R2Gen max_seq_length: tokens per report, bos/eos included")
    data.add_argument("--threshold", type=int, help="minimum train-split count of a token to enter the vocabulary")
    data.add_argument(
        "--train-crop", action=argparse.BooleanOptionalAction, help="random-crop augmentation (R2Gen: on)"
    )
    data.add_argument(
        "--train-flip", action=argparse.BooleanOptionalAction, help="random horizontal flip augmentation (R2Gen: on)"
    )
    data.add_argument("--skip-bad-images", action="store_true", help="drop records with missing/unreadable images")
    data.add_argument("--skip-empty-reports", action="store_true", help="drop records with an empty report")
    data.add_argument("--demo-studies", type=int, help="studies in the generated synthetic set (demo)")
    data.add_argument("--num-workers", type=int, default=0, help="dataloader worker processes")
    data.add_argument(
        "--cpu-threads", type=int, help="torch threads on a CPU-only machine (demo: 1; OMP_NUM_THREADS wins)"
    )

    model = p.add_argument_group("model")
    model.add_argument("--model-name-or-path", help="fine-tune an existing R2Gen-Mamba folder/Hub id (its processor)")
    model.add_argument(
        "--vision-model", help="ImageNet ResNet for the visual extractor: Hub id (microsoft/resnet-101) or folder"
    )
    model.add_argument(
        "--no-vision-model", action="store_true", help="train the visual extractor from scratch (ignore the preset's)"
    )
    model.add_argument("--encoder-type", choices=["mamba", "transformer"], help="encoder (default: mamba)")
    model.add_argument(
        "--model-config",
        help="R2GenMambaConfig fields over the preset's, as a JSON object or a .json file "
        '(e.g. \'{"d_model": 256, "decoder_layers": 2}\')',
    )

    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=float, help="training epochs")
    optim.add_argument("--max-steps", type=int, default=-1, help="stop after this many updates (overrides --epochs)")
    optim.add_argument("--batch-size", type=int, help="per-device training batch size")
    optim.add_argument("--eval-batch-size", type=int, help="per-device evaluation batch size")
    optim.add_argument("--gradient-accumulation-steps", type=int, default=1)
    optim.add_argument("--lr-visual", type=float, help="learning rate of the visual extractor")
    optim.add_argument("--lr-rest", type=float, help="learning rate of everything else")
    optim.add_argument("--weight-decay", type=float, help="Adam weight decay (not on A_log, D, norms, biases)")
    optim.add_argument("--lr-step-size", type=int, help="epochs between learning-rate drops (StepLR)")
    optim.add_argument("--lr-gamma", type=float, help="learning-rate drop factor (StepLR)")
    optim.add_argument("--clip-value", type=float, help="clip gradients by value (0 disables)")
    optim.add_argument("--seed", type=int, help="random seed")
    precision = optim.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    precision.add_argument("--fp16", action="store_true", help="float16 mixed precision (CUDA)")

    evaluation = p.add_argument_group("evaluation and checkpoints")
    evaluation.add_argument("--num-beams", type=int, help="beam size for validation/test generation")
    evaluation.add_argument("--eval-strategy", choices=["epoch", "steps", "no"], help="when to validate")
    evaluation.add_argument("--eval-steps", type=int, help="validate every N updates (implies --eval-strategy steps)")
    evaluation.add_argument("--eval-every-epochs", type=int, help="validate every N epochs")
    evaluation.add_argument("--save-steps", type=int, help="checkpoint every N updates (default: at each validation)")
    evaluation.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (best and last kept)")
    evaluation.add_argument("--early-stopping-patience", type=int, help="validations without improvement (0: off)")
    evaluation.add_argument("--logging-steps", type=int, default=10)
    evaluation.add_argument("--max-eval-samples", type=int, help="validate on the first N validation studies")
    evaluation.add_argument(
        "--resume-from-checkpoint", help="checkpoint folder, or 'last' for the newest complete one in --output-dir"
    )

    run = p.add_argument_group("run")
    run.add_argument("--output-dir", help="where everything is written (default: outputs/<preset>)")
    run.add_argument("--overwrite-output-dir", action="store_true", help="allow an output dir that has checkpoints")
    run.add_argument("--report-to", default="none", help="tensorboard, wandb, ... (default: none)")
    run.add_argument("--disable-tqdm", action="store_true", help="no progress bars")
    run.add_argument("--fsdp", help="Trainer FSDP options, e.g. 'full_shard auto_wrap' (or use accelerate configs)")
    run.add_argument("--deepspeed", help="DeepSpeed JSON config (or use accelerate configs)")
    return p.parse_args(argv)


def _has_accelerator() -> bool:
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def resolve_preset(args: argparse.Namespace) -> TrainingPreset:
    preset = PRESETS[args.preset].override(
        dataset_name=args.dataset_name,
        num_views=args.num_views,
        image_size=args.image_size,
        max_length=args.max_length,
        threshold=args.threshold,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr_visual=args.lr_visual,
        lr_rest=args.lr_rest,
        weight_decay=args.weight_decay,
        lr_step_size=args.lr_step_size,
        lr_gamma=args.lr_gamma,
        clip_value=args.clip_value,
        num_beams=args.num_beams,
        seed=args.seed,
        early_stopping_patience=args.early_stopping_patience,
        eval_every_epochs=args.eval_every_epochs,
        train_crop=args.train_crop,
        train_flip=args.train_flip,
        cpu_threads=args.cpu_threads,
        vision_model=args.vision_model,
        demo_num_studies=args.demo_studies,
    )
    if args.no_vision_model:
        preset = preset.override(vision_model="")
    model_kwargs = dict(preset.model)
    if args.model_config:
        text = args.model_config
        if os.path.isfile(text):
            with open(text, encoding="utf-8") as handle:
                text = handle.read()
        try:
            overrides = json.loads(text)
        except ValueError as error:
            raise SystemExit(
                f"--model-config: not a JSON object or .json file: {args.model_config!r} ({error})"
            ) from None
        if not isinstance(overrides, dict):
            raise SystemExit(f"--model-config: expected a JSON object, got {type(overrides).__name__}")
        model_kwargs.update(overrides)
    if args.encoder_type:
        model_kwargs["encoder_type"] = args.encoder_type
    return preset.override(model=model_kwargs)


def prepare_data(args: argparse.Namespace, preset: TrainingPreset, output_dir: str) -> tuple[str, str | None]:
    """The annotation and image root; for the demo without `--annotation`, generate the synthetic set once."""
    if args.annotation:
        return args.annotation, args.image_dir
    if not preset.demo_num_studies:
        raise SystemExit(f"--annotation is required for preset {preset.name!r} (see `r2gen-mamba prepare-data`)")
    from r2gen_mamba.synthetic import generate_demo_dataset

    data_dir = os.path.join(output_dir, "demo_data")
    annotation = os.path.join(data_dir, "annotation.json")
    if os.path.isfile(annotation):
        logger.info(f"Using the synthetic dataset already in {data_dir}")
    else:
        annotation = str(
            generate_demo_dataset(
                data_dir,
                num_studies=preset.demo_num_studies,
                num_views=preset.num_views,
                image_size=preset.image_size,
                seed=preset.seed,
            )
        )
    return annotation, args.image_dir


def build_processor(annotation: str, preset: TrainingPreset) -> R2GenMambaProcessor:
    """Vocabulary from the train split (R2Gen rule), image processor at the preset's resolution."""
    tokenizer = R2GenMambaTokenizer.from_annotation(
        annotation, dataset_name=preset.dataset_name, threshold=preset.threshold, model_max_length=preset.max_length
    )
    image_processor = R2GenMambaImageProcessor(
        size={"height": preset.image_size, "width": preset.image_size},
        # R2Gen resizes to 256 and crops 224; keep that ratio at other resolutions (no crop: resize to the input size).
        train_resize_shortest_edge=round(preset.image_size * 256 / 224) if preset.train_crop else preset.image_size,
        do_flip=preset.train_flip,
    )
    return R2GenMambaProcessor(image_processor=image_processor, tokenizer=tokenizer, num_views=preset.num_views)


def build_model(preset: TrainingPreset, vocab_size: int) -> R2GenMambaForConditionalGeneration:
    kwargs = dict(preset.model)
    if isinstance(kwargs.get("vision_config"), dict):
        kwargs["vision_config"] = ResNetConfig(**kwargs["vision_config"])
    config = R2GenMambaConfig(
        vocab_size=vocab_size,
        num_views=preset.num_views,
        image_size=preset.image_size,
        vision_model_name_or_path=preset.vision_model or None,
        **kwargs,
    )
    model = R2GenMambaForConditionalGeneration(config)
    if preset.vision_model:
        model.load_vision_weights(preset.vision_model)
    return model


def build_training_arguments(
    args: argparse.Namespace, preset: TrainingPreset, output_dir: str, steps_per_epoch: int
) -> Seq2SeqTrainingArguments:
    # Validate every `eval_every_epochs` epochs unless told otherwise; `--eval-steps` alone implies "steps".
    eval_strategy = args.eval_strategy or ("steps" if args.eval_steps or preset.eval_every_epochs != 1 else "epoch")
    eval_steps = args.eval_steps or preset.eval_every_epochs * steps_per_epoch
    evaluating = eval_strategy != "no"
    has_accelerator = _has_accelerator()

    if evaluating:
        # The best model is chosen at validations, so checkpoints go with them (save_steps a multiple of eval_steps).
        save_strategy = eval_strategy
        save_steps = args.save_steps or eval_steps
    elif args.save_steps:
        save_strategy, save_steps = "steps", args.save_steps
    else:
        save_strategy, save_steps = "epoch", None

    return Seq2SeqTrainingArguments(
        output_dir=output_dir,
        seed=preset.seed,
        data_seed=preset.seed,
        num_train_epochs=preset.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=preset.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or preset.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=preset.lr_rest,  # logged value; the optimizer has its own groups (R2GenMambaTrainer)
        weight_decay=preset.weight_decay,
        max_grad_norm=0.0,  # R2Gen clips by value (R2GenMambaTrainer.clip_value), never by norm
        eval_strategy=eval_strategy,
        eval_steps=eval_steps if eval_strategy == "steps" else None,
        save_strategy=save_strategy,
        save_steps=save_steps if save_strategy == "steps" else None,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=evaluating,
        metric_for_best_model="bleu_4" if evaluating else None,
        greater_is_better=True if evaluating else None,
        predict_with_generate=True,
        generation_num_beams=preset.num_beams,
        generation_max_length=preset.max_length + 1,  # counts the start token (see configure_generation)
        logging_steps=args.logging_steps,
        logging_first_step=True,
        report_to=args.report_to,
        disable_tqdm=args.disable_tqdm,
        remove_unused_columns=False,  # the collator reads image paths and reports
        dataloader_num_workers=args.num_workers,
        bf16=args.bf16,
        fp16=args.fp16,
        # Without an accelerator, torchrun processes only form a DDP group when told to run on CPU, over gloo.
        use_cpu=not has_accelerator,
        ddp_backend="gloo" if not has_accelerator and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        fsdp=args.fsdp or None,
        deepspeed=args.deepspeed,
    )


def resolve_resume(value: str | None, output_dir: str, is_main: bool) -> str | None:
    if not value:
        return None
    if value == "last":
        checkpoint = last_complete_checkpoint(output_dir, remove_incomplete=is_main)
        if checkpoint is None:
            logger.warning(f"--resume-from-checkpoint last: no complete checkpoint in {output_dir}; starting afresh")
        return checkpoint
    if not os.path.isdir(value):
        raise SystemExit(f"--resume-from-checkpoint: {value} is not a folder")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = resolve_preset(args)
    output_dir = args.output_dir or os.path.join("outputs", preset.name)
    logging.set_verbosity_info()
    logging.enable_explicit_format()
    if preset.cpu_threads and not _has_accelerator() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(preset.cpu_threads)
    start = time.time()

    if (
        not args.resume_from_checkpoint
        and not args.overwrite_output_dir
        and last_complete_checkpoint(output_dir) is not None
    ):
        raise SystemExit(
            f"{output_dir} already has checkpoints: pass --resume-from-checkpoint last to continue, "
            "--overwrite-output-dir to start again there, or another --output-dir"
        )

    # A first TrainingArguments only to know the process layout (main process, world size) before data exists.
    probe = build_training_arguments(args, preset, output_dir, steps_per_epoch=1)
    # The main process writes the synthetic set first; the others wait, then find it there.
    with probe.main_process_first(local=probe.save_on_each_node, desc="dataset"):
        annotation, image_dir = prepare_data(args, preset, output_dir)

    if args.model_name_or_path:
        processor = R2GenMambaProcessor.from_pretrained(args.model_name_or_path)
    else:
        processor = build_processor(annotation, preset)
    if probe.should_save:
        processor.save_pretrained(output_dir)

    dataset = load_annotation_dataset(
        annotation, image_dir, num_views=preset.num_views, skip_empty_reports=args.skip_empty_reports
    )
    dataset = check_images(dataset, skip=args.skip_bad_images, num_views=preset.num_views)
    train_set, val_set, test_set = dataset["train"], dataset["val"], dataset["test"]
    if args.max_eval_samples:
        val_set = val_set.select(range(min(args.max_eval_samples, len(val_set))))

    steps_per_epoch = num_update_steps_per_epoch(
        len(train_set), preset.batch_size, probe.world_size, args.gradient_accumulation_steps
    )
    training_args = build_training_arguments(args, preset, output_dir, steps_per_epoch)

    set_seed(preset.seed)
    if args.model_name_or_path:
        model = R2GenMambaForConditionalGeneration.from_pretrained(args.model_name_or_path)
    else:
        model = build_model(preset, vocab_size=len(processor.tokenizer))
    # Saved with every checkpoint, so a checkpoint generates like the validation did.
    configure_generation(model, preset.num_beams, preset.max_length)

    callbacks = []
    if training_args.eval_strategy != "no" and preset.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=preset.early_stopping_patience))
    # The synthetic demo set carries ground-truth findings: validation and test also score them.
    compute_metrics = ReportMetrics(
        processor, findings=val_set["findings"] if "findings" in val_set.column_names else None
    )
    trainer = R2GenMambaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=val_set if training_args.eval_strategy != "no" else None,
        data_collator=R2GenMambaDataCollator(processor, train=True),
        eval_data_collator=R2GenMambaDataCollator(processor, train=False),
        processing_class=processor,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        lr_visual=preset.lr_visual,
        lr_rest=preset.lr_rest,
        lr_step_size=preset.lr_step_size,
        lr_gamma=preset.lr_gamma,
        clip_value=preset.clip_value,
    )

    resume = resolve_resume(args.resume_from_checkpoint, output_dir, training_args.should_save)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(output_dir)  # the best model when validating (load_best_model_at_end), else the last
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    compute_metrics.findings = test_set["findings"] if "findings" in test_set.column_names else None
    prediction = trainer.predict(test_set, metric_key_prefix="test")
    metrics = dict(prediction.metrics)
    # Scoring the test set decoded both sides already.
    generated, references = compute_metrics.last_predictions, compute_metrics.last_references
    trainer.log_metrics("test", metrics)
    trainer.save_metrics("test", metrics)
    if training_args.should_save:
        write_predictions_csv(os.path.join(output_dir, "predictions.csv"), test_set["id"], references, generated)
        plot_training_curves(trainer.state.log_history, os.path.join(output_dir, "training_curves.png"))
        print(
            f"Done in {time.time() - start:.0f}s. Test: "
            + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float))
            + f"\nModel and processor: {output_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
