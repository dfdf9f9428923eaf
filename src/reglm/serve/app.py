"""The HTTP/JSON service of a trained model (FastAPI): ``POST /score``, ``POST /next``,
``GET /health``, ``GET /model``, and the OpenAPI documentation at ``/docs``.

Every number comes from the library's scoring functions: ``/score`` from
:meth:`~reglm.api.TrainedModel.full_scores_batch` (the sentences of concurrent requests scored in
shared calls, :mod:`reglm.serve.batching`), ``/next`` from :meth:`~reglm.api.TrainedModel.
next_words`; both run on one model thread. A request is read and checked here before it
reaches the model: its body (at most ``max_body_bytes``, UTF-8 JSON), its fields and their types,
its size (``max_sentences`` sentences of at most ``max_words`` words; ``k <= max_k``). A request
that fails gets a JSON body ``{"error": message}`` (plus ``"limit"`` naming the limit it broke):
413 for a limit on size, 400 for a body that is not UTF-8 JSON, 422 for a field of the wrong
type or value and for words the model cannot score; a failure of the server itself is a 500 whose
body says so, the details going to the server's log only.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException

from reglm.api import TrainedModel
from reglm.errors import ReglmError
from reglm.evaluate.perplexity import perplexity_of
from reglm.evaluate.words import WordScore, log_scale
from reglm.serve.batching import Batcher


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``reglm serve --max-...``)."""

    max_body_bytes: int = 1 << 20
    """bytes of a request body"""
    max_sentences: int = 1000
    """sentences of one /score request"""
    max_words: int = 500
    """whitespace words of one sentence (or /next prefix)"""
    max_k: int = 1000
    """next words one /next request asks for"""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ReglmError(f"--{name.replace('_', '-')} {value} must be a positive integer")


@dataclass(frozen=True)
class Batching:
    """How concurrent /score requests are joined (:class:`~reglm.serve.batching.Batcher`)."""

    max_wait_ms: float = 2.0
    """how long the first waiting request waits for others to join its model call"""
    max_batch_tokens: int = 8192
    """words (``<eos>`` included) of one model call"""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0):
            raise ReglmError(f"--max-wait-ms {self.max_wait_ms} must be >= 0")
        if self.max_batch_tokens < 1:
            raise ReglmError(f"--max-batch-tokens {self.max_batch_tokens} must be >= 1")


class ApiError(Exception):
    """A request the service refuses: its status, the message, and the limit it broke if any."""

    def __init__(self, status: int, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.limit = limit


class ScoreRequest(BaseModel):
    """Sentences (or an n-best list: the sentences and their ids) to score, each from the start
    of a sentence, as ``reglm score`` scores the lines of a file."""

    model_config = ConfigDict(extra="forbid", strict=True)
    sentences: list[str] = Field(description="the sentences, words separated by whitespace")
    ids: list[str] | None = Field(
        None, description="n-best: one id per sentence, echoed in its result (default: 1, 2, ...)"
    )
    base: Literal["e", "10"] = Field(
        "e", description="log base of the results: e (natural) or 10 (KenLM, ASR decoders)"
    )
    eos: bool = Field(True, description="score the <eos> that ends each sentence")
    words: bool = Field(
        False, description="add each word's row: the word, its log-probability, whether it is out of the vocabulary"
    )

    @model_validator(mode="after")
    def _ids_match(self) -> ScoreRequest:
        if self.ids is not None and len(self.ids) != len(self.sentences):
            raise ValueError(
                f"ids has {len(self.ids)} items for {len(self.sentences)} sentences; give one id per sentence"
            )
        return self


class WordRow(BaseModel):
    word: str
    log_prob: float | None = Field(description="null only where it is not a finite number")
    oov: bool


class SentenceResult(BaseModel):
    id: str
    log_prob: float | None
    tokens: int = Field(description="words scored (the <eos> included unless eos is false)")
    oov: int = Field(description="words outside the vocabulary (scored as <unk>)")
    ppl: float | None = Field(description="exp(-ln p / tokens); null for no tokens")
    words: list[WordRow] | None = None


class ScoreResponse(BaseModel):
    base: str
    results: list[SentenceResult]


class NextRequest(BaseModel):
    """A prefix, read from the start of a sentence, and how many next words to propose."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prefix: str = Field("", description="the words so far (each in the vocabulary, or <unk>)")
    k: int = Field(10, description="how many next words, likeliest first")
    base: Literal["e", "10"] = "e"


class NextWord(BaseModel):
    word: str
    log_prob: float | None


class NextResponse(BaseModel):
    base: str
    prefix: str
    words: list[NextWord]


class ErrorBody(BaseModel):
    error: str
    limit: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in (400, 413, 422)}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of ``model`` (the service reads bodies itself, to bound them)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


async def read_json(request: Request, limit: int) -> Any:
    """The request's body as JSON, read up to ``limit`` bytes (ApiError beyond, or if it is not
    UTF-8 JSON)."""
    too_large = ApiError(
        413,
        f"the request body is larger than max_body_bytes={limit}; send fewer or shorter sentences per request",
        "max_body_bytes",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not UTF-8 (byte {exc.start}); send JSON encoded as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, f"the request body is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except RecursionError:
        raise ApiError(400, "the request body's JSON is nested too deeply; send one flat object") from None
    if "\\u" in text:  # an escaped lone surrogate decodes into a str that cannot be written back as UTF-8
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                400, "the request body holds an unpaired surrogate escape (\\uD800-\\uDFFF); send valid Unicode"
            ) from None
    return data


def parse(model: type[BaseModel], data: Any) -> Any:
    """``data`` validated as ``model``; a ValidationError becomes a 422 naming each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise ApiError(422, f"invalid {model.__name__}: {problems}") from None


