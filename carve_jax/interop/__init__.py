"""Checkpoints in and out: flash-linear-attention 0.6.0's Hugging Face layout (docs/INTEROP.md).

    save_hf(model, "hf/gdn2")        # config.json + model.safetensors that FLA's AutoModelForCausalLM loads
    model, conf = load_hf("hf/gdn2") # back into a carve_jax LM
"""

from carve_jax.interop.fla_layout import (InteropError, fla_config, from_fla_tensors, model_config, tensor_specs,
                                          to_fla_tensors)
from carve_jax.interop.hf_folder import load_hf, save_hf

__all__ = ["InteropError", "fla_config", "from_fla_tensors", "load_hf", "model_config", "save_hf", "tensor_specs",
           "to_fla_tensors"]
