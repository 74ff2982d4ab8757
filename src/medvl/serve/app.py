"""The HTTP service: ``create_app(model_dir, index=None, settings=None) -> FastAPI``.

Versioned routes (OpenAPI at ``/docs``, its swagger-ui files served by the app itself from the
``swagger-ui-bundle`` package, nothing from another host; and ``/openapi.json``): ``GET /v1/health`` (no token),
``GET /v1/models``, and, with an uploaded image in the multipart field ``image`` and options as
form fields, ``POST /v1/embed``, ``/v1/zero-shot`` (``labels=effusion,no finding``),
``/v1/search`` (``k``, ``where``, ``target``; or a ``text`` query instead of an image) and
``/v1/report/draft`` (``k``, ``where``, ``min_support``, ``min_similarity``, ``related``); the
last two need the index given at start. ``POST /v1/explain`` (``labels``, ``methods``,
``label_column``, ``top``, ``k``): the predicted findings, per finding its heatmaps as RGBA PNG
overlays (base64, the preview's shape) and, with ``--bottleneck``, the concepts that push towards
it (``concepts``, positive contributions only) and the strongest against it (``concepts_against``),
and the nearest cases (with ``--index``). ``POST /v1/vqa`` (``question``; the field ``image`` once per image, earlier
film first): the answer of the VQA model given at start (``--vqa-model``; else 409), its
probability and the top alternative. Both run one at a time beside the micro-batcher
(``lane.HeavyLane``). ``POST /v1/preview`` (``window``: a CT preset) and
``GET /v1/cases/{case_id}/thumbnail`` (the id URL-encoded; needs ``data_root``) answer PNG images
with ``Cache-Control: no-store``. Answers are JSON, the same as the CLI's ``--json``
outputs for ``medvl predict``, ``medvl search`` and ``medvl report draft``; ``/`` serves the page.

medvl's errors become 4xx answers ``{"detail": reason}`` at this boundary: 403 (a stored path
leaving the data root), 404 (no image for a case), 409 (no VQA model loaded), 413 (too large),
415 (unsupported type), 422 (unreadable upload, bad option, a field the route does not
take or one given twice), 503 (queue full, no index); 401 / 429
come from ``middleware.ServiceMiddleware`` before any body is read; the OpenAPI document declares each route's
(``refusals``: the body ``ErrorAnswer``, never FastAPI's list of ``{loc, msg, type}``). Every answer carries an
``X-Request-ID`` that names its log line (but a CORS preflight, answered by the CORS layer outside it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from .. import __version__
from ..clinical.windowing import WINDOW_PRESETS, preset_pattern
from ..errors import DataError, InputError, MedvlError, one_line
from ..index.base import MAX_K, TARGETS
from ..index.where import MAX_LENGTH as WHERE_LENGTH
from ..predict import MAX_LABELS
from ..rag.draft import LOWEST_MIN_SUPPORT, MIN_CASES
from ..rag.draft import MAX_K as DRAFT_MAX_K
from .auth import TokenAuth, load_digests
from .middleware import PUBLIC_PATHS, ServiceMiddleware
from .previews import png_bytes
from .service import ModelLoading, ModelService, ServiceUnavailable, parse_labels, parse_methods
from .settings import ServeSettings
from .uploads import Upload, check_byte_size

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# the page's own policy (its <meta> tag says the same) as a header, which alone can forbid framing
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
# the answer headers a page on another origin (--cors-origin) may read: a browser shows it none but a few by default
EXPOSED_HEADERS = ("X-Request-ID", "Retry-After", "X-Preview-Window", "X-Preview-Slice", "X-Preview-Presets")
SWAGGER_STATIC = "/static/swagger-ui"  # where the swagger-ui files of /docs are served

ImageField = Annotated[UploadFile, File(description="PNG, JPEG, DICOM (de-identified on arrival) or NIfTI.")]
# the limits the library checks (``check_k``, ``rag.draft.check_settings``, ``parse_where``), declared in the OpenAPI
# document only (``json_schema_extra``): the library's own refusal, in its words, answers a value outside them
KField = Annotated[int, Form(description="Number of cases.", json_schema_extra={"minimum": 1, "maximum": MAX_K})]
DraftKField = Annotated[int, Form(description="Number of cases the draft is made from.",
                                  json_schema_extra={"minimum": MIN_CASES, "maximum": DRAFT_MAX_K})]
WhereField = Annotated[str | None, Form(description="Filter on case metadata, e.g. \"sex = 'F' and age > 60\".",
                                        json_schema_extra={"maxLength": WHERE_LENGTH})]


class ErrorAnswer(BaseModel):
    """The body of every refusal (4xx, 503): one line saying why. A form's 422 names the fields at fault in it,
    not as FastAPI's list of ``{loc, msg, type}``."""

    detail: str = Field(description="Why the request was refused, in one line.")


