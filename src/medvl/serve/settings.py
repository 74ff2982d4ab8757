"""What a running service allows: upload limits, batching, rate limits, CORS origins, the data root,
and the optional models beside the dual encoder (a VQA model, a concept bottleneck)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..checks import check_numbers
from ..data.images import MAX_PIXELS
from ..errors import InputError
from ..models.backends import check_backend, resolve_backend
from ..models.registry import model_directory

MIB = 1 << 20
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the option fields beside the file
INFLIGHT_UPLOADS = 8  # the default in-flight budget: this many request bodies of one upload each


@dataclass
class ServeSettings:
    """Limits and switches of one service; every number is checked by ``validate``."""

    max_upload_bytes: int = 32 * MIB  # an uploaded file above this is refused (413)
    # a 2D image declaring more pixels (W x H) is refused before decoding (413); at most the decoder's own limit
    # (``medvl.data.images.MAX_PIXELS``, 100 M), which would refuse a larger image after this check passed
    max_pixels: int = 50_000_000
    max_voxels: int = 256_000_000  # a volume (NIfTI, multi-frame DICOM) declaring more voxels is refused (413)
    batching: bool = True  # gather concurrent requests into one forward pass
    max_batch: int = 16  # images per forward pass at most
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for others
    max_queue: int = 256  # images waiting for the model at most; beyond, 503
    rate_limit: float = 10.0  # requests per second per token, sustained (0: no limit)
    rate_burst: int = 20  # requests a token may send at once before the rate applies
    failed_auth_rate: float = 1.0  # requests without a valid token per second per client address, sustained
    failed_auth_burst: int = 20  # such requests an address may send at once; beyond, 429 (slows token guessing)
    cors_origins: list[str] = field(default_factory=list)  # empty: CORS off (no cross-origin browser calls)
    # the folder of the indexed dataset: case thumbnails are read from the index's stored paths under it
    # (``/v1/cases/{id}/thumbnail``); None: no thumbnails (404)
    data_root: Path | None = None
    # a VQA model for /v1/vqa: a ``medvl train vqa`` folder or a local transformers VLM folder; None: 409
    vqa_model: Path | None = None
    # a concept bottleneck fitted with the served model (``medvl explain --concept-data ... --out DIR`` writes
    # DIR/bottleneck.json): /v1/explain then names each finding's top concepts; None: no concepts
    bottleneck: Path | None = None
    # /v1/report/draft's knowledge base, as ``medvl report draft --knowledge`` takes it: a folder of finding files
    # on top of the shipped ones (same name replaces), or alone with ``builtin_knowledge`` False
    knowledge: Path | None = None
    builtin_knowledge: bool = True
    max_vqa_images: int = 4  # image files one /v1/vqa request may carry (the model's own limit applies too)
    max_explain_top: int = 3  # findings one /v1/explain request may ask to explain (heatmaps each)
    heavy_queue: int = 4  # explain / VQA requests waiting while one computes; beyond, 503
    # how the dual encoder's towers run for embeddings and zero-shot (``medvl.models.backends``: auto, torch,
    # torch-channels-last, torch-bf16, onnx, onnx-int8); auto is channels-last for a medvl model, eager torch
    # for a transformers one (``for_model`` resolves it); explanations always use eager torch (gradients)
    backend: str = "auto"
    # threads of each forward pass on the model's thread (torch's intra-op threads; 0: torch's default, one
    # per core). On few cores, 1 leaves a core to the requests' own work: more requests per second without
    # micro-batching and at a few clients (docs/benchmarks.md); it is process-wide (torch's setting)
    torch_threads: int = 0
    # bytes of request bodies the service takes in at once, all requests together: a request whose declared body
    # (a chunked one's bytes so far) would take them over is refused with 503 and Retry-After, before its body is
    # read. Uploads are held in memory (never written to disk), so this bounds their memory. None: INFLIGHT_UPLOADS
    # (8) bodies of one upload each (``inflight_limit``); never less than the largest body a route takes
    max_inflight_bytes: int | None = None
    # seconds a connection has to send a request's headers, from its opening or from the previous answer: a
    # connection still sending them is closed (a client holding many half-open connections would otherwise make
    # the service unreachable)
    header_timeout: float = 10.0
    # seconds a request's body may take, plus one for every ``min_body_rate`` bytes received: a body arriving at
    # 64 KiB/s or faster is never cut (a 32 MiB upload may take 522 s), a slower one is refused with 408 and its
    # connection closed
    body_timeout: float = 10.0
    min_body_rate: int = 64 * 1024

    def validate(self, names: Mapping[str, str] | None = None) -> ServeSettings:
        """``self`` if every number is in range, else ``InputError`` naming the setting: by ``names[setting]``
        when given (``medvl serve`` passes its option names, ``max_batch`` -> ``--max-batch``), else by its
        attribute name."""
        names = names or {}
        bounds: dict[str, dict] = {
            "max_upload_bytes": {"minimum": 1, "integer": True},
            "max_pixels": {"minimum": 1, "maximum": MAX_PIXELS, "integer": True},
            "max_voxels": {"minimum": 1, "integer": True},
            "max_batch": {"minimum": 1, "maximum": 1024, "integer": True},
            "max_wait_ms": {"minimum": 0, "maximum": 10_000}, "max_queue": {"minimum": 1, "integer": True},
            "rate_limit": {"minimum": 0}, "rate_burst": {"minimum": 1, "integer": True},
            "failed_auth_rate": {"minimum": 0, "exclusive_minimum": True},
            "failed_auth_burst": {"minimum": 1, "integer": True},
            "max_vqa_images": {"minimum": 1, "maximum": 64, "integer": True},
            "max_explain_top": {"minimum": 1, "maximum": 16, "integer": True},
            "heavy_queue": {"minimum": 0, "integer": True},
            "torch_threads": {"minimum": 0, "maximum": 1024, "integer": True},
            "max_inflight_bytes": {"minimum": 0, "integer": True, "optional": True},  # then at least the largest body
            "header_timeout": {"minimum": 0, "exclusive_minimum": True, "maximum": 3600},
            "body_timeout": {"minimum": 0, "exclusive_minimum": True, "maximum": 3600},
            "min_body_rate": {"minimum": 1, "integer": True}}
        check_numbers({names.get(setting, setting): (getattr(self, setting), limits)
                       for setting, limits in bounds.items()})
        if self.max_inflight_bytes is not None and self.max_inflight_bytes < self.largest_body:
            uploads = self.vqa_uploads
            body = f"/v1/vqa's {uploads} uploads and their form" if uploads > 1 else "one upload and its form"
            raise InputError(f"{names.get('max_inflight_bytes', 'max_inflight_bytes')} must hold the largest request "
                             f"body, {self.largest_body / MIB:.2f} MiB ({body}), "
                             f"got {round(self.max_inflight_bytes / MIB, 2):g} MiB")
        check_backend(self.backend)
        for setting in ("vqa_model", "bottleneck"):
            value = getattr(self, setting)
            if value is not None:
                setattr(self, setting, Path(value))
                if not getattr(self, setting).exists():
                    raise InputError(f"{names.get(setting, setting.replace('_', ' '))} {value}: not found")
        if self.knowledge is not None:
            self.knowledge = Path(self.knowledge)
            if not self.knowledge.is_dir():
                raise InputError(f"{names.get('knowledge', 'knowledge')} {self.knowledge}: not a folder")
        elif not self.builtin_knowledge:
            raise InputError(f"{names.get('builtin_knowledge', 'builtin_knowledge=False')} leaves no knowledge base: "
                             f"give a folder of finding files ({names.get('knowledge', 'knowledge')})")
        if self.data_root is not None:
            self.data_root = Path(self.data_root)
            if not self.data_root.is_dir():
                raise InputError(f"{names.get('data_root', 'data root')} {self.data_root}: not a folder")
        return self

    def for_model(self, model_dir: str | Path) -> ServeSettings:
        """A copy of these settings with ``backend`` ``auto`` replaced by the backend it stands for with the
        model in ``model_dir`` (a model folder or a train output folder), so logs and ``/v1/models`` name it;
        ``self`` keeps ``auto`` (one settings object may serve models of both kinds)."""
        return replace(self, backend=resolve_backend(model_directory(model_dir), self.backend))

    @property
    def vqa_uploads(self) -> int:
        """Files one ``/v1/vqa`` request may carry: ``max_vqa_images`` with a VQA model; without one, one (the
        route answers 409 after reading it)."""
        return self.max_vqa_images if self.vqa_model is not None else 1

    @property
    def largest_body(self) -> int:
        """Bytes of the largest request body a route takes: ``/v1/vqa``'s uploads and their form (one upload
        without a VQA model)."""
        return self.max_upload_bytes * self.vqa_uploads + FORM_OVERHEAD

    @property
    def inflight_limit(self) -> int:
        """Bytes of request bodies taken in at once: ``max_inflight_bytes``, by default ``INFLIGHT_UPLOADS`` bodies
        of one upload each (8 x 32 MiB and their forms: 256.5 MiB), or the largest body if that is more."""
        if self.max_inflight_bytes is not None:
            return self.max_inflight_bytes
        return max(INFLIGHT_UPLOADS * (self.max_upload_bytes + FORM_OVERHEAD), self.largest_body)

    @property
    def batch_size(self) -> int:
        """Images per forward pass: ``max_batch`` with batching, else one."""
        return self.max_batch if self.batching else 1
