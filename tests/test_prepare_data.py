"""`r2gen-mamba prepare-data` on small trees in the real IU X-Ray (OpenI XML) and MIMIC-CXR layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r2gen_mamba.cli import main
from r2gen_mamba.data import check_images, load_annotation_dataset
from r2gen_mamba.prepare_data import extract_findings

# ----------------------------------------------------------------------------------------------------------------
# IU X-Ray
# ----------------------------------------------------------------------------------------------------------------

OPENI_TEMPLATE = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{num}"/>
   <pmcId id="{num}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{num}"/>
   <licenseType>open-access</licenseType>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Positive TB test</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">Normal chest x-XXXX.</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH><major>normal</major></MeSH>
{images}</eCitation>
"""

PARENT_IMAGE = """   <parentImage id="{image_id}">
      <figureId>F{index}</figureId>
      <caption>{caption}</caption>
      <panel type="single">
         <url>/hadoop/storage/radiology/extract/{image_id}.jpg</url>
         <imgModality>7</imgModality>
      </panel>
   </parentImage>
"""


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8), mode="L").save(path)


def _openi_report(folder: Path, num: int, findings: str, images: list[tuple[str, str]]) -> None:
    blocks = "".join(
        PARENT_IMAGE.format(image_id=image_id, index=i + 1, caption=caption)
        for i, (image_id, caption) in enumerate(images)
    )
    (folder / f"{num}.xml").write_text(OPENI_TEMPLATE.format(num=num, findings=findings, images=blocks))


@pytest.fixture
def iu_tree(tmp_path):
    reports, images = tmp_path / "ecgen-radiology", tmp_path / "NLMCXR_png"
    reports.mkdir()
    images.mkdir()
    # 20 good studies: frontal (value 50) first, lateral (value 200) second, both captioned "PA and Lateral".
    for num in range(1, 21):
        ids = [f"CXR{num}_IM-{num:04d}-1001", f"CXR{num}_IM-{num:04d}-2001"]
        _openi_report(
            reports, num, f"The heart is normal. Study {num}.", [(i, "Xray Chest PA and Lateral") for i in ids]
        )
        _png(images / f"{ids[0]}.png", 50)
        _png(images / f"{ids[1]}.png", 200)
    # Lateral listed first but captioned: the caption decides.
    ids = ["CXR21_IM-0021-1001", "CXR21_IM-0021-2001"]
    _openi_report(reports, 21, "Lungs are clear.", [(ids[1], "Lateral chest"), (ids[0], "PA chest")])
    _png(images / f"{ids[0]}.png", 50)
    _png(images / f"{ids[1]}.png", 200)
    # Dropped: empty findings, one image only, missing image file.
    _openi_report(reports, 22, "", [("CXR22_IM-0022-1001", "PA"), ("CXR22_IM-0022-2001", "Lateral")])
    _png(images / "CXR23_IM-0023-1001.png", 50)
    _openi_report(reports, 23, "Heart normal.", [("CXR23_IM-0023-1001", "Xray Chest PA and Lateral")])
    _openi_report(reports, 24, "Heart normal.", [("CXR24_IM-0024-1001", "PA"), ("CXR24_IM-0024-2001", "Lateral")])
    return reports, images