# what each refusal means, for the OpenAPI document: every one answers an ``ErrorAnswer``
REFUSALS = {
    400: "A multipart body whose boundary the form parser cannot use.",
    401: "No API token, or not a valid one ('Authorization: Bearer TOKEN').",
    403: "The case's stored image path leaves the service's data root.",
    404: "No image to show for the case: unknown id, no stored path (DICOM, arrays), no data root, or the file "
         "there is not the indexed image.",
    408: "The request body did not arrive in time.",
    409: "This service was started without the model the route needs (no --vqa-model).",
    413: "A body or upload over the service's limits (bytes, pixels, voxels).",
    415: "An upload that is not PNG, JPEG, DICOM or NIfTI, a form in another charset than UTF-8, or a body that is "
         "not a form (JSON, or no Content-Type).",
    422: "An unreadable upload, a field the route does not take or given twice, or a value the route refuses.",
    429: "Too many requests from this token, or without a valid token from this address (Retry-After).",
    503: "The model is loading (Retry-After) or failed to load, the service is busy (Retry-After), or the index "
         "cannot be searched (removed, damaged, rebuilt with another model).",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before asking again (when asking again helps).",
                               "schema": {"type": "integer"}}}
TOKEN_REFUSALS = (401, 429, 503)  # every route behind a token: refused before it, or while the model loads
FORM_REFUSALS = (*TOKEN_REFUSALS, 400, 408, 413, 415, 422)  # and a POST's body and form


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=``: each refusal status with the ``ErrorAnswer`` body it has and what it means."""
    return {status: {"model": ErrorAnswer, "description": REFUSALS[status],
                     **({"headers": RETRY_AFTER} if status in (429, 503) else {})} for status in sorted(statuses)}


def create_app(model_dir: str | Path, index: str | Path | None = None, settings: ServeSettings | None = None,
               token_digests: Sequence[str] | None = None, token_file: str | Path | None = None,
               require_token: bool = True, load_in_background: bool = False) -> FastAPI:
    """The service over one model folder (and optionally one case index), loaded once.

    Tokens: ``token_digests`` (SHA-256 hex), else ``MEDVL_API_TOKENS`` and ``token_file``; with
    ``require_token`` and no token at all this is an ``InputError`` (a service open to anyone must
    be asked for: ``require_token=False``). The model is loaded here, or with ``load_in_background``
    once the server runs: ``/v1/health`` then answers at once (``"status": "loading"``) and the other
    routes 503 until the model is ready (``medvl serve`` does this; a model that fails to load is
    ``"status": "failed"`` with the error's type, 503; the other routes' 503 gives the reason).
    """
    settings = (settings or ServeSettings()).validate()  # ModelService resolves backend auto for its model
    from starlette.formparsers import MultiPartParser

    # an upload stays in memory: Starlette spools a file part over 1 MiB to a temporary file, and a patient
    # image is never written to disk (module docstring of ``uploads``). The threshold is the largest body a
    # route lets through (the VQA route's several uploads and the form), so that even a part over the upload
    # limit, refused with 413 once read, never reaches the disk
    # files a request may carry: /v1/vqa's films, one without a VQA model (it answers 409), and the VQA model's
    # own limit once loaded (``Loader.start``); the middleware refuses a larger body before reading it
    files_per_route = {"/v1/vqa": settings.vqa_uploads}
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.largest_body)
    auth = _auth(settings, token_digests, token_file, require_token)
    loader = Loader(model_dir, index, settings)
    if not load_in_background:
        loader.load()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(loader.start(app))
        if not load_in_background:
            await task
        yield
        await task  # a model still loading finishes first, then the queue drains
        await loader.stop()

    app = FastAPI(title="medvl", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  dependencies=[Depends(_check_fields)],
                  description="Medical vision-language models: zero-shot, embeddings, similar cases, report drafts, "
                              "explanations, visual question answering. Every /v1 route but /v1/health needs "
                              "'Authorization: Bearer TOKEN'.")
    app.state.settings = settings  # the server's header timeout (``connections.server_config``) reads it
    app.state.loader = loader
    app.state.files_per_route = files_per_route  # the middleware's own, kept by reference
    app.state.service = loader.service
    _add_routes(app, loader, settings)
    app.state.form_fields = _form_fields(app)
    app.state.number_fields = _number_fields(app)
    _add_docs(app)
    _add_error_handlers(app)
    app.add_middleware(ServiceMiddleware, auth=auth, max_upload_bytes=settings.max_upload_bytes,
                       routes=frozenset(getattr(route, "path", "") for route in app.routes),
                       files_per_route=files_per_route, inflight_bytes=settings.inflight_limit,
                       body_timeout=settings.body_timeout, min_body_rate=settings.min_body_rate)
    if settings.cors_origins:  # added last, so outermost: the middleware's own 401 / 413 / 429 / 500 get its headers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=list(EXPOSED_HEADERS))
    return app


class Loader:
    """The model service: loaded now (``load``) or on the server's loop (``start``), then handed to routes."""

    def __init__(self, model_dir: str | Path, index: str | Path | None, settings: ServeSettings):
        self.arguments = (model_dir, index, settings)
        self.service: ModelService | None = None
        self.ready = False  # loaded and its batcher running
        self.failure: str | None = None  # why the load failed, for the routes behind a token (may name paths)
        self.failure_type: str | None = None  # the error's type only, for /v1/health (public) and the log

    def load(self) -> ModelService:
        self.service = ModelService(*self.arguments)
        return self.service

    async def start(self, app: FastAPI) -> None:
        """Load (unless loaded) and start the batcher; a failure is kept as the reason routes give."""
        started = time.perf_counter()
        service = self.service
        if service is None:
            try:
                service = await asyncio.to_thread(self.load)
            except Exception as error:  # any failure, medvl's or not: a load that raised never becomes ready
                reason = str(error) if isinstance(error, MedvlError) else one_line(error)
                self.failure = f"the model could not be loaded: {reason}"
                self.failure_type = type(error).__name__
                # the log and the public /v1/health keep the error type only (a library's message may quote what it
                # read, medvl's names files); the reason, for the operator, is in every other route's 503
                log.error("model not loaded", extra={"error": self.failure_type})
                return
        await service.start()
        app.state.service = service
        if service.vqa is not None:  # the VQA model's own limit: more films are refused before they are read
            app.state.files_per_route["/v1/vqa"] = service.vqa_image_limit()
        self.ready = True
        log.info("model ready", extra={"model": service.net.config.name,
                                       "ms": round((time.perf_counter() - started) * 1000, 2)})

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()

    def get(self) -> ModelService:
        """The running service, or 503: ``ModelLoading`` (with Retry-After) while it loads, ``ServiceUnavailable`` if it
        failed."""
        if self.failure:
            raise ServiceUnavailable(self.failure)
        if not self.ready or self.service is None:
            raise ModelLoading("the model is still loading; retry in a few seconds")
        return self.service


