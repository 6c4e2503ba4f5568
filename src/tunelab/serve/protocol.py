"""Request and response bodies, in the shape of OpenAI's API so its clients work unchanged.

Fields OpenAI defines that tunelab does not act on (logprobs, n > 1, tools, ...) are refused with a 400
rather than silently ignored; unknown extra fields are ignored, as OpenAI's own server does.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str = Field(min_length=1, description="A name from GET /v1/models.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Default: the run's eval.max_new_tokens.")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Same as max_tokens (newer name).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy, what `tunelab generate` does.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = Field(None, description="Up to 4 strings that end the text.")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="Same seed, same sampled text.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    logprobs: Optional[Union[bool, int]] = Field(None, description="Not supported; leave unset.")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def token_limit(self) -> Optional[int]:
        return self.max_tokens or self.max_completion_tokens


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]] = Field(description="Text to continue (used as is: no chat template).")


class ClassifyRequest(_Body):
    model: str = Field(min_length=1)
    input: Union[str, list[str]] = Field(description="One text or a list of texts.")


class AdminLoad(_Body):
    name: str = Field(min_length=1, max_length=128)
    source: str = Field(min_length=1, description="A run directory on the server's disk.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunelab"
    task: str
    method: str
    base_model: str
    labels: list[str] = []
    version: int
    adapters: Optional[list[str]] = Field(None, description="A router (model auto): the task adapters it picks "
                                          "between, each also served under its own name.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Optional[str]
    logprobs: None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str]
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ClassifyResult(BaseModel):
    index: int
    label: str
    score: float
    scores: dict[str, float]
    adapter: Optional[str] = Field(None, description="Model auto: the task adapter the router chose for this input "
                                   "(label and scores are that adapter's).")
    route_score: Optional[float] = Field(None, description="Model auto: the router's probability for that adapter.")


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[ClassifyResult]
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