def test_iu_xray_annotation(iu_tree, tmp_path):
    reports, images = iu_tree
    output = tmp_path / "annotation.json"
    argv = ["prepare-data", "iu-xray", "--reports", str(reports), "--images", str(images), "--output", str(output)]
    assert main(argv) == 0
    annotation = json.loads(output.read_text())
    assert set(annotation) == {"train", "val", "test"}
    records = [r for split in annotation.values() for r in split]
    # 21 usable studies; 3 dropped (no findings, single image, missing file).
    assert len(records) == 21
    assert [len(annotation[s]) for s in ("train", "val", "test")] == [15, 2, 4]  # round(21 * 0.7), round(2.1)
    by_id = {r["id"]: r for r in records}
    assert "CXR5_IM-0005" in by_id and "CXR22_IM-0022" not in by_id and "CXR23_IM-0023" not in by_id
    assert by_id["CXR5_IM-0005"]["report"] == "The heart is normal. Study 5."
    assert by_id["CXR5_IM-0005"]["image_path"] == ["CXR5_IM-0005-1001.png", "CXR5_IM-0005-2001.png"]
    # The caption put the frontal image first even though the XML lists the lateral first.
    assert by_id["CXR21_IM-0021"]["image_path"] == ["CXR21_IM-0021-1001.png", "CXR21_IM-0021-2001.png"]
    for split, split_records in annotation.items():
        assert all(r["split"] == split for r in split_records)

    # The annotation loads with the image folder as root and every image is readable.
    dataset = check_images(load_annotation_dataset(output, image_dir=images, num_views=2), num_views=2)
    row = dataset["train"][0]
    frontal, lateral = (np.asarray(Image.open(p)) for p in row["image_paths"])
    assert frontal.mean() == 50 and lateral.mean() == 200

    # Same seed -> same split; another seed -> a different one.
    again = tmp_path / "again.json"
    assert main(argv[:-1] + [str(again)]) == 0
    assert json.loads(again.read_text()) == annotation
    other = tmp_path / "other.json"
    assert main(argv[:-1] + [str(other), "--seed", "1"]) == 0
    assert json.loads(other.read_text())["train"] != annotation["train"]


def test_iu_xray_r2gen_layout_and_projections(iu_tree, tmp_path):
    reports, images = iu_tree
    # Kaggle-style projections table that says the "-2001" image of study 3 is the frontal one.
    rows = ["uid,filename,projection"]
    for num in range(1, 25):
        first, second = ("Lateral", "Frontal") if num == 3 else ("Frontal", "Lateral")
        rows.append(f"{num},{num}_IM-{num:04d}-1001.dcm.png,{first}")
        rows.append(f"{num},{num}_IM-{num:04d}-2001.dcm.png,{second}")
    projections = tmp_path / "indiana_projections.csv"
    projections.write_text("\n".join(rows) + "\n")
    output, layout = tmp_path / "annotation.json", tmp_path / "images"
    argv = ["prepare-data", "iu-xray", "--reports", str(reports), "--images", str(images), "--output", str(output)]
    assert main(argv + ["--image-output", str(layout), "--copy-images", "--projections", str(projections)]) == 0
    records = {r["id"]: r for split in json.loads(output.read_text()).values() for r in split}
    assert records["CXR3_IM-0003"]["image_path"] == ["CXR3_IM-0003/0.png", "CXR3_IM-0003/1.png"]
    # Study 3's frontal (0.png) is the -2001 image (value 200) per the projections table.
    assert np.asarray(Image.open(layout / "CXR3_IM-0003/0.png")).mean() == 200
    assert np.asarray(Image.open(layout / "CXR4_IM-0004/0.png")).mean() == 50
    assert not (layout / "CXR4_IM-0004/0.png").is_symlink()


def test_iu_xray_bad_input(tmp_path):
    reports, images = tmp_path / "reports", tmp_path / "images"
    reports.mkdir()
    images.mkdir()
    (reports / "1.xml").write_text("<eCitation><unclosed></eCitation>")
    argv = ["prepare-data", "iu-xray", "--reports", str(reports), "--images", str(images)]
    with pytest.raises(ValueError, match=r"1\.xml: malformed XML"):
        main(argv + ["--output", str(tmp_path / "a.json")])
    with pytest.raises(FileNotFoundError, match="--images"):
        main(
            ["prepare-data", "iu-xray", "--reports", str(reports), "--images", str(tmp_path / "nope")]
            + ["--output", "x"]
        )


# ----------------------------------------------------------------------------------------------------------------
# MIMIC-CXR
# ----------------------------------------------------------------------------------------------------------------

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // ?pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 {findings}
 There is no pleural effusion or
 pneumothorax.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

MIMIC_NO_FINDINGS = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)

 IMPRESSION:

 Endotracheal tube in standard position.
