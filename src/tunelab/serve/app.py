"""The FastAPI app: OpenAI-compatible routes, health, metrics, admin and the playground page.

Every /v1 and /admin request gets a RequestContext at the door (pure ASGI middleware, which also enforces
the body-size limit), and ends through ServerState.finish exactly once -- on success, on any error
(the handlers below), or when a stream ends or its client leaves -- so metrics and the request log see
every request, refused ones included. Errors use OpenAI's shape: {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.errors import TunelabError
from tunelab.serve import protocol as p
from tunelab.serve.auth import ANONYMOUS, retry_after_header
from tunelab.serve.batcher import Overloaded
from tunelab.serve.engine import ClassifyJob, GenerationJob, RouteJob
from tunelab.serve.registry import NAME_PATTERN
from tunelab.serve.state import RequestContext, ServerState

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/classify": "classify",
             "/v1/models": "models"}
PLAYGROUND = Path(__file__).with_name("playground.html")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


def _error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _endpoint(path: str) -> str | None:
    if path.startswith("/admin/"):
        return "admin"
    return ENDPOINTS.get(path)


class BodyLimitAndContext:
    """Pure ASGI middleware: a RequestContext for each API request, and 413 past max_body_bytes (by the
    Content-Length header, or by counting a chunked body as it arrives)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = _endpoint(scope["path"])
        if endpoint is not None:
            scope.setdefault("state", {})["ctx"] = RequestContext(endpoint)
        limit = self.state.settings.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(scope, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted_receive, send)
        except _TooLarge:
            await self._too_large(scope, send)

    async def _too_large(self, scope, send):
        limit = self.state.settings.max_body_bytes
        body = json.dumps(_error_body(f"request body is larger than the server's limit of {limit} bytes",
                                      "invalid_request_error", "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        ctx = scope.get("state", {}).get("ctx")
        if ctx is not None:
            self.state.finish(ctx, 413, "request_too_large")


class _TooLarge(Exception):
    pass


def _ctx(request: Request) -> RequestContext:
    ctx = getattr(request.state, "ctx", None)
    if ctx is None:
        ctx = RequestContext("other")
        request.state.ctx = ctx
    return ctx


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        import threading

        threading.Thread(target=state.load_startup_models, name="tunelab-load", daemon=True).start()
        yield
        await state.batcher.stop()
        state.request_log.close()

    app = FastAPI(title="tunelab serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible serving of tunelab runs: many adapters on one base model.")
    app.add_middleware(BodyLimitAndContext, state=state)

    # ------------------------------------------------------------------ errors, in OpenAI's shape

    def error_response(request: Request, status: int, message: str, type_: str, code=None, param=None,
                       headers=None) -> JSONResponse:
        state.finish(_ctx(request), status, code or type_)
        return JSONResponse(_error_body(message, type_, code, param), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(request, e.status, e.message, e.type, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(request, 400, f"{where}: {first.get('msg')}" if where else first.get("msg"),
                              "invalid_request_error", "invalid_value", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(request, e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return error_response(request, 500, f"internal error: {type(e).__name__}", "server_error")

    # ------------------------------------------------------------------ keys, limits, models

    def authorize(request: Request):
        ctx = _ctx(request)
        key = None
        if state.keys is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            key = state.keys.find(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
            if key is None:
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            ctx.key_id = key.id
        else:
            ctx.key_id = ANONYMOUS
        rate = (key.rate_per_s if key and key.rate_per_s else None) or state.settings.rate_per_s
        if rate:
            wait = state.buckets.take(ctx.key_id, rate)
            if wait > 0:
                raise ApiError(429, f"rate limit for key '{ctx.key_id}' reached; retry in {wait:.1f} s",
                               "rate_limit_error", "rate_limit_exceeded",
                               headers={"Retry-After": retry_after_header(wait)})
        return key

    def require_admin(key=Depends(authorize)):
        if key is None or not key.admin:
            raise ApiError(403, "this needs an admin key (the server was started with --api-keys holding one)",
                           "permission_error", "admin_required")
        return key

    def served_model(request: Request, name: str, endpoint: str):
        ctx = _ctx(request)
        ctx.model = name
        if not state.ready.is_set() and state.registry.get(name) is None:
            raise ApiError(503, "models are still loading; see GET /readyz", "server_error", "not_ready",
                           headers={"Retry-After": "5"})
        served = state.registry.get(name)
        if served is None:
            raise ApiError(404, f"model '{name}' is not loaded; loaded: {', '.join(state.registry.names())}",
                           code="model_not_found", param="model")
        ctx.model_version = served.version
        if served.method == "router" and endpoint != "classify":
            raise ApiError(400, f"model '{name}' is a router that picks a classification adapter "
                           f"({', '.join(served.adapters)}) for each input: use /v1/classify", code="wrong_endpoint",
                           param="model")
        wants_classifier = endpoint == "classify"
        if wants_classifier != (served.task == "classification"):
            hint = "/v1/classify" if served.task == "classification" else "/v1/chat/completions or /v1/completions"
            raise ApiError(400, f"model '{name}' is a {served.task} run: use {hint}", code="wrong_endpoint",
                           param="model")
        if endpoint == "chat" and served.task == "causal_lm":
            raise ApiError(400, f"model '{name}' was trained on plain text (causal_lm), not conversations: use "
                           "/v1/completions", code="wrong_endpoint", param="model")
        return served

    def submit(served, job):
        try:
            return state.batcher.submit(served, job)
        except Overloaded as e:
            raise ApiError(503, str(e), "server_error", "overloaded",
                           headers={"Retry-After": retry_after_header(e.retry_after_s)}) from None

    # ------------------------------------------------------------------ generation

    def generation_job(served, body: p._Sampling, prompt_ids: list[int]) -> GenerationJob:
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        stops = body.stops()
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 strings", param="stop")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        context = served.context_length
        limit = body.token_limit()
        if len(prompt_ids) >= context:
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; model '{served.name}' reads at most "
                           f"{context}", code="context_length_exceeded")
        if limit is not None and len(prompt_ids) + limit > context:
            raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({limit}) is over model "
                           f"'{served.name}''s context of {context} tokens", code="context_length_exceeded",
                           param="max_tokens")
        if limit is None:  # the run's own default, as `tunelab generate` uses, within the context
            limit = min(served.trained.cfg.eval.max_new_tokens, context - len(prompt_ids))
        return GenerationJob(prompt_ids, limit, body.temperature, body.top_p, stops, body.seed)

    async def run_generation(request: Request, served, body: p._Sampling, prompt_ids: list[int], chunk, final):
        """Submit one generation; answer with `final(job)` or, for stream=True, SSE chunks from `chunk`."""
        ctx = _ctx(request)
        ctx.stream, ctx.prompt_tokens = body.stream, len(prompt_ids)
        job = generation_job(served, body, prompt_ids)
        if not body.stream:
            pending = submit(served, job)
            await pending.future
            return finish_generation(ctx, job, pending, final(job))
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        job.on_delta = lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text)
        pending = submit(served, job)
        pending.future.add_done_callback(lambda _: deltas.put_nowait(None))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            try:
                yield _sse(chunk("", None, first=True))
                while (text := await deltas.get()) is not None:
                    yield _sse(chunk(text, None))
                await pending.future
                yield _sse(chunk("", job.finish_reason))
                if include_usage:
                    yield _sse({**chunk("", None), "choices": [], "usage": _usage(len(prompt_ids), job)})
                yield "data: [DONE]\n\n"
                finish_generation(ctx, job, pending, None)
            except (asyncio.CancelledError, GeneratorExit):
                job.cancelled = True  # the client left: the engine drops the row at its next token
                state.finish(ctx, 499, "client_closed")
                raise
            except Exception as e:
                yield _sse(_error_body(f"generation failed: {type(e).__name__}", "server_error"))
                state.finish(ctx, 500, "server_error")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def finish_generation(ctx: RequestContext, job: GenerationJob, pending, response):
        ctx.completion_tokens, ctx.finish_reason, ctx.batch_size = job.completion_tokens, job.finish_reason, \
            pending.batch_size
        if job.first_token_time is not None:
            ctx.ttft_s = job.first_token_time - ctx.started
        ctx.payload_out = job.text
        state.finish(ctx, 200)
        return response

    def chat_prompt(served, messages: list[p.ChatMessage]) -> list[int]:
        try:
            return served.chat_ids([m.model_dump() for m in messages])
        except TunelabError as e:
            raise ApiError(400, str(e), param="messages") from None

    @app.post("/v1/chat/completions", response_model=p.ChatResponse, responses={400: {"model": p.ErrorResponse}},
              tags=["openai"])
    async def chat(body: p.ChatRequest, request: Request, key=Depends(authorize)):
        served = served_model(request, body.model, "chat")
        _ctx(request).payload_in = [m.model_dump() for m in body.messages]
        ids = chat_prompt(served, body.messages)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text, finish, first=False):
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def final(job):
            return p.ChatResponse(id=rid, created=created, model=body.model, usage=_usage(len(ids), job), choices=[
                p.ChatChoice(index=0, message=p.ChatMessage(role="assistant", content=job.text),
                             finish_reason=job.finish_reason)])

        return await run_generation(request, served, body, ids, chunk, final)

    @app.post("/v1/completions", response_model=p.CompletionResponse, responses={400: {"model": p.ErrorResponse}},
              tags=["openai"])
    async def completions(body: p.CompletionRequest, request: Request, key=Depends(authorize)):
        served = served_model(request, body.model, "completions")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: send one prompt per request", param="prompt")
        _ctx(request).payload_in = prompts[0]
        ids = served.encode(prompts[0])
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text, finish, first=False):
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        def final(job):
            return p.CompletionResponse(id=rid, created=created, model=body.model, usage=_usage(len(ids), job),
                                        choices=[p.CompletionChoice(index=0, text=job.text,
                                                                    finish_reason=job.finish_reason)])

        return await run_generation(request, served, body, ids, chunk, final)

    # ------------------------------------------------------------------ classification

    async def classify_routed(routed, texts: list[str]) -> tuple[list[dict], int, int]:
        """model auto: route the texts (batched with other auto requests), then send each task's share to that
        task's served adapter through the batcher like any classify request. Results keep the input order."""
        route = RouteJob(texts)
        await submit(routed, route).future
        shares: dict[str, list[int]] = {}
        for i, (task, _) in enumerate(route.routes):
            shares.setdefault(task, []).append(i)
        jobs = []
        for task, idx in shares.items():
            served = state.registry.get(task)
            if served is None:
                raise ApiError(503, f"model '{routed.name}' routed inputs to '{task}', which is not loaded",
                               "server_error", "adapter_not_loaded")
            job = ClassifyJob([texts[i] for i in idx])
            jobs.append((task, idx, job, submit(served, job)))
        done = await asyncio.gather(*(pending.future for *_, pending in jobs), return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        results: list[dict] = [{}] * len(texts)
        for task, idx, job, _ in jobs:
            for i, r in zip(idx, job.results):
                results[i] = {**r, "adapter": task, "route_score": route.routes[i][1]}
        return (results, sum(job.prompt_tokens for _, _, job, _ in jobs),
                max(pending.batch_size for *_, pending in jobs))

    @app.post("/v1/classify", response_model=p.ClassifyResponse, responses={400: {"model": p.ErrorResponse}},
              response_model_exclude_none=True, tags=["tunelab"])
    async def classify(body: p.ClassifyRequest, request: Request, key=Depends(authorize)):
        ctx = _ctx(request)
        served = served_model(request, body.model, "classify")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > state.settings.max_inputs:
            raise ApiError(400, f"input: give 1 to {state.settings.max_inputs} texts", param="input")
        ctx.payload_in = texts
        if served.method == "router":
            results, tokens, batch_size = await classify_routed(served, texts)
        else:
            job = ClassifyJob(texts)
            pending = submit(served, job)
            await pending.future
            results, tokens, batch_size = job.results, job.prompt_tokens, pending.batch_size
        ctx.prompt_tokens, ctx.batch_size, ctx.payload_out = tokens, batch_size, results
        state.finish(ctx, 200)
        return p.ClassifyResponse(model=body.model, usage=p.Usage(prompt_tokens=tokens, total_tokens=tokens),
                                  data=[p.ClassifyResult(index=i, **r) for i, r in enumerate(results)])

    # ------------------------------------------------------------------ models, admin

    @app.get("/v1/models", response_model=p.ModelList, response_model_exclude_none=True, tags=["openai"])
    async def list_models(request: Request, key=Depends(authorize)):
        state.finish(_ctx(request), 200)
        return p.ModelList(data=[_card(m) for m in state.registry.models()])

    @app.post("/admin/models", response_model=p.ModelCard, tags=["admin"])
    async def admin_load(body: p.AdminLoad, request: Request, key=Depends(require_admin)):
        ctx = _ctx(request)
        ctx.model = body.name
        if not NAME_PATTERN.match(body.name):
            raise ApiError(400, "name: use letters, digits, '.', '_', ':' or '-'", param="name")

        def load():
            with state.admin_lock:
                return state.load_model(body.name, body.source)

        try:
            served = await asyncio.get_running_loop().run_in_executor(None, load)
        except TunelabError as e:
            raise ApiError(400, str(e), param="source") from None
        ctx.model_version = served.version
        state.finish(ctx, 200)
        return _card(served)

    @app.delete("/admin/models/{name}", tags=["admin"])
    async def admin_unload(name: str, request: Request, key=Depends(require_admin)):
        _ctx(request).model = name
        try:
            unloaded = state.unload_model(name)
        except TunelabError as e:
            raise ApiError(400, str(e), param="name") from None
        if not unloaded:
            raise ApiError(404, f"model '{name}' is not loaded", code="model_not_found")
        state.finish(_ctx(request), 200)
        return {"id": name, "object": "model", "deleted": True}

    # ------------------------------------------------------------------ health, metrics, playground

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz():
        if state.ready.is_set():
            return {"status": "ready", "models": state.registry.names()}
        detail = {"status": "failed", "error": state.load_error} if state.load_error else {"status": "loading"}
        return JSONResponse(detail, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics", tags=["ops"])
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    return app


def _usage(prompt_tokens: int, job: GenerationJob) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": prompt_tokens + job.completion_tokens}


def _card(m) -> p.ModelCard:
    return p.ModelCard(id=m.name, created=int(m.loaded_unix), task=m.task, method=m.method, base_model=m.base_model,
                       labels=m.labels, version=m.version, adapters=getattr(m, "adapters", None))


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
