"""``medvl serve``: the HTTP service (``medvl[serve]`` extra) over one trained model and an optional index."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from .common import BackendOption, handle_errors

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# the options behind each ServeSettings field, so that a refusal names what was typed (--max-upload-mb is checked in
# MiB before it becomes max_upload_bytes)
OPTION_NAMES = {"max_pixels": "--max-pixels", "max_batch": "--max-batch", "max_wait_ms": "--max-wait-ms",
                "rate_limit": "--rate-limit", "rate_burst": "--rate-burst", "failed_auth_burst": "--failed-auth-burst",
                "torch_threads": "--torch-threads", "data_root": "--data-root", "vqa_model": "--vqa-model",
                "bottleneck": "--bottleneck", "knowledge": "--knowledge", "builtin_knowledge": "--no-builtin-knowledge",
                "max_inflight_bytes": "--max-inflight-mb", "header_timeout": "--header-timeout",
                "body_timeout": "--body-timeout"}
SERVE_HINT = "pip install 'medvl[serve]'"


@handle_errors
def serve_command(
    model: Annotated[Path, typer.Option(help="Trained model folder (from medvl train).")],
    index: Annotated[str | None, typer.Option(
        help="Case index for /v1/search and /v1/report/draft: a folder or postgresql://...#table.")] = None,
    data_root: Annotated[Path | None, typer.Option(
        help="Folder of the indexed dataset: /v1/cases/{id}/thumbnail reads each case's stored image path "
             "under it (paths leaving it are refused); none: no thumbnails.")] = None,
    vqa_model: Annotated[Path | None, typer.Option(
        help="VQA model for /v1/vqa: a medvl train vqa folder or a local transformers VLM folder "
             "(LLaVA, Gemma 3); none: /v1/vqa answers 409.")] = None,
    bottleneck: Annotated[Path | None, typer.Option(
        help="Concept bottleneck fitted with this model (bottleneck.json from medvl explain --concept-data ... "
             "--out DIR): /v1/explain names each finding's top concepts.")] = None,
    knowledge: Annotated[Path | None, typer.Option(
        help="Folder of finding files (*.md) added on top of the shipped knowledge base (same name replaces) for "
             "/v1/report/draft, as medvl report draft --knowledge.")] = None,
    builtin_knowledge: Annotated[bool, typer.Option(
        "--builtin-knowledge/--no-builtin-knowledge", help="Start from the shipped finding files.")] = True,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    token_file: Annotated[Path | None, typer.Option(
        help="File of accepted tokens' SHA-256 hex digests, one per line (`printf %s TOKEN | sha256sum`); "
             "MEDVL_API_TOKENS (comma-separated tokens) is read too.")] = None,
    no_auth: Annotated[bool, typer.Option(
        "--no-auth", help="Allow serving with no token configured: anyone who reaches the port may call it "
                          "(refused unless --host is a loopback address).")] = False,
    max_batch: Annotated[int, typer.Option(help="Images per forward pass at most (micro-batching).")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests (ms).")] = 10.0,
    no_batching: Annotated[bool, typer.Option(
        "--no-batching", help="One forward pass per request (no micro-batching).")] = False,
    rate_limit: Annotated[float, typer.Option(help="Requests per second per token (0: no limit).")] = 10.0,
    rate_burst: Annotated[int, typer.Option(help="Requests a token may send at once.")] = 20,
    failed_auth_burst: Annotated[int, typer.Option(
        help="Requests without a valid token one address may send before it gets 429 (refills 1 a second).")] = 20,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted (MiB).")] = 32.0,
    max_inflight_mb: Annotated[float | None, typer.Option(
        help="Request bodies taken in at once, all clients together (MiB; uploads are held in memory): a request "
             "that would go over gets 503 with Retry-After before its body is read. Default: 8 uploads' worth "
             "(8 x --max-upload-mb and their forms).")] = None,
    header_timeout: Annotated[float, typer.Option(
        help="Seconds a connection has to send a request's headers (from its opening or the previous answer); "
             "then it is closed.")] = 10.0,
    body_timeout: Annotated[float, typer.Option(
        help="Seconds a request body may take, plus one per 64 KiB received (bodies at 64 KiB/s or faster are "
             "never cut); a slower one gets 408.")] = 10.0,
    max_pixels: Annotated[int, typer.Option(
        help="Largest 2D image accepted (width x height), at most 100,000,000 (the decoder's limit).")] = 50_000_000,
    cors_origin: Annotated[list[str] | None, typer.Option(
        help="Browser origin allowed to call the API (repeatable); none: CORS off.")] = None,
    trusted_proxy: Annotated[list[str] | None, typer.Option(
        help="Address or network (e.g. 127.0.0.1, 10.0.0.0/8) of a reverse proxy whose X-Forwarded-For names "
             "the client (repeatable): requests from it are rate-limited by the client address the header "
             "gives. None: the header is ignored and a proxy's clients share one address.")] = None,
    backend: BackendOption = "auto",
    torch_threads: Annotated[int, typer.Option(
        help="Threads per forward pass (0: one per core). On few cores, 1 leaves a core to the requests' "
             "own work: faster without micro-batching and at a few clients.")] = 0,
) -> None:
    """Serve a model over HTTP: /v1/health, /v1/models, /v1/embed, /v1/zero-shot, /v1/search,
    /v1/report/draft, /v1/explain, /v1/vqa, /v1/preview, /v1/cases/{id}/thumbnail (OpenAPI at /docs).
    Every route but /v1/health needs 'Authorization: Bearer TOKEN'."""
    from ..checks import check_number
    from ..errors import InputError
    from ..serve.settings import MIB, ServeSettings

    if no_auth and host not in LOOPBACK:
        raise InputError(f"--no-auth is refused on {host}: serve without tokens on a loopback address only")
    check_number("--port", port, minimum=1, maximum=65535, integer=True)
    check_number("--max-upload-mb", max_upload_mb)  # a finite number
    if max_upload_mb * MIB < 1:
        raise InputError(f"--max-upload-mb must allow at least one byte (> 0), got {max_upload_mb:g}")
    check_number("--max-inflight-mb", max_inflight_mb, minimum=0, exclusive_minimum=True, optional=True)
    proxies = _trusted_proxies(trusted_proxy or [])
    uvicorn, create_app, server_config = _serve_modules()
    settings = ServeSettings(max_upload_bytes=int(max_upload_mb * MIB), max_pixels=max_pixels,
                             batching=not no_batching, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             rate_limit=rate_limit, rate_burst=rate_burst, failed_auth_burst=failed_auth_burst,
                             cors_origins=list(cors_origin or []),
                             data_root=data_root, vqa_model=vqa_model, bottleneck=bottleneck,
                             knowledge=knowledge, builtin_knowledge=builtin_knowledge, backend=backend,
                             torch_threads=torch_threads, header_timeout=header_timeout, body_timeout=body_timeout,
                             max_inflight_bytes=None if max_inflight_mb is None else int(max_inflight_mb * MIB),
                             ).validate(OPTION_NAMES).for_model(model)
    _check_model_dir(model, settings.backend)
    if settings.bottleneck is not None:  # a damaged file is refused now; whether it fits the model, once that loads
        from ..explain.concepts import ConceptBottleneck

        ConceptBottleneck.load(settings.bottleneck)
    if settings.knowledge is not None:  # a damaged finding file is refused now, not at the first draft
        from ..rag import load_knowledge

        load_knowledge(settings.knowledge, builtin=settings.builtin_knowledge)
    listener = _listen(host, port)  # a port taken or not ours is refused now, before the model loads
    try:
        _setup_logs()
        app = create_app(model, index=index, settings=settings, token_file=token_file, require_token=not no_auth,
                         load_in_background=True)  # /v1/health answers while the model loads
        _log_start(host, port, model, settings, proxies)
        # proxy headers only from the proxies named: uvicorn would otherwise take X-Forwarded-For from any loopback
        # client as the client's address, and one client could then pose as any number of addresses (each with its
        # own failed-token allowance). From a trusted proxy uvicorn takes the last address not itself a proxy.
        # a connection whose request headers are not complete within --header-timeout is closed (connections)
        config = server_config(app, host=host, port=port, log_config=None, access_log=False,
                               timeout_graceful_shutdown=30, server_header=False, proxy_headers=bool(proxies),
                               forwarded_allow_ips=proxies or None)
        # a SIGTERM is the service's normal stop: uvicorn drains the requests in flight, then re-raises the signal,
        # which must end the process as a plain SIGTERM, not as the 'terminated' cleanup path of the other commands
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()


def _listen(host: str, port: int):
    """A socket bound to ``host``:``port`` (as uvicorn binds one), or ``InputError`` naming both: a port in use,
    an address not on this machine, a host name that does not resolve."""
    import socket

    from ..errors import InputError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise InputError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error})") from None
    listener.set_inheritable(True)
    return listener


def _trusted_proxies(values: list[str]) -> list[str]:
    """The --trusted-proxy values, each an IP address or network; a name or '*' is refused (a proxy trusted by
    name, or every address, would let any client choose the address it is counted by)."""
    import ipaddress

    from ..errors import InputError

    proxies = []
    for value in values:
        try:
            proxies.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            raise InputError(f"--trusted-proxy {value!r}: not an IP address or network (e.g. 127.0.0.1, "
                             f"10.0.0.0/8)") from None
    return proxies


def _check_model_dir(model: Path, backend: str) -> None:
    """A quick check before the server starts (the model itself loads once it runs): a model folder, and
    for an ONNX backend its export, made from these weights."""
    from ..errors import ModelError
    from ..models.backends import read_export
    from ..models.registry import is_model_dir, model_directory

    if not is_model_dir(model):
        raise ModelError(f"{model}: not a medvl model folder (no config.json); give a folder written by medvl train")
    if backend.startswith("onnx"):
        read_export(model_directory(model))


def _serve_modules():
    from ..errors import InputError

    try:
        import uvicorn

        from ..serve.app import create_app
        from ..serve.connections import server_config
    except ImportError as error:
        raise InputError(f"medvl serve needs FastAPI and uvicorn ({error.name} is missing): {SERVE_HINT}") from None
    return uvicorn, create_app, server_config


def _setup_logs() -> None:
    import logging

    from ..serve.logs import setup_json_logging

    setup_json_logging(logging.getLogger().getEffectiveLevel())


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


def _log_start(host: str, port: int, model: Path, settings, proxies: list[str]) -> None:
    import logging
    from importlib.util import find_spec

    # uvicorn's "auto" choices: the C parser and event loop when installed (medvl[serve] installs them)
    http = "httptools" if find_spec("httptools") else "h11"
    loop = "uvloop" if find_spec("uvloop") else "asyncio"
    logging.getLogger("medvl.serve").info(
        "serving", extra={"host": host, "port": port, "model": model.name, "batching": settings.batching,
                          "max_batch": settings.batch_size, "max_wait_ms": settings.max_wait_ms,
                          "backend": settings.backend, "http": http, "loop": loop, "trusted_proxies": proxies,
                          "torch_threads": settings.torch_threads or _default_threads()})
