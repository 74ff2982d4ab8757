"""The HTTP service (``medvl[serve]`` extra): FastAPI over the same library calls as the CLI.

``create_app(model_dir, index=None, settings=ServeSettings(...)) -> FastAPI``; ``medvl serve`` runs it
with uvicorn. Modules: ``app`` (routes, error mapping), ``service`` (the loaded model and what the
routes do), ``batching`` (dynamic micro-batching), ``uploads`` (sniffing, limits, DICOM
de-identification), ``previews`` (an upload's preview and a case's thumbnail as PNG, rendered by
``medvl.clinical.windowing.render_preview``), ``auth`` (hashed API tokens, per-token rate limit),
``middleware`` (request id, auth and body limit before the body is read), ``logs`` (JSON log lines),
``lane`` (explanations and VQA answers: one at a time beside the micro-batcher, a bounded wait),
``connections`` (the uvicorn config ``medvl serve`` runs: a connection's request headers have a deadline),
``explanation`` (``medvl explain``'s computation on an upload's decoded pixels),
``settings``.
"""

from .settings import ServeSettings as ServeSettings


def create_app(*args, **kwargs):
    """``medvl.serve.app.create_app``; imported on call so ``import medvl.serve`` needs no FastAPI."""
    from .app import create_app as build

    return build(*args, **kwargs)
