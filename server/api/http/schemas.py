"""The JSON bodies the HTTP API accepts: OpenAI's completions and chat completions, and vLLM's adapter admin.

Fields loraplex cannot honour are declared too, so that a request using them is refused by name (see
:mod:`.convert`) rather than silently ignored; fields no peer defines are ignored, as vLLM and OpenAI do.
``top_k``, ``repetition_penalty`` and ``ignore_eos`` are the sampling extras vLLM accepts, and ``guided_json``,
``guided_regex`` and ``guided_grammar`` its structured-output extras (beside OpenAI's ``response_format``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """What both generation endpoints share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default is 1
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the sticky key of an A/B route
    cache_salt: str | None = None  # vLLM's: a prefix-cache namespace of the request's own (server/engine/prefix.py)
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None  # 0 = the sampled tokens' log-probabilities only
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessageIn(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None


class LoadLoraAdapterRequest(_Body):
    """vLLM's ``/v1/load_lora_adapter``; ``pin`` is loraplex's own (keep it in memory)."""

    lora_name: str
    lora_path: str | None = None
    load_inplace: bool = False
    pin: bool | None = None


class UnloadLoraAdapterRequest(_Body):
    lora_name: str
    lora_int_id: int | None = None
