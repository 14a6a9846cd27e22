"""Small configs and inputs shared by the tests (tiny sizes so everything runs in seconds on 2 CPU cores)."""

from __future__ import annotations

import numpy as np
import torch

from r2gen_mamba import R2GenMambaConfig, R2GenMambaForConditionalGeneration, resnet101_config


def tiny_config(**overrides) -> R2GenMambaConfig:
    """A tiny R2Gen-Mamba: 4-stage ResNet with one block each, d_model 32, 2 decoder layers, 30-entry vocabulary."""
    vision = resnet101_config(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1])
    kwargs = dict(
        vision_config=vision,
        vocab_size=30,
        d_model=32,
        num_heads=4,
        d_ff=32,
        decoder_layers=2,
        rm_num_slots=3,
        rm_num_heads=4,
        d_state=4,
        num_views=2,
        image_size=64,
    )
    kwargs.update(overrides)
    return R2GenMambaConfig(**kwargs)


def tiny_model(**overrides) -> R2GenMambaForConditionalGeneration:
    """A seeded tiny model (`tiny_config(**overrides)`) in eval mode."""
    torch.manual_seed(0)
    return R2GenMambaForConditionalGeneration(tiny_config(**overrides)).eval()


def tiny_pixel_values(config: R2GenMambaConfig, batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = config.image_size
    return torch.randn(batch_size, config.num_views, 3, size, size, generator=generator)


def tiny_labels(config: R2GenMambaConfig, lengths=(7, 4), seed: int = 0) -> torch.Tensor:
    """R2Gen-style targets: random real tokens (1..vocab-1), then the final 0, then -100 padding."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths) + 1
    labels = torch.full((len(lengths), width), -100, dtype=torch.long)
    for row, length in enumerate(lengths):
        labels[row, :length] = torch.randint(1, config.vocab_size, (length,), generator=generator)
        labels[row, length] = 0
    return labels


def write_dicom(
    path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    center: float | None = None,
    width: float | None = None,
    modality: str = "CR",
) -> str:
    """An uncompressed 12-bit single-frame DICOM radiograph of `pixels` (uint16 [rows, columns]), written with pydicom;
    optional rescale slope/intercept and VOI window. Returns the path as a string."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)