def check_words(lm: TrainedModel, sentence: str, where: str, limits: Limits) -> None:
    """A sentence's length within ``max_words``, and every word scorable (ApiError otherwise)."""
    words = sentence.split()
    if len(words) > limits.max_words:
        raise ApiError(
            413, f"{where} has {len(words)} words, more than max_words={limits.max_words}; split it", "max_words"
        )
    if lm.subword is None and lm.vocab.unk_id is None:
        unknown = [w for w in words if w not in lm.vocab]
        if unknown:
            raise ApiError(
                422, f"{where}: {unknown[0]!r} is not in the model's vocabulary, which has no <unk> to score it with"
            )


def sentence_result(ident: str, scored: list[WordScore], scale: float, eos: bool, with_words: bool) -> dict[str, Any]:
    """One sentence's result from its natural-log word scores (the ``<eos>`` last)."""
    rows = scored if eos else scored[:-1]
    values = [w.log_prob * scale for w in rows]
    natural = sum(w.log_prob for w in rows)
    result: dict[str, Any] = {
        "id": ident,
        "log_prob": _finite(sum(values)),
        "tokens": len(rows),
        "oov": sum(w.oov for w in rows),
        "ppl": _finite(perplexity_of(-natural, len(rows))) if rows else None,
    }
    if with_words:
        result["words"] = [{"word": w.word, "log_prob": _finite(v), "oov": w.oov} for w, v in zip(rows, values)]
    return result


def model_info(lm: TrainedModel, source: str) -> dict[str, Any]:
    """What ``GET /model`` says about the loaded model."""
    cfg = lm.model.cfg
    corpus = lm.run_config.data.name if lm.run_config is not None else None
    return {
        "source": source,
        "kind": {"input": cfg.input.kind, "encoder": cfg.encoder.kind, "output": cfg.output.kind},
        "tokenizer": "bpe" if lm.subword is not None else "word",
        "vocab_size": len(lm.vocab),
        "parameters": lm.model.num_parameters(),
        "training_corpus": corpus,
        "device": str(lm.device),
    }


def create_app(lm: TrainedModel, source: str, limits: Limits = Limits(), batching: Batching = Batching()) -> FastAPI:
    """The service of ``lm`` (``source``: where it was loaded from, for ``GET /model``)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reglm-model")
    batcher = Batcher(
        lambda sentences: lm.full_scores_batch(sentences),
        executor,
        batching.max_wait_ms / 1000.0,
        batching.max_batch_tokens,
    )
    info = {**model_info(lm, source), "limits": asdict(limits), "batching": asdict(batching)}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.close()
            executor.shutdown(wait=True)

    app = FastAPI(
        title="reglm",
        summary="Scores sentences and proposes next words with a trained reglm language model.",
        lifespan=lifespan,
    )

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc), **({"limit": exc.limit} if exc.limit else {})}, status_code=exc.status)

    @app.exception_handler(ReglmError)
    async def _reglm_error(_request: Request, exc: ReglmError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": f"invalid request: {exc.errors()[:3]}"}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "internal server error; the server's log has the details"}, status_code=500)

    @app.post("/score", response_model=ScoreResponse, responses=ERRORS, openapi_extra=_body(ScoreRequest))
    async def score(request: Request) -> JSONResponse:
        """Score sentences: per sentence its total log-probability, tokens, OOVs and perplexity,
        and with ``words`` each word's row. Concurrent requests share model calls."""
        body: ScoreRequest = parse(ScoreRequest, await read_json(request, limits.max_body_bytes))
        if len(body.sentences) > limits.max_sentences:
            raise ApiError(
                413,
                f"{len(body.sentences)} sentences, more than max_sentences={limits.max_sentences}; "
                "send them in several requests",
                "max_sentences",
            )
        ids = body.ids if body.ids is not None else [str(i) for i in range(1, len(body.sentences) + 1)]
        for ident, sentence in zip(ids, body.sentences):
            check_words(lm, sentence, f"sentence {ident}", limits)
        scored = await batcher.submit(body.sentences) if body.sentences else []
        scale = log_scale(body.base)
        results = [sentence_result(i, words, scale, body.eos, body.words) for i, words in zip(ids, scored)]
        return JSONResponse({"base": body.base, "results": results})

    @app.post("/next", response_model=NextResponse, responses=ERRORS, openapi_extra=_body(NextRequest))
    async def next_words(request: Request) -> JSONResponse:
        """The ``k`` likeliest next words after ``prefix`` (read from the start of a sentence)."""
        body: NextRequest = parse(NextRequest, await read_json(request, limits.max_body_bytes))
        if not 1 <= body.k <= limits.max_k:
            raise ApiError(422, f"k={body.k} must be in [1, max_k={limits.max_k}]", "max_k")
        check_words(lm, body.prefix, "prefix", limits)
        words = await asyncio.get_running_loop().run_in_executor(
            executor, lm.next_words, body.prefix, body.k, body.base
        )
        return JSONResponse(
            {"base": body.base, "prefix": body.prefix, "words": [{"word": w, "log_prob": _finite(v)} for w, v in words]}
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """``"status": "ok"`` while the service accepts requests, with the /score requests scored
        so far and the model calls they took (fewer calls than requests: requests were batched),
        and the /score requests waiting for their scores now."""
        return {
            "status": "ok",
            "score_requests": batcher.requests,
            "model_calls": batcher.calls,
            "score_requests_waiting": batcher.waiting,
        }

    @app.get("/model")
    async def model() -> dict[str, Any]:
        """What is loaded: component kinds, tokenizer, vocabulary size, parameters, training
        corpus, device, and the service's limits and batching."""
        return info

    return app