def _auth(settings: ServeSettings, digests: Sequence[str] | None, token_file, required: bool) -> TokenAuth | None:
    digests = list(digests) if digests is not None else load_digests(token_file)
    if not digests:
        if required and token_file is not None:  # the file was given: say that it holds none
            raise InputError(f"{token_file}: no API token digest in the token file (one SHA-256 digest per line), "
                             "and MEDVL_API_TOKENS sets none")
        if required:
            raise InputError("no API tokens: set MEDVL_API_TOKENS (comma-separated) or give --token-file "
                             "(one SHA-256 digest per line)")
        return None
    return TokenAuth(digests, rate=settings.rate_limit, burst=settings.rate_burst,
                     failure_rate=settings.failed_auth_rate, failure_burst=settings.failed_auth_burst)


async def _bytes(image: UploadFile, service: ModelService) -> bytes:
    """The uploaded file's bytes (never more than the limit + 1 read); its name is ignored."""
    data = await image.read(service.settings.max_upload_bytes + 1)
    await image.close()
    check_byte_size(len(data), service.settings)
    return data


MULTI_FIELDS = {"/v1/vqa": {"image"}}  # the fields a route takes several of (films in order)
# the fields a route refuses without, declared required in /openapi.json, whose handlers give them a default all the
# same: FastAPI reads an empty form field as a missing one, which its "Field required" would refuse without the
# library's reason (an empty question is refused with check_question's)
REQUIRED_FIELDS = {"/v1/vqa": ("question",)}
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
SHOWN_UNKNOWN = 10  # unknown field names an answer quotes at most (each cut to 40 characters)


