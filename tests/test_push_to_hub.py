"""`push_to_hub.py`: the Hub folder, the model card parsed back with huggingface_hub, and the upload calls.

The Hub is unreachable from the test machines, so the upload goes to a stand-in `HfApi` that records its calls
(the only mock in the project). Everything else is real: the folder, the card, the metadata parser.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import CommitInfo, ModelCard, metadata_load
from inference_utils import load_push_to_hub_script, save_tiny_model

from r2gen_mamba.hub import REMOTE_CODE_FILES, REQUIRED_FILES, TAGS, read_eval_results

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"bleu_1": 0.4812, "bleu_2": 0.3101, "bleu_3": 0.2245, "bleu_4": 0.1707, "meteor": 0.1932, "rouge_l": 0.3651}


push_to_hub = load_push_to_hub_script()


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls, snapshots the uploaded folder, returns a commit."""

    def __init__(self):
        self.calls = []
        self.uploaded_files = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        folder = Path(folder_path)
        self.uploaded_files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        oid = "0123456789abcdef0123456789abcdef01234567"
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
            commit_message=kwargs.get("commit_message", ""),
            commit_description="",
            oid=oid,
        )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("push") / "model")


@pytest.fixture(scope="module")
def metrics_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("metrics") / "metrics.json"
    # The shape of `r2gen-mamba evaluate`'s metrics.json: flat NLG keys, nested extras and conventions.
    payload = dict(METRICS, cider=0.4321, baseline_shuffled={"bleu_4": 0.107}, conventions={"clean": "iu_xray"})
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture(scope="module")
def dry_run_folder(model_dir, metrics_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("hub") / "out"
    argv = ["--model", str(model_dir), "--repo-id", "someone/r2gen-mamba-tiny", "--eval-results", str(metrics_file)]
    assert push_to_hub.main([*argv, "--dry-run", "--output-dir", str(output)]) == 0
    return output


def test_dry_run_writes_the_hub_layout(dry_run_folder):
    names = {p.name for p in dry_run_folder.iterdir()}
    assert set(REQUIRED_FILES) <= names
    assert {"tokenizer_config.json", "vocab.json", "processor_config.json", "preprocessor_config.json"} <= names
    config = json.loads((dry_run_folder / "config.json").read_text())
    assert (
        config["auto_map"]["AutoModelForImageTextToText"] == "modeling_r2gen_mamba.R2GenMambaForConditionalGeneration"
    )
    assert config["auto_map"]["AutoConfig"] == "configuration_r2gen_mamba.R2GenMambaConfig"
    assert "radiology-report-generation" in config["custom_pipelines"]
    # Remote code files are copies of the package's files, so what the Hub runs is what the tests test.
    for name in REMOTE_CODE_FILES:
        assert (dry_run_folder / name).read_text() == (ROOT / "r2gen_mamba" / name).read_text()
    generation = json.loads((dry_run_folder / "generation_config.json").read_text())
    assert generation["num_beams"] == 2 and generation["max_length"] == 12


def test_model_card_metadata_parses_back(dry_run_folder):
    card = ModelCard.load(dry_run_folder / "README.md")
    data = card.data
    assert data.pipeline_tag == "image-text-to-text"
    assert data.library_name == "transformers"
    assert data.license == "apache-2.0"
    assert {"radiology", "medical", "chest-x-ray", "mamba", "report-generation"} <= set(data.tags)
    assert set(TAGS) == set(data.tags)
    assert data.datasets == ["iu_xray"]  # two views -> IU X-Ray
    assert set(data.metrics) == {"bleu", "meteor", "rouge", "cider"}
    results = {result.metric_name: result for result in data.eval_results}
    assert set(results) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"}
    assert results["BLEU-4"].metric_value == pytest.approx(METRICS["bleu_4"])
    assert results["BLEU-4"].metric_type == "bleu"
    assert results["METEOR"].metric_value == pytest.approx(METRICS["meteor"])
    assert results["CIDEr-D"].metric_value == pytest.approx(0.4321)
    assert all(r.dataset_split == "test" and r.dataset_name == "IU X-Ray" for r in data.eval_results)

    raw = metadata_load(dry_run_folder / "README.md")
    index = raw["model-index"]
    assert index[0]["name"] == "r2gen-mamba-tiny"
    assert index[0]["results"][0]["task"]["type"] == "image-text-to-text"

    text = card.text
    assert "Not for clinical use" in text and "not a medical device" in text
    assert "trust_remote_code=True" in text and "revision=revision" in text
    assert "arXiv:2410.18135" in text and "Sun, Yongheng" in text
    assert "someone/r2gen-mamba-tiny" in text
    assert "| BLEU-4 | 0.1707 |" in text
    assert "Mamba block(s) (d_state 4, d_conv 4, expand 2)" in text  # the checkpoint's own sizes (tiny config)
    assert "2-layer memory-driven decoder (d_model\n32" in text


def test_train_py_test_results_keys_are_read(tmp_path):
    path = tmp_path / "test_results.json"
    path.write_text(
        json.dumps({"test_bleu_4": 0.15, "test_meteor": 0.2, "test_rouge_l": 0.35, "test_loss": 2.5, "epoch": 3})
    )
    assert read_eval_results(path) == {"bleu_4": 0.15, "meteor": 0.2, "rouge_l": 0.35}


def test_bad_eval_results_fail_clearly(model_dir, tmp_path, capsys):
    path = tmp_path / "loss_only.json"
    path.write_text(json.dumps({"test_loss": 2.0}))
    argv = ["--model", str(model_dir), "--repo-id", "a/b", "--dry-run", "--output-dir", str(tmp_path / "o")]
    assert push_to_hub.main([*argv, "--eval-results", str(path)]) == 2
    assert "loss_only.json" in capsys.readouterr().err
    path.write_text("{not json")
    assert push_to_hub.main([*argv, "--eval-results", str(path)]) == 2
    assert "cannot read eval results" in capsys.readouterr().err
    path.write_text('{"bleu_4": NaN}')
    assert push_to_hub.main([*argv, "--eval-results", str(path)]) == 2
    assert "expected a finite number" in capsys.readouterr().err
    assert push_to_hub.main(["--model", str(tmp_path), "--repo-id", "a/b", "--dry-run", "--output-dir", "x"]) == 2
    assert push_to_hub.main(["--model", str(model_dir), "--repo-id", "a/b", "--dry-run"]) == 2


def test_model_folder_without_processor_is_refused(tmp_path, capsys):
    bare = tmp_path / "bare"
    processor_files = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "vocab.json")
    save_tiny_model(bare)
    for name in processor_files:
        (bare / name).unlink(missing_ok=True)
    argv = ["--model", str(bare), "--repo-id", "a/b", "--dry-run", "--output-dir", str(tmp_path / "out")]
    assert push_to_hub.main(argv) == 1
    assert "has no processor" in capsys.readouterr().err


