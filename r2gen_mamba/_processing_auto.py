"""Registers the processing classes with the `transformers` Auto classes (run by `import r2gen_mamba`).

Kept out of `processing_r2gen_mamba.py`, which is pushed to the Hub as remote code and must not register itself.
`register_for_auto_class` makes `save_pretrained` write `auto_map` entries and copy that file next to the weights,
so `AutoTokenizer` / `AutoImageProcessor` / `AutoProcessor.from_pretrained(..., trust_remote_code=True)` work
without this package.
"""

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from .configuration_r2gen_mamba import R2GenMambaConfig
from .processing_r2gen_mamba import R2GenMambaImageProcessor, R2GenMambaProcessor, R2GenMambaTokenizer

AutoTokenizer.register(R2GenMambaConfig, tokenizer_class=R2GenMambaTokenizer, exist_ok=True)
# The image processor works on PIL only and needs no torchvision; it is registered for both backend keys so that
# installing torchvision neither changes the numbers nor triggers a "falling back to pil" warning.
AutoImageProcessor.register(
    R2GenMambaConfig,
    image_processor_classes={"pil": R2GenMambaImageProcessor, "torchvision": R2GenMambaImageProcessor},
    exist_ok=True,
)
AutoProcessor.register(R2GenMambaConfig, R2GenMambaProcessor, exist_ok=True)

R2GenMambaTokenizer.register_for_auto_class("AutoTokenizer")
R2GenMambaImageProcessor.register_for_auto_class("AutoImageProcessor")
R2GenMambaProcessor.register_for_auto_class("AutoProcessor")
