"""The folder push_to_hub writes loads as remote code where `r2gen_mamba` is NOT importable, and generates exactly
what the installed package generates.

The check runs in a fresh interpreter: `python -I` (no PYTHONPATH, no user site, no script/cwd entry on sys.path),
started in an empty temporary folder with every PYTHON* variable removed, and - because the package may be
installed (e.g. `pip install -e .` in CI), which -I does not undo - a meta-path finder installed before anything
else that makes every `import r2gen_mamba...` raise ImportError. The script asserts that the import fails and that
the classes it got come from transformers' dynamic-module cache (`transformers_modules`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from inference_utils import save_tiny_model, write_study
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from r2gen_mamba.hub import save_hub_folder

REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class HideR2GenMamba(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "r2gen_mamba" or name.startswith("r2gen_mamba."):
                raise ImportError(f"{name} is hidden in this process")
            return None


    sys.meta_path.insert(0, HideR2GenMamba())
    try:
        import r2gen_mamba  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("r2gen_mamba is importable in the remote-code process")

    import json

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, studies_file, output_file = sys.argv[1:4]
    studies = json.load(open(studies_file))
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    pixel_values = processor(images=studies, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ids = model.generate(pixel_values=pixel_values)
    pipe = pipeline(model=folder, trust_remote_code=True, device="cpu")
    texts = [out[0]["generated_text"] for out in pipe(studies)]
    json.dump(
        {
            "ids": ids.tolist(),
            "texts": texts,
            "modules": [type(x).__module__ for x in (model, processor, processor.tokenizer, pipe)],
            "task": pipe.task,
            "loaded_r2gen_mamba": sorted(m for m in sys.modules if m.split(".")[0] == "r2gen_mamba"),
        },
        open(output_file, "w"),
    )
    """
)


def test_hub_folder_runs_as_remote_code_without_the_package(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    hub_dir = save_hub_folder(model_dir, tmp_path / "hub", repo_id="someone/tiny-r2gen-mamba")
    studies = [
        write_study(tmp_path / "images" / f"s{i}", kinds, i)
        for i, kinds in enumerate([("png", "dcm"), ("jpg", "png16")])
    ]
    (tmp_path / "studies.json").write_text(json.dumps(studies))
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    workdir = tmp_path / "empty_cwd"
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            str(tmp_path / "remote.py"),
            str(hub_dir),
            str(tmp_path / "studies.json"),
            str(tmp_path / "remote.json"),
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = json.loads((tmp_path / "remote.json").read_text())

    assert remote["loaded_r2gen_mamba"] == []
    assert all(module.startswith("transformers_modules.") for module in remote["modules"]), remote["modules"]
    assert remote["task"] == "radiology-report-generation"

    # The installed package, in this process, on the same folder and files.
    model = AutoModelForImageTextToText.from_pretrained(hub_dir).eval()
    processor = AutoProcessor.from_pretrained(hub_dir)
    assert type(model).__module__ == "r2gen_mamba.modeling_r2gen_mamba"
    pixel_values = processor(images=studies, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ids = model.generate(pixel_values=pixel_values)
    assert remote["ids"] == ids.tolist()
    assert ids.shape[1] > 2  # real reports, not an immediate end token
    local_pipe = pipeline("radiology-report-generation", model=model, processor=processor, device="cpu")
    local_texts = [out[0]["generated_text"] for out in local_pipe(studies)]
    assert remote["texts"] == local_texts
    assert remote["texts"] == processor.batch_decode(ids, skip_special_tokens=True)
