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
# -- processing imports (processing) --
# -- metrics imports (evaluation) --
from .metrics import compute_nlg_metrics, load_metric

__version__ = "0.1.0"