def test_upload_creates_the_repo_and_uploads_the_folder(model_dir, metrics_file, capsys):
    api = RecordingHfApi()
    argv = ["--model", str(model_dir), "--repo-id", "someone/r2gen-mamba-tiny", "--private"]
    assert push_to_hub.main([*argv, "--eval-results", str(metrics_file)], api=api) == 0
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    _, repo_id, create_kwargs = api.calls[0]
    assert repo_id == "someone/r2gen-mamba-tiny"
    assert create_kwargs["private"] is True and create_kwargs["exist_ok"] is True
    assert create_kwargs["repo_type"] == "model"
    _, repo_id, upload_kwargs = api.calls[1]
    assert repo_id == "someone/r2gen-mamba-tiny" and upload_kwargs["revision"] is None
    assert set(REQUIRED_FILES) <= set(api.uploaded_files)
    assert b"model-index" in api.uploaded_files["README.md"]
    out = capsys.readouterr().out
    assert "https://huggingface.co/someone/r2gen-mamba-tiny/commit/0123456789abcdef" in out
    assert 'revision="0123456789abcdef0123456789abcdef01234567"' in out


def test_upload_to_a_branch(model_dir):
    api = RecordingHfApi()
    argv = ["--model", str(model_dir), "--repo-id", "someone/tiny", "--revision", "v0.1", "--dataset", "mimic_cxr"]
    assert push_to_hub.main(argv, api=api) == 0
    assert [call[0] for call in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][2]["branch"] == "v0.1"
    assert api.calls[2][2]["revision"] == "v0.1"
    card = ModelCard(api.uploaded_files["README.md"].decode())
    assert card.data.datasets == ["mimic_cxr"]
    assert card.data.eval_results is None