def _form_fields(app: FastAPI) -> dict[str, tuple[str, ...]]:
    """Each POST route's form fields (its ``Form`` and ``File`` parameters), in the order it declares them."""
    from fastapi.routing import APIRoute

    return {route.path: tuple(param.alias for param in route.dependant.body_params)
            for route in app.routes if isinstance(route, APIRoute) and "POST" in (route.methods or ())}


def _number_fields(app: FastAPI) -> dict[str, frozenset[str]]:
    """Each POST route's number fields (``k``, ``top``, ``min_similarity``...)."""
    from fastapi.routing import APIRoute

    return {route.path: frozenset(param.alias for param in route.dependant.body_params
                                  if param.field_info.annotation in (int, float))
            for route in app.routes if isinstance(route, APIRoute) and "POST" in (route.methods or ())}


async def _check_fields(request: Request) -> None:
    """A form field the route does not take (422 naming it and the route's fields: a misspelt ``min-similarity``
    or ``K`` was dropped and the default answered, without a word), a field given twice (422: a route answered
    about the last of two images, or the last of two questions, without a word), or a number field given empty
    (422: FastAPI reads ``k=`` as no ``k``, and the default was answered, without a word)."""
    content_type = request.headers.get("content-type", "").lower()
    if request.method != "POST" or not content_type.startswith(FORM_TYPES):
        return
    form = await request.form()  # parsed once: the route's own parameters read the same form
    path = request.url.path
    accepted = request.app.state.form_fields.get(path, ())
    unknown = sorted(name for name in set(form.keys()) if name not in accepted)
    if unknown:
        shown = ", ".join(repr(name[:40]) for name in unknown[:SHOWN_UNKNOWN])
        more = f" and {len(unknown) - SHOWN_UNKNOWN} more" if len(unknown) > SHOWN_UNKNOWN else ""
        raise HTTPException(422, f"unknown field(s) {shown}{more}; {path} takes {', '.join(accepted) or 'none'}")
    repeated = sorted(name for name in set(form.keys()) if len(form.getlist(name)) > 1
                      and name not in MULTI_FIELDS.get(path, set()))
    if repeated:
        raise HTTPException(422, f"field(s) {', '.join(repeated)} given more than once; send each once")
    empty = sorted(name for name in request.app.state.number_fields.get(path, ()) if form.get(name) == "")
    if empty:
        raise HTTPException(422, f"field(s) {', '.join(empty)} given empty; give a number, or leave the field out "
                                 "for its default")