"""


def test_extract_findings():
    text = MIMIC_REPORT.format(findings="The heart size is normal.")
    assert extract_findings(text) == "The heart size is normal. There is no pleural effusion or pneumothorax."
    assert extract_findings(MIMIC_NO_FINDINGS) == ""
    assert extract_findings("FINDINGS AND IMPRESSION: Clear lungs.\n") == "Clear lungs."


@pytest.fixture
def mimic_tree(tmp_path):
    root, reports = tmp_path / "mimic-cxr-jpg", tmp_path / "mimic-cxr-reports"
    # (subject, study, split, [(dicom, view, write_file)], report text or None)
    studies = [
        ("10000032", "50414267", "train", [("d-lat", "LATERAL", True), ("d-pa", "PA", True)], "Heart normal."),
        ("10000032", "53189527", "validate", [("d-ap", "AP", True), ("d-pa2", "PA", True)], "Lungs clear."),
        ("10000764", "57375967", "test", [("d-ap2", "AP", True), ("d-ll", "LL", True)], "Small effusion."),
        ("10000898", "50771383", "train", [("d-lat2", "LATERAL", True)], "Only lateral."),
        ("10000935", "51178377", "train", [("d-pa3", "PA", True)], None),  # no findings section
        ("10000980", "54935705", "test", [("d-pa4", "PA", False)], "Missing image."),
        ("10001038", "58354779", "train", [("d-pa5", "PA", True)], "NO REPORT FILE"),
    ]
    split_rows, meta_rows = ["dicom_id,study_id,subject_id,split"], ["dicom_id,subject_id,study_id,ViewPosition,Rows"]
    for subject, study, split, images, findings in studies:
        folder = f"files/p{subject[:2]}/p{subject}"
        for dicom, view, write in images:
            split_rows.append(f"{dicom},{study},{subject},{split}")
            meta_rows.append(f"{dicom},{subject},{study},{view},16")
            if write:
                _png(root / folder / f"s{study}" / f"{dicom}.jpg", 120)
        if findings == "NO REPORT FILE":
            continue
        report = reports / folder / f"s{study}.txt"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(MIMIC_NO_FINDINGS if findings is None else MIMIC_REPORT.format(findings=findings))
    (root / "mimic-cxr-2.0.0-split.csv").write_text("\n".join(split_rows) + "\n")
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text("\n".join(meta_rows) + "\n")
    return root, reports


def test_mimic_cxr_annotation(mimic_tree, tmp_path):
    root, reports = mimic_tree
    output = tmp_path / "annotation.json"
    argv = ["prepare-data", "mimic-cxr", "--root", str(root), "--reports", str(reports), "--output", str(output)]
    assert main(argv) == 0
    annotation = json.loads(output.read_text())
    assert {s: [r["id"] for r in annotation[s]] for s in ("train", "val", "test")} == {
        "train": ["d-pa"],  # PA chosen over the lateral
        "val": ["d-pa2"],  # PA preferred over AP; "validate" -> "val"
        "test": ["d-ap2"],  # AP when there is no PA
    }
    record = annotation["train"][0]
    assert record["image_path"] == ["files/p10/p10000032/s50414267/d-pa.jpg"]
    assert record["report"] == "Heart normal. There is no pleural effusion or pneumothorax."
    assert record["study_id"] == 50414267 and record["subject_id"] == 10000032
    dataset = check_images(load_annotation_dataset(output, image_dir=root, num_views=1), num_views=1)
    assert sum(len(ds) for ds in dataset.values()) == 3

    # --all-views keeps every image (frontal first) and the lateral-only study.
    all_output = tmp_path / "all.json"
    assert main(argv[:-1] + [str(all_output), "--all-views"]) == 0
    records = {r["id"]: r for split in json.loads(all_output.read_text()).values() for r in split}
    assert records["d-pa"]["image_path"] == [
        "files/p10/p10000032/s50414267/d-pa.jpg",
        "files/p10/p10000032/s50414267/d-lat.jpg",
    ]
    assert records["d-pa"]["view_positions"] == ["PA", "LATERAL"]
    assert "d-lat2" in records and "d-pa3" not in records and "d-pa4" not in records


def test_mimic_cxr_missing_csv(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "reports").mkdir()
    argv = ["prepare-data", "mimic-cxr", "--root", str(tmp_path / "root"), "--reports", str(tmp_path / "reports")]
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-split"):
        main(argv + ["--output", str(tmp_path / "a.json")])
