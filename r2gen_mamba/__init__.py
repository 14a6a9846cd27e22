"""R2Gen-Mamba: radiology report generation from chest X-rays as a Hugging Face model.

`import r2gen_mamba` registers the config, model and processor classes with the `transformers` Auto classes.
"""

from .configuration_r2gen_mamba import (
    R2GenMambaConfig,
    R2GenMambaDecoderConfig,
    R2GenMambaEncoderConfig,
    resnet101_config,
)

# -- modeling imports (core model) --
# isort: split
from . import _modeling_auto  # registers the config and model classes with the Auto classes
from .modeling_r2gen_mamba import (
    R2GenMambaCache,
    R2GenMambaForConditionalGeneration,
    R2GenMambaModel,
    R2GenMambaPreTrainedModel,
    R2GenSoftTrigramPenaltyLogitsProcessor,
)

# -- processing imports (processing) --
# isort: split
from . import _processing_auto  # registers the tokenizer, image processor and processor with the Auto classes
from .processing_r2gen_mamba import (
    R2GenMambaImageProcessor,
    R2GenMambaImageTransform,
    R2GenMambaProcessor,
    R2GenMambaTokenizer,
    build_vocabulary,
    clean_report,
    load_image,
)

# isort: split
# -- metrics imports (evaluation) --
from .metrics import compute_nlg_metrics, load_metric

# -- pipeline (inference/hub) --
# isort: split
from .pipeline_r2gen_mamba import RadiologyReportGenerationPipeline  # registers `radiology-report-generation`

__version__ = "0.1.0"