async def _read(image: UploadFile, service: ModelService, request: Request, hashed: bool = False) -> Upload:
    """The uploaded file, decoded (for the routes that do not go through the batcher); ``hashed``: a volume with
    its pixel hash (``ModelService.decode``)."""
    return await service.decode(await _bytes(image, service), request.state.timings, hashed=hashed)


def _add_routes(app: FastAPI, loader: Loader, settings: ServeSettings) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    @app.get("/v1/health", tags=["service"], responses=refusals(503))
    async def health() -> JSONResponse:
        """No token needed: ``ok`` (model ready), ``loading`` or ``failed`` (503, with the error's type only: the
        reason may name the server's files; the routes behind a token give it). With an index, ``index`` is ``ok``
        or ``unavailable`` (its PostgreSQL table dropped or rebuilt with another model under the service, or a FAISS
        index's case table found damaged by a search), and the status ``degraded`` (200: the model's routes still
        answer; the index routes 503 with the reason). The index is asked on the model thread, between searches;
        behind a long task there the word is the last one (``ModelService.index_health``)."""
        if loader.failure:
            return JSONResponse({"status": "failed", "error": loader.failure_type,
                                 "detail": f"the model could not be loaded ({loader.failure_type}); the routes that "
                                           "need a token give the reason"}, status_code=503)
        if not loader.ready or loader.service is None:
            return JSONResponse({"status": "loading", "batching": settings.batching})
        service = loader.service
        index = await asyncio.to_thread(service.index_health)  # a store's round trip, off the event loop
        return JSONResponse({"status": "degraded" if index == "unavailable" else "ok", "batching": settings.batching,
                             "waiting": service.batcher.waiting, **({"index": index} if index else {})})

    @app.get("/v1/models", tags=["service"], responses=refusals(*TOKEN_REFUSALS))
    async def models() -> dict:
        """The loaded model: name, embedding size, input, the labels it has captions for, its fingerprint; the index,
        the VQA model, the OOD guard (``ood``) and the knowledge base (``knowledge``): what changes an answer."""
        return {"models": [await loader.get().described()]}

    @app.post("/v1/embed", tags=["models"], responses=refusals(*FORM_REFUSALS))
    async def embed(request: Request, image: ImageField) -> dict:
        """The normalised image embedding of the upload."""
        service = loader.get()
        embedding = await service.embed(await _bytes(image, service), request.state.timings)
        return {"model": service.net.config.name, "dim": int(embedding.shape[0]),
                "embedding": [float(v) for v in embedding]}

    @app.post("/v1/zero-shot", tags=["models"], responses=refusals(*FORM_REFUSALS))
    async def zero_shot(request: Request, image: ImageField,
                        labels: Annotated[str, Form(description=f"Comma-separated class names, 2 to {MAX_LABELS} "
                                                    "distinct.", json_schema_extra={"x-max-labels": MAX_LABELS})],
                        label_column: Annotated[str | None, Form(
                            description="Label column whose class descriptions to use.")] = None) -> dict:
        """Zero-shot answer among the labels: the prediction and every label's probability."""
        service = loader.get()
        names = parse_labels(labels)
        return await service.zero_shot(await _bytes(image, service), names, label_column, request.state.timings)

    @app.post("/v1/search", tags=["cases"], responses=refusals(*FORM_REFUSALS))
    async def search(request: Request, image: Annotated[UploadFile | None, File(
                         description="Query image (or give text).")] = None,
                     text: Annotated[str | None, Form(description="Query text instead of an image.")] = None,
                     k: KField = 10, where: WhereField = None,
                     target: Annotated[str, Form(description="images or texts (reports).",
                                                 json_schema_extra={"enum": list(TARGETS)})] = "images") -> dict:
        """The k indexed cases closest to the query image (or text)."""
        service = loader.get()
        upload = await _read(image, service, request) if image is not None else None
        return await service.search(upload, text, k, where, target, request.state.timings)

    @app.post("/v1/report/draft", tags=["cases"], responses=refusals(*FORM_REFUSALS))
    async def draft(request: Request, image: ImageField, k: DraftKField = 10, where: WhereField = None,
                    min_support: Annotated[float, Form(json_schema_extra={"minimum": LOWEST_MIN_SUPPORT,
                                                                          "exclusiveMaximum": 1})] = 0.5,
                    min_similarity: Annotated[float, Form(json_schema_extra={"minimum": -1, "maximum": 1})] = 0.5,
                    related: Annotated[int, Form(json_schema_extra={"minimum": 0})] = 0) -> dict:
        """A report drafted from the k nearest cases' reports, citing them, or an abstention with a reason."""
        service = loader.get()
        upload = await _read(image, service, request, hashed=True)
        return await service.draft(upload, k, where, min_support, min_similarity, related)

    @app.post("/v1/explain", tags=["models"], responses=refusals(*FORM_REFUSALS))
    async def explain(request: Request, image: ImageField,
                      labels: Annotated[str | None, Form(description="Comma-separated findings to choose among, "
                                                         f"2 to {MAX_LABELS} distinct (absent or blank: every class "
                                                         "the model's captions describe, with a concept bottleneck "
                                                         "those of its label column when they describe it; a "
                                                         "bottleneck that does not predict them is refused).",
                                                         json_schema_extra={"x-max-labels": MAX_LABELS})] = None,
                      methods: Annotated[str | None, Form(description="Comma-separated heatmap methods, e.g. "
                                                          "patch_text,gradcam (default: both on a CNN, else "
                                                          "patch_text).")] = None,
                      label_column: Annotated[str | None, Form(
                          description="Label column whose class descriptions to use.")] = None,
                      # a default, not an annotation: the annotations are read as text, where this function's
                      # settings are not in scope
                      top: int = Form(1, description="Explain the TOP most probable findings (at most the number "
                                      "of labels).", json_schema_extra={"minimum": 1,
                                                                        "maximum": settings.max_explain_top}),
                      k: Annotated[int, Form(description="Nearest cases (with an index).",
                                             json_schema_extra={"minimum": 1, "maximum": MAX_K})] = 5) -> dict:
        """Why the model sees its findings: per finding its probability, a heatmap per method (an RGBA PNG
        overlay, base64, of the preview's shape: lay it over the image) with its peak, the concepts of the
        concept bottleneck that push towards it (and, apart, the strongest against it); and the nearest
        indexed cases. Peaks are [row, column] on the overlay's grid (``map_shape`` = ``overlay.shape``), not the
        image's (``image.shape``) when the image is larger than the preview: scale by their ratio."""
        service = loader.get()
        names = parse_labels(labels) if labels and labels.strip() else None
        chosen = parse_methods(methods) if methods and methods.strip() else None
        return await service.explain(await _bytes(image, service), names, label_column or None, chosen, top, k,
                                     request.state.timings)

    # the files a request may carry (the service's max_vqa_images): the VQA model's own limit, known once it is
    # loaded, may be lower (/v1/models' vqa.max_images)
    count = (f"1 to {settings.vqa_uploads} (the service's max_vqa_images), at most the VQA model's own max_images "
             "(/v1/models)" if settings.vqa_model is not None else "this service has no VQA model (409)")
    vqa_images = File(description="The image(s) the question is about: the field once per image, earlier film first "
                                  f"(PNG, JPEG, DICOM, NIfTI); {count}.",
                      json_schema_extra={"minItems": 1, "maxItems": settings.vqa_uploads})

    @app.post("/v1/vqa", tags=["models"], responses=refusals(*FORM_REFUSALS, 409))
    async def vqa(request: Request,
                  image: list[UploadFile] = vqa_images,  # a default, not an annotation, as explain's top
                  question: Annotated[str, Form(description="The question about the image(s).",
                                                json_schema_extra={"minLength": 1})] = "") -> dict:
        """The VQA model's answer (given at start with --vqa-model; else 409): probability, the top
        alternative, the answer type and, from a medvl VQA model, its attention over each image."""
        service = loader.get()
        service.check_vqa_request(len(image), question)
        images = [await _bytes(upload, service) for upload in image]
        return await service.vqa_answer(images, question, request.state.timings)

    @app.post("/v1/preview", tags=["images"], response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "8-bit PNG, not cached"},
                         **refusals(*FORM_REFUSALS)})
    async def preview(request: Request, image: ImageField, window: Annotated[str | None, Form(
                          description=f"CT window preset: {', '.join(WINDOW_PRESETS)} (any case; '-' or a space for "
                                      "'_'); absent or blank: the DICOM file's own window, else min-max.",
                          # the names parse_window reads: an enum of the lower-case names refused LUNG, taken here
                          json_schema_extra={"pattern": preset_pattern(blank=True),
                                             "examples": list(WINDOW_PRESETS)})] = None) -> Response:
        """The upload as an 8-bit PNG (longest side <= 512 px; a volume's middle axial slice)."""
        service = loader.get()
        picture = await service.preview(await _bytes(image, service), window, request.state.timings)
        return Response(png_bytes(picture.image), media_type="image/png", headers=picture.headers())

    @app.get("/v1/cases/{case_id:path}/thumbnail", tags=["cases"], response_class=Response,
             responses={200: {"content": {"image/png": {}}, "description": "8-bit PNG, not cached"},
                        **refusals(*TOKEN_REFUSALS, 403, 404, 422)})
    async def thumbnail(case_id: str) -> Response:
        """An indexed case's image as a PNG (longest side <= 128 px), read from its stored path under the
        service's data root. The id is URL-encoded (``/`` as ``%2F`` or as is). 404: unknown case, no
        stored path (DICOM), no data root."""
        picture = await loader.get().thumbnail(case_id)
        return Response(png_bytes(picture.image), media_type="image/png", headers=picture.headers())


