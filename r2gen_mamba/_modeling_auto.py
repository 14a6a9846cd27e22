"""Registers the config and model classes with the `transformers` Auto classes (run by `import r2gen_mamba`).

Kept out of the model files, which are pushed to the Hub as remote code and must not register themselves.
`register_for_auto_class` makes `save_pretrained` write `auto_map` entries and copy the model files (configuration,
modeling, mamba_block) next to the weights, so a saved folder also loads with `trust_remote_code=True` without this
package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_r2gen_mamba import R2GenMambaConfig, R2GenMambaDecoderConfig, R2GenMambaEncoderConfig
from .modeling_r2gen_mamba import R2GenMambaForConditionalGeneration, R2GenMambaModel

AutoConfig.register(R2GenMambaConfig.model_type, R2GenMambaConfig, exist_ok=True)
# The sub-configs carry their own model types inside config.json.
AutoConfig.register(R2GenMambaEncoderConfig.model_type, R2GenMambaEncoderConfig, exist_ok=True)
AutoConfig.register(R2GenMambaDecoderConfig.model_type, R2GenMambaDecoderConfig, exist_ok=True)
AutoModel.register(R2GenMambaConfig, R2GenMambaModel, exist_ok=True)
AutoModelForImageTextToText.register(R2GenMambaConfig, R2GenMambaForConditionalGeneration, exist_ok=True)

R2GenMambaConfig.register_for_auto_class()
R2GenMambaModel.register_for_auto_class("AutoModel")
R2GenMambaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
