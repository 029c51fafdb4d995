"""The shape of a supported base model: dimensions of every LoRA-targetable linear layer.

Supported families are decoder-only transformers laid out like Llama (Llama, Mistral, Qwen2): per layer
``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``. The shape is what adapters are validated against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES


class UnsupportedModel(ValueError):
    """The base model is not of a supported family; the message names the family and the supported ones."""


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        model_type = str(getattr(config, "model_type", "?"))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"base model type '{model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            model_type=model_type,
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            intermediate_size=int(config.intermediate_size),
            vocab_size=int(config.vocab_size),
        )

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a targetable linear layer."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        dims = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        return dims[module]

    def kv_bytes_per_token(self, element_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