def _add_docs(app: FastAPI) -> None:
    """``/docs`` from swagger-ui files served by the app (an offline machine reaches no CDN); the
    OpenAPI document names the bearer token so that its "Authorize" button sends it."""
    _declare_bearer(app)
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        log.warning("no /docs: the swagger-ui-bundle package is missing (pip install 'medvl[serve]')")
        return
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount(SWAGGER_STATIC, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="medvl API",
                                   swagger_js_url=f"{SWAGGER_STATIC}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{SWAGGER_STATIC}/swagger-ui.css",
                                   swagger_favicon_url=f"{SWAGGER_STATIC}/favicon-32x32.png",
                                   oauth2_redirect_url=None,
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge from another host


def _declare_bearer(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/v1/") and path not in PUBLIC_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            _declare_required(schema)
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_required(schema: dict) -> None:
    """``REQUIRED_FIELDS`` declared required in the OpenAPI ``schema``, without the default their handlers give them."""
    for path, names in REQUIRED_FIELDS.items():
        body = schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        form = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
        for name in names:
            form["properties"][name].pop("default", None)
            required = form.setdefault("required", [])
            if name not in required:
                required.append(name)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MedvlError)
    async def medvl_error(request: Request, error: MedvlError) -> JSONResponse:
        request.state.timings["error"] = type(error).__name__
        reason = error.problem if isinstance(error, DataError) else str(error)
        retry_after = getattr(error, "retry_after", None)  # a busy service says when to ask again, as a 429 does
        return JSONResponse({"detail": reason}, status_code=getattr(error, "status", 422),
                            headers={"Retry-After": str(retry_after)} if retry_after else None)

    @app.exception_handler(RequestValidationError)
    async def invalid_form(request: Request, error: RequestValidationError) -> JSONResponse:
        request.state.timings["error"] = "RequestValidationError"
        reasons = [f"{'.'.join(str(part) for part in item['loc'][1:])}: {item['msg']}" for item in error.errors()]
        return JSONResponse({"detail": "; ".join(reasons)}, status_code=422)  # the values are not echoed

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        request.state.timings["error"] = f"http_{error.status_code}"
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)
    # any other exception is answered 500 by ``ServiceMiddleware``, with the request id and the headers of every answer
