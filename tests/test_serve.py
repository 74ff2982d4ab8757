"""The HTTP service end to end: a model trained by ``medvl train``, a real index, a tiny VQA model
trained by ``medvl train vqa``, a concept bottleneck fitted by ``medvl explain``, a real uvicorn
server on 127.0.0.1 (a free port), real PNG / DICOM / NIfTI uploads; abuse answered 401 / 413 /
415 / 422 / 429 with a reason, and a correct answer after all of it; explanations and VQA answers as
the library gives them; offline OpenAPI docs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import select
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from cli_helpers import invoke  # noqa: E402
from hostile_files import animated_png, jpeg_dicom_with_inserted_bytes  # noqa: E402
from medvl.data import load_dataset  # noqa: E402
from medvl.errors import DataError, InputError  # noqa: E402
from medvl.index import build_index, open_index, search_index  # noqa: E402
from medvl.io import file_sha256  # noqa: E402
from medvl.models.backends import resolve_backend  # noqa: E402
from medvl.models.registry import load_model  # noqa: E402
from medvl.predict import predict  # noqa: E402
from medvl.serve import ServeSettings, create_app  # noqa: E402
from medvl.serve.auth import digests_from_file, token_digest  # noqa: E402
from medvl.serve.batching import RECENT_S, MicroBatcher, ServiceBusy  # noqa: E402
from medvl.serve.logs import JsonFormatter  # noqa: E402
from medvl.serve.uploads import DICOM, JPEG, NIFTI, NIFTI_GZ, PNG, UploadRejected, sniff  # noqa: E402
from serve_helpers import Server, fit_concept_bottleneck, train_tiny_vqa_model  # noqa: E402

LABELS = "no_finding,cardiomegaly,nodule"
TOKENS = [f"test-token-{n:03d}-{'x' * 12}" for n in range(300)]
UPLOAD_LIMIT = 256 * 1024
_next_token = iter(TOKENS[1:])


def auth(token: str | None = None) -> dict[str, str]:
    """Headers with a token not used by any other test (each token has its own rate-limit bucket)."""
    return {"Authorization": f"Bearer {token or next(_next_token)}"}


@pytest.fixture(scope="module")
def model_dir(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", out,
                            "--max-steps", 2, "--batch-size", 32, "-q")  # the answers are compared, not scored
    assert result.exit_code == 0, output
    return out / "model"


@pytest.fixture(scope="module")
def index_dir(phantom_dir, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-index") / "cases.idx"
    build_index(load_model(model_dir), load_dataset(phantom_dir).select("train"), out, model_dir=model_dir,
                show_progress=False)
    return out


@pytest.fixture(scope="module")
def png(phantom_dir) -> Path:
    return load_dataset(phantom_dir).select("test")[0].image


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory) -> Path:
    return train_tiny_vqa_model(tmp_path_factory.mktemp("serve-vqa"))


@pytest.fixture(scope="module")
def bottleneck_file(model_dir, phantom_dir, png, tmp_path_factory) -> Path:
    return fit_concept_bottleneck(model_dir, phantom_dir, png, tmp_path_factory.mktemp("serve-concepts") / "out")


@pytest.fixture(scope="module")
def server(model_dir, index_dir, phantom_dir, vqa_dir, bottleneck_file):
    settings = ServeSettings(max_upload_bytes=UPLOAD_LIMIT, max_pixels=4_000_000, max_batch=8, max_wait_ms=30,
                             rate_limit=1.0, rate_burst=12, data_root=phantom_dir, vqa_model=vqa_dir,
                             bottleneck=bottleneck_file)
    app = create_app(model_dir, index=index_dir, settings=settings,
                     token_digests=[token_digest(token) for token in TOKENS])
    with Server(app) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


@pytest.fixture
def upload_tmp(tmp_path, monkeypatch) -> Path:
    """The temporary folder of this test alone (the in-process server's uploads' private folders go there): the
    shared one may hold another process's upload folder while it answers."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def log_lines(caplog):
    """The service's log records of this test, formatted as the service writes them (JSON lines)."""
    caplog.set_level(logging.INFO)
    formatter = JsonFormatter()
    return lambda: [formatter.format(record) for record in caplog.records]


def zero_shot(client, image: bytes, name: str = "image.png", headers=None):
    return client.post("/v1/zero-shot", headers=headers or auth(), files={"image": (name, image)},
                       data={"labels": LABELS})


# ------------------------------------------------------------------------------------ auth


def test_health_is_public_and_every_other_route_needs_a_valid_token(client):
    assert client.get("/v1/health").json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"}, {"Authorization": TOKENS[0]}):
        answer = client.get("/v1/models", headers=headers)
        assert answer.status_code == 401 and "token" in answer.json()["detail"]
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        refused = client.post("/v1/zero-shot", headers=headers, files={"image": ("a.png", b"x" * 1000)},
                              data={"labels": LABELS})
        assert refused.status_code == 401
    models = client.get("/v1/models", headers=auth()).json()["models"]
    assert models[0]["name"] == "phantom-tiny" and models[0]["index"]["cases"] > 0
    assert "/" not in models[0]["folder"] and "/" not in models[0]["index"]["name"]
    # the page checks a file before sending it
    assert models[0]["limits"] == {"max_upload_bytes": UPLOAD_LIMIT, "max_inflight_bytes": 8 * (UPLOAD_LIMIT + 65536)}


def test_models_tells_a_model_retrained_or_an_index_rebuilt_under_the_same_name(model_dir, index_dir, phantom_dir,
                                                                                tmp_path):
    """/v1/models named the model by its config name and folder name only: a model retrained and redeployed under
    the same folder (or an index rebuilt under the same name) was described as the one before, so the page kept
    the previous answers as current. Its weights' and the index's digests now tell them apart, naming no path."""
    import torch

    from medvl.serve.service import ModelService

    retrained = load_model(model_dir)
    with torch.no_grad():
        next(retrained.parameters()).add_(0.01)
    retrained.save_pretrained(tmp_path / "redeployed" / "model")
    rebuilt = tmp_path / "rebuilt" / index_dir.name  # other cases, the same name
    build_index(load_model(model_dir), load_dataset(phantom_dir).select("test"), rebuilt, model_dir=model_dir,
                show_progress=False)
    described = []
    for folder, index in ((model_dir, index_dir), (tmp_path / "redeployed" / "model", None), (model_dir, rebuilt)):
        service = ModelService(folder, index, ServeSettings())
        described.append(service.describe())
        service.model_thread.shutdown()
        service.workers.shutdown()
        if service.index is not None:
            service.index.close()
    first, redeployed, other_index = described
    assert first["folder"] == redeployed["folder"] and first["name"] == redeployed["name"]
    assert first["fingerprint"]["weights_sha256"] != redeployed["fingerprint"]["weights_sha256"]
    assert first["fingerprint"]["config_sha256"] == redeployed["fingerprint"]["config_sha256"]
    assert first["index"]["name"] == other_index["index"]["name"]
    assert first["index"]["sha256"] != other_index["index"]["sha256"]
    assert first["fingerprint"] == other_index["fingerprint"]
    assert str(tmp_path) not in json.dumps(described) and str(model_dir) not in json.dumps(described)
    with open_index(index_dir) as index:  # the digests an index records of its model
        assert index.info["model"]["weights_sha256"] == first["fingerprint"]["weights_sha256"]


def test_models_tells_a_vqa_model_redeployed_under_the_same_name(model_dir, vqa_dir, tmp_path):
    """/v1/models gave the dual encoder's fingerprint but named the VQA model by its folder only: one retrained and
    redeployed under the same folder name was described as the one before, so the page kept its answers as current.
    Its config, weights and tokenizer digests (``vqa.fingerprint``) now tell them apart, naming no path."""
    import torch

    from medvl.index.base import vqa_fingerprint
    from medvl.models.vqa import load_vqa_model
    from medvl.serve.service import ModelService

    retrained = load_vqa_model(vqa_dir)
    with torch.no_grad():
        retrained.answer_head[-1].bias.add_(0.01)
    redeployed = tmp_path / "redeployed" / vqa_dir.name
    retrained.save_pretrained(redeployed)
    described = []
    for folder in (vqa_dir, redeployed, vqa_dir):
        service = ModelService(model_dir, None, ServeSettings(vqa_model=folder))
        described.append(service.describe()["vqa"])
        service.model_thread.shutdown()
        service.workers.shutdown()
    first, other, again = described
    assert first["folder"] == other["folder"] and first["answers"] == other["answers"]
    assert set(first["fingerprint"]) == {"config_sha256", "weights_sha256", "tokenizer_sha256"}
    assert all(len(digest) == 64 for digest in first["fingerprint"].values())
    assert first["fingerprint"]["weights_sha256"] != other["fingerprint"]["weights_sha256"]
    assert {key: first["fingerprint"][key] for key in ("config_sha256", "tokenizer_sha256")} == \
        {key: other["fingerprint"][key] for key in ("config_sha256", "tokenizer_sha256")}
    assert first == again and first["fingerprint"] == vqa_fingerprint(load_vqa_model(vqa_dir))
    assert str(tmp_path) not in json.dumps(described) and str(vqa_dir) not in json.dumps(described)


def test_models_tells_a_guard_fitted_or_a_knowledge_base_edited_between_two_starts(model_dir, index_dir,
                                                                                   phantom_dir, tmp_path):
    """/v1/models described the model by its config, weights and tokenizer only: a service restarted on the same
    folder after `medvl ood fit` (the weights unchanged), or with its knowledge base edited, was described as before,
    so the page kept answers made without the guard's warning (or with other knowledge) as current. The guard
    (threshold, quantile, its file's SHA-256) and the knowledge base's digest are now part of it; a plain restart
    keeps the description."""
    import shutil

    from medvl.serve.service import ModelService

    served = tmp_path / "served" / "model"
    shutil.copytree(model_dir, served)
    (tmp_path / "knowledge").mkdir()
    (tmp_path / "knowledge" / "air_leak.md").write_text(USER_FINDING)

    def described(index=index_dir, knowledge=None) -> dict:
        service = ModelService(served, index, ServeSettings(knowledge=knowledge))
        try:
            return service.describe()
        finally:
            service.model_thread.shutdown()
            service.workers.shutdown()
            if service.index is not None:
                service.index.close()

    before, again = described(), described()
    assert before == again and before["ood"] is None
    assert before["knowledge"]["entries"] > 0 and len(before["knowledge"]["sha256"]) == 64
    assert described(index=None)["knowledge"] is None  # no index, no draft
    result, output = invoke("ood", "fit", "--model", served, "--data", phantom_dir, "-q")
    assert result.exit_code == 0, output
    guarded = described()
    assert guarded != before and guarded["fingerprint"] == before["fingerprint"]
    assert guarded["ood"]["sha256"] == file_sha256(served / "ood.safetensors")
    assert guarded["ood"]["quantile"] == 0.99 and guarded["ood"]["threshold"] > 0
    assert described() == guarded  # a plain restart: the same description
    user = described(knowledge=tmp_path / "knowledge")
    (tmp_path / "knowledge" / "air_leak.md").write_text(USER_FINDING.replace("[pneumothorax]", "[air leak]"))
    edited = described(knowledge=tmp_path / "knowledge")
    assert len({before["knowledge"]["sha256"], user["knowledge"]["sha256"], edited["knowledge"]["sha256"]}) == 3
    assert str(tmp_path) not in json.dumps([guarded, edited])


def test_tokens_come_hashed_from_a_file_or_the_environment(model_dir, tmp_path, monkeypatch):
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(f"# service tokens\n{token_digest(TOKENS[0])}\n\n{token_digest(TOKENS[1])}  # ci\n")
    assert digests_from_file(token_file) == [token_digest(TOKENS[0]), token_digest(TOKENS[1])]
    token_file.write_text(TOKENS[0] + "\n")
    with pytest.raises(DataError, match="line 1: expected a SHA-256 hex digest"):
        digests_from_file(token_file)
    monkeypatch.delenv("MEDVL_API_TOKENS", raising=False)
    with pytest.raises(InputError, match="no API tokens"):
        create_app(model_dir)
    (tmp_path / "empty.txt").write_text("# no digest yet\n")
    with pytest.raises(InputError, match="empty.txt: no API token digest in the token file"):
        create_app(model_dir, token_file=tmp_path / "empty.txt")
    monkeypatch.setenv("MEDVL_API_TOKENS", "short")
    with pytest.raises(InputError, match="fewer than 16 characters"):
        create_app(model_dir)



def test_a_non_ascii_token_is_refused_at_start_and_a_token_file_digest_matches_the_bytes_a_client_sends(
        model_dir, tmp_path, monkeypatch):
    """Starlette reads a header's bytes as Latin-1 and the token was hashed as the UTF-8 of that string: a non-ASCII
    token in MEDVL_API_TOKENS was accepted at start but never matched a client sending it in UTF-8 (curl), nor did
    a token file's `printf %s TOKEN | sha256sum`. The first is refused at start; the second matches the bytes sent."""
    token = "tökenÄ1234567890abcdef"
    monkeypatch.setenv("MEDVL_API_TOKENS", f"{TOKENS[0]},{token}")
    with pytest.raises(InputError, match="MEDVL_API_TOKENS: token 2 holds a character that is not ASCII"):
        create_app(model_dir)
    monkeypatch.delenv("MEDVL_API_TOKENS")
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(subprocess.run(["sha256sum"], input=token.encode(), capture_output=True,
                                         check=True).stdout.decode().split()[0] + "\n")
    with Server(create_app(model_dir, token_file=token_file)) as running, httpx.Client(base_url=running.url) as http:
        def status(sent: bytes) -> int:
            return http.get("/v1/models", headers=[(b"Authorization", b"Bearer " + sent)]).status_code

        assert status(token.encode("utf-8")) == 200
        assert status(token.encode("latin-1")) == 401


def test_a_burst_from_one_token_is_answered_429_and_other_tokens_are_not_affected(client):
    token = auth()
    statuses = [client.get("/v1/models", headers=token) for _ in range(20)]
    refused = [answer for answer in statuses if answer.status_code == 429]
    assert len(refused) >= 5 and all(answer.status_code in (200, 429) for answer in statuses)
    assert int(refused[0].headers["Retry-After"]) >= 1 and "rate limit" in refused[0].json()["detail"]
    # the reason says the wait Retry-After says (it said "retry in 0.0 s" for a wait under 0.05 s)
    assert all(f"retry in {answer.headers['Retry-After']} s" in answer.json()["detail"] for answer in refused)
    assert client.get("/v1/models", headers=auth()).status_code == 200


def test_guessing_tokens_from_one_address_is_slowed_to_429_and_valid_tokens_still_pass(model_dir):
    from fastapi.testclient import TestClient

    settings = ServeSettings(failed_auth_burst=3, failed_auth_rate=0.001, rate_limit=0)
    app = create_app(model_dir, settings=settings, token_digests=[token_digest(TOKENS[0])])
    with TestClient(app) as http:
        guesses = [http.get("/v1/models", headers={"Authorization": f"Bearer guess-{i:020d}"}) for i in range(5)]
        assert [answer.status_code for answer in guesses] == [401, 401, 401, 429, 429]
        assert "without a valid API token" in guesses[-1].json()["detail"]
        assert int(guesses[-1].headers["Retry-After"]) >= 1
        assert http.get("/v1/models", headers=auth(TOKENS[0])).status_code == 200  # a valid token is not slowed
        assert http.get("/v1/health").status_code == 200


def test_cors_is_off_by_default_and_allows_only_the_origins_given(client, model_dir):
    from fastapi.testclient import TestClient

    preflight = {"Origin": "https://page.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    assert "access-control-allow-origin" not in client.options("/v1/zero-shot", headers=preflight).headers
    app = create_app(model_dir, settings=ServeSettings(cors_origins=["https://page.example"]),
                     token_digests=[token_digest(TOKENS[0])])
    with TestClient(app) as http:
        allowed = http.options("/v1/zero-shot", headers=preflight)
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://page.example"
        other = http.options("/v1/zero-shot", headers={**preflight, "Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers
        answer = http.get("/v1/models", headers={**auth(TOKENS[0]), "Origin": "https://page.example"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://page.example"
        assert http.get("/v1/models", headers={"Origin": "https://page.example"}).status_code == 401


def test_with_cors_the_refusals_before_the_body_carry_the_origin_and_a_page_may_read_the_answers_headers(
        model_dir, png):
    """The CORS layer sat inside the service middleware: its 401, 413 and 429 had no Access-Control-Allow-Origin
    (a page on the allowed origin saw a network error, not the reason), and no answer exposed a header beyond the
    browser's few: the preview's X-Preview-*, X-Request-ID and Retry-After were unreadable to the page."""
    from fastapi.testclient import TestClient

    origin = {"Origin": "https://page.example"}
    app = create_app(model_dir, settings=ServeSettings(cors_origins=[origin["Origin"]], rate_limit=1.0, rate_burst=1,
                                                       max_upload_bytes=UPLOAD_LIMIT),
                     token_digests=[token_digest(token) for token in TOKENS])
    limited = auth()
    readable = {"x-request-id", "retry-after", "x-preview-window", "x-preview-slice", "x-preview-presets"}
    with TestClient(app) as http:
        answers = {"preview": http.post("/v1/preview", headers={**origin, **auth()},
                                        files={"image": ("a.png", png.read_bytes())}),
                   "no token": http.get("/v1/models", headers=origin),
                   "too large": http.post("/v1/embed", headers={**origin, **auth()}, content=b"x" * (2 * UPLOAD_LIMIT)),
                   "first": http.get("/v1/models", headers={**origin, **limited}),
                   "rate limited": http.get("/v1/models", headers={**origin, **limited})}
        statuses = {name: answer.status_code for name, answer in answers.items()}
        assert statuses == {"preview": 200, "no token": 401, "too large": 413, "first": 200, "rate limited": 429}
        for name, answer in answers.items():
            assert answer.headers.get("access-control-allow-origin") == origin["Origin"], name
            exposed = answer.headers.get("access-control-expose-headers", "").lower().split(",")
            assert {header.strip() for header in exposed} == readable, name
        assert answers["preview"].headers["X-Preview-Window"] and answers["rate limited"].headers["Retry-After"]
        preflight = http.options("/v1/preview", headers={**origin, "Access-Control-Request-Method": "POST",
                                                          "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin["Origin"]
        elsewhere = http.get("/v1/models", headers={"Origin": "https://elsewhere.example"})
        assert elsewhere.status_code == 401 and "access-control-allow-origin" not in elsewhere.headers


# ----------------------------------------------------------------------------------- uploads


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A small real PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    data = bytearray(_png_bytes(np.zeros((8, 8), np.uint8)))
    ihdr = data[12:29]  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_uploads_over_the_byte_or_pixel_limit_are_413(client):
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    large = _png_bytes(noise)
    assert len(large) > UPLOAD_LIMIT
    answer = zero_shot(client, large)
    assert answer.status_code == 413 and "too large" in answer.json()["detail"]

    def chunks():  # no Content-Length: the body is counted as it streams in
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(40):
            yield large[:16384]

    streamed = client.post("/v1/embed", headers={**auth(), "Content-Type": "multipart/form-data; boundary=b"},
                           content=chunks())
    assert streamed.status_code == 413
    over = zero_shot(client, _png_declaring(3000, 3000))
    assert over.status_code == 413 and "3000 x 3000 pixels (limit 4,000,000)" in over.json()["detail"]
    bomb = zero_shot(client, _png_declaring(60_000, 60_000))
    assert bomb.status_code == 413 and "image too large" in bomb.json()["detail"]


def test_a_request_or_a_file_over_the_upload_limit_is_refused_naming_the_same_limit(client):
    """A request over the limit and the form's allowance was refused quoting that sum (33,619,968 bytes for
    32 MiB), a file just over the limit quoting the limit itself: one setting announced as two limits."""
    header = b"\x89PNG\r\n\x1a\n"
    just_over = header + b"\0" * (UPLOAD_LIMIT + 1 - len(header))  # within the form's allowance: read, then refused
    far_over = header + b"\0" * (2 * UPLOAD_LIMIT)  # refused from its Content-Length
    answers = [zero_shot(client, data) for data in (just_over, far_over)]
    assert [answer.status_code for answer in answers] == [413, 413]
    details = [answer.json()["detail"] for answer in answers]
    assert details[0] == details[1] == f"upload too large: over {UPLOAD_LIMIT:,} bytes (0.25 MiB), the service's " \
        "limit (medvl serve --max-upload-mb)"


def test_unsupported_files_are_415_and_empty_ones_422(client):
    for data in (b"GIF89a" + b"\0" * 200, b"just some text, not an image\n" * 10, b"\x1f\x8b" + b"\0" * 100):
        answer = zero_shot(client, data, "scan.png")
        assert answer.status_code == 415 and "PNG, JPEG, DICOM" in answer.json()["detail"]
    assert zero_shot(client, b"").status_code == 422


def test_an_animated_png_is_422_on_every_route_as_a_multi_frame_dicom_is(client, png, tmp_path):
    """An APNG was answered 200 from its default image (no warning in the answer) while the page showed its
    animation, another picture; an animated GIF or a multi-page TIFF is refused (415). It is a 422 naming it."""
    data = animated_png(tmp_path / "animated.png").read_bytes()
    answers = [client.post(f"/v1/{route}", headers=auth(), files={"image": ("image.png", data)})
               for route in ("embed", "preview", "search", "report/draft")]
    answers += [zero_shot(client, data), explain(client, data, labels=LABELS), vqa(client, [png.read_bytes(), data])]
    for answer in answers:
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"].endswith("an animated PNG of 2 frames: send one image (a PNG without animation)")


def test_png_and_jpeg_uploads_are_decoded_from_memory_as_the_file_reader_reads_them(tmp_path, monkeypatch):
    from medvl.data.images import read_image
    from medvl.serve import uploads

    def no_disk():
        raise AssertionError("a PNG or JPEG upload was about to be written to disk")

    monkeypatch.setattr(uploads, "private_folder", no_disk)
    rng = np.random.default_rng(0)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    sixteen = io.BytesIO()
    Image.fromarray(rng.integers(0, 65535, (20, 24), dtype=np.uint16)).save(sixteen, format="PNG")
    for data, suffix in ((_png_bytes(rng.integers(0, 256, (48, 64), dtype=np.uint8)), ".png"),
                         (sixteen.getvalue(), ".png"), (jpeg.getvalue(), ".jpg")):
        upload = uploads.decode_upload(data, ServeSettings())
        path = tmp_path / f"upload{suffix}"
        path.write_bytes(data)
        expected = read_image(path)
        assert upload.pixels.dtype == expected.dtype and np.array_equal(upload.pixels, expected)
    whole = _png_bytes(rng.integers(0, 256, (64, 64), dtype=np.uint8))
    with pytest.raises(UploadRejected) as truncated:
        uploads.decode_upload(whole[: len(whole) // 2], ServeSettings())
    assert truncated.value.status == 422 and "truncated" in str(truncated.value)
    with pytest.raises(AssertionError, match="written to disk"):  # the guard above does see a DICOM's file
        from pydicom.data import get_testdata_file

        uploads.decode_upload(Path(get_testdata_file("CT_small.dcm")).read_bytes(), ServeSettings())


def test_a_corrupt_dicom_is_422_with_the_reason(client):
    from pydicom.data import get_testdata_file

    whole = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    answer = zero_shot(client, whole[: len(whole) // 2], "ct.dcm")
    detail = answer.json()["detail"]
    assert answer.status_code == 422 and "truncated" in detail
    assert "medvl-upload" not in detail and "/" not in detail.split("(")[0]  # no temporary path
    assert zero_shot(client, whole[:140], "ct.dcm").status_code == 422


def test_a_jpeg_dicom_no_decoder_can_read_is_422_and_the_service_lives_on(client, tmp_path):
    """pydicom tried python-gdcm first for JPEG, and on this corrupt stream GDCM threw a C++ exception nothing
    caught: one upload aborted the server process (SIGABRT) and every client lost it. It is a 422 with the
    reason, and the service answers the next requests."""
    from pydicom.data import get_testdata_file

    broken = jpeg_dicom_with_inserted_bytes(tmp_path / "broken.dcm", b"\0\0", 108).read_bytes()
    answers = [zero_shot(client, broken, "scan.dcm"),
               client.post("/v1/embed", headers=auth(), files={"image": ("scan.dcm", broken)})]
    for answer in answers:
        assert answer.status_code == 422, answer.text
        detail = answer.json()["detail"]
        assert "could not decode the JPEG Baseline (Process 1) pixel data" in detail
        assert "medvl-upload" not in detail and "/" not in detail.split("(")[0]  # no temporary path
    assert client.get("/v1/health").json()["status"] == "ok"
    assert zero_shot(client, Path(get_testdata_file("SC_rgb_jpeg.dcm")).read_bytes(), "scan.dcm").status_code == 200


def test_a_dicom_data_set_without_preamble_is_answered_as_medvl_predict_reads_it(client, tmp_path):
    """A DICOM data set stored without the 128-byte preamble, DICM and file meta (Orthanc keeps one as it came;
    medvl predict, deid and pacs pull read it) was answered 415 "send ... DICOM". It is read as a DICOM upload
    now, found by parsing its header; bytes that merely start like one are still 415."""
    import pydicom
    from pydicom.data import get_testdata_file

    from medvl.clinical.dicom import read_dicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, implicit_vr=True, little_endian=True)
    data = bare.read_bytes()
    assert data[128:132] != b"DICM" and data[:2] == b"\x08\x00"
    read_dicom(bare)  # what medvl predict reads
    answer = zero_shot(client, data, "bare.dcm")
    assert answer.status_code == 200, answer.text
    assert set(answer.json()["probabilities"]) == set(LABELS.split(","))
    for lookalike in (b"\x08\x00\x05\x00" + b"not a data set " * 20, data[:6] + b"\xff" * 300):
        refused = zero_shot(client, lookalike, "x.dcm")
        assert refused.status_code == 415 and "a data set without the preamble" in refused.json()["detail"]


def test_a_dicom_with_an_unknown_transfer_syntax_is_422_not_500(client):
    """De-identification on arrival crashed on a private transfer syntax (it could not encode the
    header for the final scan): /v1/zero-shot and /v1/embed answered 500. They answer 422 naming
    the syntax."""
    from pydicom.data import get_testdata_file

    whole = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    assert whole.count(b"1.2.840.10008.1.2.1\x00") == 1
    private = whole.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9.10")
    answers = [zero_shot(client, private, "ct.dcm"),
               client.post("/v1/embed", headers=auth(), files={"image": ("ct.dcm", private)})]
    for answer in answers:
        assert answer.status_code == 422, answer.text
        assert "unsupported transfer syntax 1.2.3.4.5.6.7.8.9.10" in answer.json()["detail"]


def test_a_dicom_upload_is_answered_and_its_identifiers_never_logged(client, log_lines, upload_tmp):
    from pydicom.data import get_testdata_file

    answer = zero_shot(client, Path(get_testdata_file("CT_small.dcm")).read_bytes(), "CompressedSamples.dcm")
    assert answer.status_code == 200, answer.text
    assert set(answer.json()["probabilities"]) == set(LABELS.split(","))
    request = _request_line(log_lines, answer)
    assert request["route"] == "/v1/zero-shot"
    logged = "\n".join(log_lines())
    for identifier in ("CompressedSamples", "CT1", "1CT1"):
        assert identifier not in logged
    assert request["upload_kind"] == "dicom" and request["status"] == 200 and request["request_id"]
    assert tempfile.gettempdir() == str(upload_tmp) and not list(upload_tmp.iterdir())  # nothing kept


def ct_upload(**values) -> bytes:
    """pydicom's CT_small.dcm with ``values`` set (by keyword), as the bytes of an upload."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    stream = io.BytesIO()
    ds.save_as(stream)
    return stream.getvalue()


def test_a_dicom_whose_surname_spells_a_code_is_answered_and_a_surviving_name_refused_in_http_words(client):
    """The CT of a patient called Hu (Rescale Type HU, Hounsfield units) was refused with 422 on every upload
    route, "the patient's name survived de-identification in RescaleType; nothing was written" (the words of
    `medvl deid`), while `medvl predict` read it. It is answered; a name that does survive in a code string is
    refused with 422 in the words of a request."""
    hu = ct_upload(PatientName="HU^JUN", RescaleType="HU")
    assert zero_shot(client, hu, "ct.dcm").status_code == 200
    assert client.post("/v1/preview", headers=auth(), files={"image": ("ct.dcm", hu)}).status_code == 200
    typed = ct_upload(PatientName="HU^JUN", ImageType=["ORIGINAL", "PRIMARY", "HU JUN"])
    refused = zero_shot(client, typed, "ct.dcm")
    assert refused.status_code == 422
    assert refused.json()["detail"] == ("this DICOM upload was refused: after de-identification the patient's name "
                                        "still appears in ImageType")


def test_a_dicom_with_a_malformed_date_or_frame_count_is_answered_or_refused_never_a_500(client):
    """A malformed study date made de-identification raise (500 on every route); a Number of Frames that is not
    a number made the size check raise (500). The first is answered (the date emptied), the second is a 422."""
    dated = zero_shot(client, ct_upload(StudyDate="20199999", StudyTime="ZZ"))
    assert dated.status_code == 200, dated.text
    counted = ct_upload(NumberOfFrames="9")  # then written over as 'AB' (pydicom refuses to write it)
    element = b"\x28\x00\x08\x00IS\x02\x009 "
    assert counted.count(element) == 1
    frames = zero_shot(client, counted.replace(element, element[:-2] + b"AB"))
    assert frames.status_code == 422 and "Number of Frames is not a whole number" in frames.json()["detail"]


def test_a_dicom_with_an_unknown_value_representation_is_422_on_every_route(client, png):
    """Two bytes of a DICOM upload changed into a VR DICOM does not have ('ES'): pydicom raised NotImplementedError
    when the element was first read (de-identification, the size check), and every upload route answered 500."""
    from pydicom.data import get_testdata_file

    whole = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    for element, tag in ((b"\x28\x00\x00\x01US", "(0028,0100)"), (b"\x02\x00\x12\x00UI", "(0002,0012)")):
        assert whole.count(element) == 1
        bad = whole.replace(element, element[:4] + b"ES")
        answers = [client.post(f"/v1/{route}", headers=auth(), files={"image": ("mr.dcm", bad)})
                   for route in ("embed", "preview", "search", "report/draft", "explain")]
        answers += [zero_shot(client, bad, "mr.dcm"), vqa(client, [png.read_bytes(), bad])]
        for answer in answers:
            assert answer.status_code == 422, answer.text
            assert f"unknown value representation in {tag}" in answer.json()["detail"]


@pytest.mark.parametrize("raw, photometric, reason", [
    (b"abc ", None, "Rescale Slope 'abc' is not a number"),
    (b"1e309 ", None, "Rescale Slope '1e309' is not a finite number"),
    (None, "PALETTE COLOR", "PALETTE COLOR without its palette lookup tables"),
], ids=["slope-abc", "slope-inf", "palette"])
def test_a_dicom_with_a_broken_rescale_or_palette_is_422_on_every_route(client, raw, photometric, reason):
    """A Rescale Slope that is not a number and PALETTE COLOR without its lookup tables answered 500 on
    /v1/zero-shot, /v1/explain, /v1/embed and /v1/preview; an infinite slope in a file with a window was answered
    200 as a blank image. Each is a 422 naming the element."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # it has a Window Center / Width
    if raw is not None:
        ds._dict[Tag(0x00281053)] = RawDataElement(Tag(0x00281053), "DS", len(raw), raw, 0, False, True)
    if photometric is not None:
        ds.PhotometricInterpretation = photometric
    stream = io.BytesIO()
    ds.save_as(stream)
    bad = stream.getvalue()
    answers = [client.post(f"/v1/{route}", headers=auth(), files={"image": ("mr.dcm", bad)})
               for route in ("embed", "preview")]
    answers += [client.post("/v1/explain", headers=auth(), files={"image": ("mr.dcm", bad)},
                            data={"labels": LABELS}), zero_shot(client, bad, "mr.dcm")]
    for answer in answers:
        assert answer.status_code == 422, answer.text
        assert reason in answer.json()["detail"]


def _request_line(log_lines, answer) -> dict:
    """The request line logged for ``answer``, found by its request id.

    The line is written just after the answer is sent, so it may not be there yet when the client
    has the answer; earlier requests' lines for the same route are not this one.
    """
    request_id = answer.headers["X-Request-ID"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in log_lines() if f'"request_id": "{request_id}"' in line]
        if lines:
            return lines[-1]
        time.sleep(0.02)
    raise AssertionError(f"no log line for request {request_id}")


def test_a_nifti_volume_is_recognised_and_a_2d_model_says_why_it_cannot_use_it(client, tmp_path):
    from medvl.clinical.nifti import write_nifti

    volume = np.random.default_rng(1).normal(size=(6, 16, 16)).astype(np.float32)
    for suffix, kind in ((".nii", NIFTI), (".nii.gz", NIFTI_GZ)):
        path = write_nifti(tmp_path / f"v{suffix}", volume, (2.0, 1.0, 1.0))
        assert sniff(path.read_bytes()) == kind
        answer = zero_shot(client, path.read_bytes(), f"v{suffix}")
        assert answer.status_code == 422 and "a NIfTI volume of 6 slices" in answer.json()["detail"], answer.text
    # 3 voxels wide: its last axis in RAS (D, H, W) is 3, which was read as a colour image of 16 x 16
    narrow = write_nifti(tmp_path / "narrow.nii.gz", volume[..., :3], (2.0, 1.0, 1.0)).read_bytes()
    answer = zero_shot(client, narrow, "narrow.nii.gz")
    assert answer.status_code == 422 and "a NIfTI volume of 6 slices" in answer.json()["detail"], answer.text
    one_slice = write_nifti(tmp_path / "one.nii.gz", volume[:1], (2.0, 1.0, 1.0)).read_bytes()
    assert zero_shot(client, one_slice, "one.nii.gz").status_code == 200


def test_a_grey_multiframe_dicom_3_columns_wide_is_refused_by_a_2d_model_as_frames_and_previewed_as_frames(
        client, model_dir, tmp_path):
    """64 frames of 64 rows x 3 columns (Samples per Pixel 1) were embedded and classified as one 64 x 64 colour
    image (200, exit 0) while the preview showed frame 32 of 64: refused (422, exit 2) as a 3-frame file is."""
    from hostile_files import grey_multiframe_dicom

    path = grey_multiframe_dicom(tmp_path / "mf.dcm", 64, 64, 3)
    token = auth()
    for route, fields in (("/v1/embed", {}), ("/v1/zero-shot", {"labels": LABELS})):
        answer = client.post(route, headers=token, files={"image": ("mf.dcm", path.read_bytes())}, data=fields)
        assert answer.status_code == 422, answer.text
        assert "a multi-frame DICOM of 64 frames (shape (64, 64, 3)): a 2D model reads one image" in \
            answer.json()["detail"]
    preview = client.post("/v1/preview", headers=token, files={"image": ("mf.dcm", path.read_bytes())})
    assert preview.status_code == 200 and preview.headers["X-Preview-Slice"] == "32/64"
    result, output = invoke("predict", path, "--model", model_dir, "--labels", LABELS)
    assert result.exit_code == 2 and "mf.dcm: a multi-frame DICOM of 64 frames" in " ".join(output.split()), output


def test_a_nifti_volume_over_the_readers_limit_is_413_as_over_the_services(client):
    """A header declaring 650^3 uint8 voxels (1.1 GB as float32): refused from the header, too large (413), with
    the decoded size it was checked by (the message quoted its stored 275 MB, under the limit)."""
    import gzip

    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape((650, 650, 650))
    header.set_data_dtype(np.uint8)
    upload = gzip.compress(header.binaryblock + b"\x00" * 4 + b"\x00" * 4096)
    answer = zero_shot(client, upload, "v.nii.gz")
    assert answer.status_code == 413, answer.text
    assert "1,098,500,000 bytes once decoded" in answer.json()["detail"]


def test_a_one_slice_nifti_over_max_pixels_is_413_as_a_png_of_that_size(client):
    """--max-pixels bounds a NIfTI file's largest plane, as it bounds a PNG's or a DICOM's Rows x Columns: a one-slice
    NIfTI of 2500 x 2500 (over this service's 4 M) was decoded and answered (an 8000 x 8000 one took 32 s to preview),
    checked only against the voxel limit."""
    import gzip

    import nibabel

    image = nibabel.Nifti1Image(np.zeros((2500, 2500, 1), np.uint8), np.eye(4))
    upload = gzip.compress(image.to_bytes(), compresslevel=1)
    for answer in (zero_shot(client, upload, "wide.nii.gz"), preview(client, upload)):
        assert answer.status_code == 413, answer.text
        assert answer.json()["detail"] == "image too large: 2500 x 2500 pixels (limit 4,000,000)"


def test_sniffing_trusts_the_bytes_not_the_name(png):
    from pydicom.data import get_testdata_file

    assert sniff(png.read_bytes()) == PNG
    assert sniff(b"\xff\xd8\xff\xe0" + b"\0" * 20) == JPEG
    assert sniff(Path(get_testdata_file("CT_small.dcm")).read_bytes()) == DICOM
    with pytest.raises(UploadRejected) as refused:
        sniff(b"<html>" + b"\0" * 200)
    assert refused.value.status == 415


def test_file_names_are_never_used_as_paths_nor_logged(client, png, tmp_path, log_lines):
    names = [f"../../../../../../{tmp_path}/escape.png", f"{tmp_path}/absolute.png", "..\\..\\windows.png",
             "name-with-patient-Doe^Jane.png"]
    for name in names:
        answer = zero_shot(client, png.read_bytes(), name)
        assert answer.status_code == 200, answer.text
        assert name not in answer.text and "escape" not in answer.text
    assert not list(tmp_path.iterdir())
    _request_line(log_lines, answer)
    logged = "\n".join(log_lines())
    assert "escape" not in logged and "Doe^Jane" not in logged and "windows" not in logged


# ----------------------------------------------------------------------------------- answers


@contextlib.contextmanager
def json_logging():
    """The service's JSON logging on the root logger for the block, the test runner's handlers back after it."""
    from medvl.serve.logs import setup_json_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_json_logging()
        yield root
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@contextlib.contextmanager
def json_logged_server(model_dir):
    """A real server of ``model_dir`` (no rate limit) logging JSON lines, and an httpx client of it."""
    with json_logging():
        app = create_app(model_dir, token_digests=[token_digest(TOKENS[0])], settings=ServeSettings(rate_limit=0))
        with Server(app) as running, httpx.Client(base_url=running.url, timeout=30) as http:
            yield http


def test_the_service_logs_are_json_lines_only():
    """nibabel's own stderr handler wrote its messages as plain text among the service's JSON lines."""
    with json_logging() as root:
        assert logging.getLogger("nibabel.global").handlers == []
        assert isinstance(root.handlers[0].formatter, JsonFormatter)



def test_library_messages_about_an_upload_are_counted_in_its_request_line_not_written(model_dir, tmp_path, capsys):
    """nibabel logged 'vox offset ... too low' at ERROR, and python_multipart 'Expected boundary character 45, got
    120', about a client's upload: lines that alerting takes for server faults, with no request id, quoting the
    upload's header values and body bytes. They are counted in the request's line instead."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((32, 32, 1), np.float32), np.eye(4)), tmp_path / "v.nii")
    nifti = bytearray((tmp_path / "v.nii").read_bytes())
    struct.pack_into("<f", nifti, 108, -1e30)  # vox_offset
    with json_logged_server(model_dir) as http:
        refused = http.post("/v1/embed", headers=auth(TOKENS[0]), files={"image": ("v.nii", bytes(nifti))})
        broken = http.post("/v1/embed", content=b"--x\r\nzzz",
                           headers={**auth(TOKENS[0]), "Content-Type": "multipart/form-data; boundary=B"})
    assert refused.status_code == 422 and broken.status_code == 400
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert not [line for line in lines if line["logger"].split(".")[0] in ("nibabel", "python_multipart")]
    requests = {line["request_id"]: line for line in lines if line["message"] == "request"}
    for answer in (refused, broken):
        assert requests[answer.headers["X-Request-ID"]]["library_messages"] >= 1


def test_a_line_logged_while_an_explanation_computes_carries_its_request_id(model_dir, png, capsys):
    """The heavy lane (explanations, VQA) and the model thread (index searches, class embeddings) ran a request's work
    without its context: the warning about bare-name prompts logged while /v1/explain computed had no request id,
    the same warning from /v1/zero-shot had one."""
    with json_logged_server(model_dir) as http:
        answers = [http.post(f"/v1/{route}", headers=auth(TOKENS[0]), files={"image": ("x.png", png.read_bytes())},
                             data={"labels": "foo,bar", **fields})
                   for route, fields in (("explain", {"methods": "patch_text"}), ("zero-shot", {}))]
    assert [answer.status_code for answer in answers] == [200, 200], [answer.text for answer in answers]
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    warned = [line for line in lines if line["logger"] == "medvl.data.captions"]
    assert warned and all(line.get("request_id") in {answer.headers["X-Request-ID"] for answer in answers}
                          for line in warned), warned
    assert {line["request_id"] for line in warned} == {answer.headers["X-Request-ID"] for answer in answers}


def test_a_field_given_twice_is_refused_not_the_last_one_answered(client, png):
    """Two images on a one-image route (or two questions, two label lists) were accepted and the answer was about
    the last one, without a word; /v1/vqa still takes several images (films in order)."""
    image = png.read_bytes()
    two = [("image", ("a.png", image)), ("image", ("b.png", image))]
    twice = client.post("/v1/zero-shot", headers=auth(), files=two, data={"labels": LABELS})
    assert twice.status_code == 422 and "image given more than once" in twice.json()["detail"], twice.text
    questions = client.post("/v1/vqa", headers=auth(), files=[("image", ("a.png", image))],
                            data={"question": ["Is there a nodule?", "Is it large?"]})
    assert questions.status_code == 422 and "question given more than once" in questions.json()["detail"]
    films = client.post("/v1/vqa", headers=auth(), files=two, data={"question": QUESTION})
    assert films.status_code == 200, films.text


def test_a_field_the_route_does_not_take_is_refused_naming_it_and_the_routes_fields(client, png):
    """A field spelt the CLI's way (min-similarity), in another case (K) or guessed (filter for where) was dropped
    and the answer computed with the default, without a word; every route's own fields are still taken."""
    image, token = ("x.png", png.read_bytes()), auth()  # one token: 10 requests, within its burst
    for path, fields, unknown, takes in (
            ("/v1/report/draft", {"min-similarity": "0.999"}, "'min-similarity'",
             "image, k, where, min_support, min_similarity, related"),
            ("/v1/search", {"K": "1", "filter": "sex = 'M'"}, "'K', 'filter'", "image, text, k, where, target"),
            ("/v1/zero-shot", {"labels": LABELS, "label-column": "sex"}, "'label-column'",
             "image, labels, label_column"),
            ("/v1/explain", {"label": "nodule,no_finding"}, "'label'", "image, labels, methods, label_column, top, k"),
            ("/v1/vqa", {"question": QUESTION, "images": "x"}, "'images'", "image, question"),
            ("/v1/preview", {"windows": "lung"}, "'windows'", "image, window"),
            ("/v1/embed", {"model": "other"}, "'model'", "image")):
        answer = client.post(path, headers=token, files={"image": image}, data=fields)
        assert answer.status_code == 422, (path, answer.text)
        assert answer.json()["detail"] == f"unknown field(s) {unknown}; {path} takes {takes}", answer.text
    encoded = client.post("/v1/search", headers={**token, "Content-Type": "application/x-www-form-urlencoded"},
                          content=b"text=effusion&kk=3")
    assert encoded.status_code == 422 and "unknown field(s) 'kk'" in encoded.json()["detail"]
    draft = client.post("/v1/report/draft", headers=token, files={"image": image},
                        data={"k": "3", "where": "age > 0", "min_support": "0.5", "min_similarity": "0.999",
                              "related": "1"})
    assert draft.status_code == 200 and draft.json()["settings"]["min_similarity"] == 0.999, draft.text
    searched = client.post("/v1/search", headers=token, data={"text": "effusion", "k": "1", "target": "texts"})
    assert searched.status_code == 200 and len(searched.json()["hits"]) == 1, searched.text



def test_a_multipart_body_cut_before_its_closing_boundary_is_refused_not_answered_without_its_last_field(client,
                                                                                                       png):
    """Starlette drops the last part of a body that ends without its closing boundary: a /v1/search whose `where`
    came last was answered 200 over every case, as if the client had sent no filter."""
    def body(fields: dict[str, bytes], closed: bool) -> bytes:
        parts = [b'--B\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n' + png.read_bytes()]
        parts += [b'--B\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s' % (name.encode(), value)
                  for name, value in fields.items()]
        return b"".join(part + b"\r\n" for part in parts) + (b"--B--\r\n" if closed else b"")

    token, form = auth(), {"Content-Type": "multipart/form-data; boundary=B"}
    search = {"k": b"3", "where": b"age > 50"}
    whole = client.post("/v1/search", headers={**token, **form}, content=body(search, closed=True))
    assert whole.status_code == 200 and whole.json()["where"] == "age > 50", whole.text
    for path, fields in (("/v1/search", search), ("/v1/zero-shot", {"labels": LABELS.encode()})):
        for cut in (body(fields, closed=False), body(fields, closed=True)[:-4]):  # no '--B--', or only '--B'
            answer = client.post(path, headers={**token, **form}, content=cut)
            assert answer.status_code == 400, (path, answer.text)
            assert answer.json()["detail"] == "the multipart body ends before its closing boundary (truncated)"


def test_a_multipart_boundary_over_the_parsers_limit_is_refused_400_not_answered_500(client, png):
    """A boundary of 257 characters (python-multipart takes at most 256; RFC 2046 allows 70) raised FormParserError
    where the middleware set up its UTF-8 check of the form's text fields: HTTP 500 on every route, for a one-byte
    body from any client with a token. The longest boundary the parser takes is still answered."""
    token = auth()
    for path in ("/v1/embed", "/v1/search"):
        refused = client.post(path, headers={**token, "Content-Type": f"multipart/form-data; boundary={'a' * 257}"},
                              content=b"x")
        assert refused.status_code == 400, (path, refused.text)
        assert refused.json()["detail"].startswith("invalid multipart boundary"), refused.text
    boundary = "b" * 256
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'.encode()
            + png.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    answer = client.post("/v1/embed", headers={**token, "Content-Type": f"multipart/form-data; boundary={boundary}"},
                         content=body)
    assert answer.status_code == 200 and len(answer.json()["embedding"]) == answer.json()["dim"], answer.text


def test_explain_names_the_top_limit_its_labels_allow_and_refuses_a_blank_label_column_as_the_cli(client, png):
    """With 2 labels, top=9 was told "must be <= 3" (the service's limit) and top=3 then "must be <= 2"; a blank
    label column was "unknown label column ' '" here and "empty column name" in medvl predict. An empty field is
    absent (the page sends one when it offers no column)."""
    two = explain(client, png.read_bytes(), labels="cardiomegaly,nodule", top=9)
    assert two.status_code == 422 and "top must be <= 2, got 9" in two.json()["detail"], two.text
    image = {"image": ("x.png", png.read_bytes())}
    for route, fields in (("explain", {"labels": "cardiomegaly,nodule"}), ("zero-shot", {"labels": LABELS})):
        blank = client.post(f"/v1/{route}", headers=auth(), files=image, data={**fields, "label_column": " "})
        assert blank.status_code == 422, blank.text
        assert blank.json()["detail"] == "label column: empty column name (leave it out for the default)"
        empty = client.post(f"/v1/{route}", headers=auth(), files=image, data={**fields, "label_column": ""})
        assert empty.status_code == 200, empty.text


def test_a_number_field_given_empty_is_refused_not_answered_with_its_default(client, png):
    """FastAPI reads `k=` as no k: a form that templated an empty value got the default (10 cases, a minimum
    similarity of 0.5) without a word, while `medvl search --k ''` exits 2. An empty text field is still absent."""
    image = {"image": ("a.png", png.read_bytes())}
    for route, name in (("search", "k"), ("report/draft", "k"), ("report/draft", "min_similarity"),
                        ("report/draft", "min_support"), ("report/draft", "related"), ("explain", "top"),
                        ("explain", "k")):
        answer = client.post(f"/v1/{route}", headers=auth(), files=image, data={name: ""})
        assert answer.status_code == 422, (route, name, answer.text)
        assert answer.json()["detail"] == (f"field(s) {name} given empty; give a number, or leave the field out for "
                                           "its default")
    searched = client.post("/v1/search", headers=auth(), files=image, data={"k": "3", "where": ""})
    assert searched.status_code == 200 and len(searched.json()["hits"]) == 3, searched.text


def test_every_answer_has_its_own_request_id(client):
    ids = [client.get("/v1/health").headers["X-Request-ID"] for _ in range(5)]
    assert len(set(ids)) == 5 and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)



def _get(connection: socket.socket, path: str, token: str) -> tuple[int, dict[str, str], bytes]:
    """A GET on an open keep-alive connection: (status, headers, body); (0, {}, b"") when the connection is gone."""
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    received = b""
    try:
        while b"\r\n\r\n" not in received:
            chunk = connection.recv(65536)
            if not chunk:
                return 0, {}, b""
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += connection.recv(65536)
    except ConnectionError:
        return 0, {}, b""
    return int(lines[0].split()[1]), headers, body


def test_an_unexpected_error_is_a_500_with_the_request_id_and_headers_and_the_connection_stays_open(
        model_dir, log_lines):
    """An exception no handler knows was answered by Starlette outside the service middleware: the 500 had no
    X-Request-ID (its body says the id names it in the log), no Cache-Control: no-store and no nosniff, and the
    connection was closed under a keep-alive client. The 500 now carries them and the connection serves the next
    request; the log has the error's type only."""
    app = create_app(model_dir, token_digests=[token_digest(TOKENS[0])], settings=ServeSettings(rate_limit=0))

    @app.get("/v1/fails")
    async def fails() -> dict:  # a route with a bug in it
        raise RuntimeError("a message quoting a value")

    with Server(app) as running, socket.create_connection(("127.0.0.1", int(running.url.rsplit(":", 1)[1]))) as open_:
        open_.settimeout(20)
        status, headers, body = _get(open_, "/v1/fails", TOKENS[0])
        assert status == 500
        assert _get(open_, "/v1/models", TOKENS[0])[0] == 200  # the same connection
        assert len(headers.get("x-request-id", "")) == 16 and headers.get("cache-control") == "no-store"
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
        assert "X-Request-ID" in json.loads(body)["detail"]
    lines = [json.loads(line) for line in log_lines() if headers["x-request-id"] in line]
    assert {(line["message"], line["status"] if "status" in line else None, line["error"]) for line in lines} == {
        ("unexpected error", None, "RuntimeError"), ("request", 500, "RuntimeError")}
    assert "quoting a value" not in "\n".join(log_lines())


def test_answers_carry_security_headers_and_the_page_cannot_be_framed(client, png):
    """Answers holding patient data are never cached; no answer may be sniffed or framed; the page's CSP is sent
    as a header too (a <meta> tag cannot forbid framing) and says what the tag says."""
    import re

    from medvl.serve.app import PAGE_CSP

    answers = {"zero-shot": zero_shot(client, png.read_bytes()),
               "refused": zero_shot(client, b"x", headers={"Authorization": "Bearer wrong-token"}),
               "page": client.get("/"), "health": client.get("/v1/health")}
    for name, answer in answers.items():
        assert answer.headers["X-Content-Type-Options"] == "nosniff", name
        assert answer.headers["X-Frame-Options"] == "DENY" and answer.headers["Referrer-Policy"] == "no-referrer"
    assert answers["zero-shot"].status_code == 200 and answers["refused"].status_code == 401
    assert answers["zero-shot"].headers["Cache-Control"] == "no-store" == answers["refused"].headers["Cache-Control"]
    page = answers["page"]
    assert page.headers["Content-Security-Policy"] == PAGE_CSP and "frame-ancestors 'none'" in PAGE_CSP
    meta = re.search(r'http-equiv="Content-Security-Policy"\s+content="([^"]+)"', page.text).group(1)
    assert PAGE_CSP == meta + "; frame-ancestors 'none'"


def test_zero_shot_and_embed_answer_as_the_library_does(client, model_dir, png):
    answer = zero_shot(client, png.read_bytes())
    assert answer.status_code == 200 and answer.headers["X-Request-ID"]
    expected = predict(model_dir, [png], LABELS.split(","))[0]
    assert answer.json()["prediction"] == expected["prediction"]
    for name, probability in expected["probabilities"].items():
        assert answer.json()["probabilities"][name] == pytest.approx(probability, abs=1e-5)
    assert answer.json()["input_flags"] == expected["input_flags"] == {}
    flagged = zero_shot(client, _png_bytes(np.full((48, 48), 128, np.uint8)))  # answered, and said to hold no content
    assert flagged.status_code == 200 and list(flagged.json()["input_flags"]) == ["blank"]
    embedded = client.post("/v1/embed", headers=auth(), files={"image": ("x.png", png.read_bytes())}).json()
    reference = load_model(model_dir).encode_images([png])[0].numpy()
    assert embedded["dim"] == reference.shape[0]
    np.testing.assert_allclose(embedded["embedding"], reference, atol=1e-5)


def test_zero_shot_refuses_a_label_column_the_captions_do_not_describe(client, png):
    answer = client.post("/v1/zero-shot", headers=auth(), files={"image": ("x.png", png.read_bytes())},
                         data={"labels": LABELS, "label_column": "findings"})
    assert answer.status_code == 422 and "unknown label column 'findings'" in answer.json()["detail"]
    named = client.post("/v1/zero-shot", headers=auth(), files={"image": ("x.png", png.read_bytes())},
                        data={"labels": LABELS, "label_column": "finding"})
    assert named.status_code == 200 and named.json()["label_column"] == "finding"


def test_a_form_field_that_is_not_utf8_is_refused_naming_the_field(client, png):
    """Starlette reads such a field as Latin-1 without a word: b"\\xff\\xfe" would become the label "ÿþ"."""
    image = ("x.png", png.read_bytes())
    latin1 = client.post("/v1/zero-shot", headers=auth(),
                         files={"image": image, "labels": (None, b"\xe9panchement,normal")})
    assert latin1.status_code == 422 and latin1.json()["detail"] == "form field 'labels' is not UTF-8 text"
    question = client.post("/v1/vqa", headers=auth(), files={"images": image, "question": (None, b"is it \xff?")})
    assert question.status_code == 422 and "'question' is not UTF-8" in question.json()["detail"]
    encoded = client.post("/v1/search", headers={**auth(), "Content-Type": "application/x-www-form-urlencoded"},
                          content=b"text=%FF%FEeffusion&k=3")
    assert encoded.status_code == 422 and "'text' is not UTF-8" in encoded.json()["detail"]
    utf8 = client.post("/v1/zero-shot", headers=auth(),
                       files={"image": image, "labels": (None, "épanchement,normal".encode())})
    assert utf8.status_code == 200 and list(utf8.json()["probabilities"]) == ["épanchement", "normal"]
    # an upload's own bytes are no text field: a PNG is full of invalid UTF-8 and is answered
    assert zero_shot(client, png.read_bytes()).status_code == 200


def test_form_text_is_read_as_the_utf8_the_check_passed_or_its_other_charset_refused(client):
    """Starlette reads the unescaped bytes of an urlencoded body as Latin-1 (``curl -d text=é`` sends them so), and a
    multipart body's text with the charset its Content-Type declares: UTF-8 checked, then "Ã©panchement" searched
    (200), or the field ``text`` read as UTF-16 ("整瑸"). The text is now the UTF-8 the client sent, escaped or not;
    a form declaring another charset is refused (415) naming it."""
    text, token = "épanchement pleural", auth()
    urlencoded = {**token, "Content-Type": "application/x-www-form-urlencoded"}
    raw = client.post("/v1/search", headers=urlencoded, content=f"text={text}&k=1".encode())
    assert raw.status_code == 200 and raw.json()["query"] == {"text": text}, raw.text
    escaped = client.post("/v1/search", headers=token, data={"text": text, "k": "1"})  # as a browser sends it
    assert escaped.status_code == 200 and escaped.json()["query"] == {"text": text}, escaped.text
    body = (b'--XyZ\r\nContent-Disposition: form-data; name="text"\r\n\r\n' + text.encode()
            + b'\r\n--XyZ\r\nContent-Disposition: form-data; name="k"\r\n\r\n1\r\n--XyZ--\r\n')
    for charset in ("utf-8", "UTF8"):
        utf8 = client.post("/v1/search", headers={**token, "Content-Type": f"multipart/form-data; boundary=XyZ; "
                                                                           f"charset={charset}"}, content=body)
        assert utf8.status_code == 200 and utf8.json()["query"] == {"text": text}, utf8.text
    for content_type in ("multipart/form-data; boundary=XyZ; charset=latin-1",
                         "multipart/form-data; boundary=XyZ; charset=utf-16", "multipart/form-data; boundary=XyZ; "
                         "charset=klingon", "application/x-www-form-urlencoded; charset=iso-8859-1"):
        refused = client.post("/v1/search", headers={**token, "Content-Type": content_type}, content=body)
        charset = content_type.rpartition("=")[2]
        assert refused.status_code == 415, (content_type, refused.text)
        assert refused.json()["detail"] == f"form text must be UTF-8: the Content-Type declares charset {charset!r}"


def test_a_body_that_is_not_a_form_is_415_naming_the_form_types(client):
    """Every POST route takes a form; a JSON body was read as an empty form and answered 422 "give exactly one
    query: an image or a text", saying nothing of its kind. It is refused (415) before its body is read, naming the
    two form types; a request without a token still gets its 401 first."""
    expected = "the body must be a form (Content-Type multipart/form-data, or application/x-www-form-urlencoded"
    for route, content_type, body in (("/v1/search", "application/json", b'{"text": "effusion", "k": 1}'),
                                      ("/v1/zero-shot", "application/json; charset=utf-8", b'{"labels": "a,b"}'),
                                      ("/v1/embed", "text/plain", b"text=effusion"),
                                      ("/v1/report/draft", "application/octet-stream", b"\x89PNG"),
                                      ("/v1/search", "", b"text=effusion")):
        answer = client.post(route, headers={**auth(), "Content-Type": content_type}, content=body)
        assert answer.status_code == 415, (route, content_type, answer.text)
        kind = repr(content_type.partition(";")[0]) if content_type else "an empty one"
        assert answer.json()["detail"].startswith(f"{expected} for a request without files), not {kind}"), answer.text
    # a body without a Content-Type (requests.post(url, data=json.dumps(...)) sends none) was the misleading 422 too
    answer = client.post("/v1/search", headers=auth(), content=b'{"text": "effusion"}')
    assert "content-type" not in answer.request.headers
    assert answer.status_code == 415 and answer.json()["detail"].endswith("not none: the routes take no JSON"), \
        answer.text
    empty = client.post("/v1/search", headers=auth())  # no body, no type: the route names what is missing
    assert empty.status_code == 422, empty.text
    unauthorised = client.post("/v1/search", headers={"Content-Type": "application/json"}, content=b"{}")
    assert unauthorised.status_code == 401, unauthorised.text
    form = client.post("/v1/search", headers={**auth(), "Content-Type": "Application/X-WWW-Form-Urlencoded"},
                       content=b"text=effusion&k=1")  # the type's case does not matter, as for Starlette
    assert form.status_code == 200, form.text
    assert client.post("/v1/search", headers=auth(), data={"text": "effusion", "k": "1"}).status_code == 200


def test_the_utf8_check_follows_a_streamed_body_chunk_by_chunk():
    """Chunks cut inside multi-byte characters are fine; a text part over the 1 MiB part limit is refused with
    413 naming it (Starlette's own refusal is a 400); a bad field in a later chunk is still found."""
    from starlette.exceptions import HTTPException

    from medvl.serve.middleware import form_text_checked

    def body(text: bytes) -> bytes:
        return (b"--BB\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n\xff\xfe\x00"
                b"\r\n--BB\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\n" + text + b"\r\n--BB--\r\n")

    def stream(data: bytes, size: int):
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        messages = iter([{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                         for i, c in enumerate(chunks)])

        async def receive():
            return next(messages)

        checked = form_text_checked(receive, "multipart/form-data; boundary=BB")

        async def drain():
            for _ in chunks:
                await checked()
        return drain

    asyncio.run(stream(body("épanchement,normal".encode()), 7)())  # no refusal
    with pytest.raises(HTTPException, match="form field 'labels' is over 1,048,576 bytes") as refused:
        asyncio.run(stream(body(("é" * 600_000).encode()), 65_537)())  # 1.2 MB: over the part limit
    assert refused.value.status_code == 413
    with pytest.raises(HTTPException, match="form field 'labels' is not UTF-8 text"):
        asyncio.run(stream(body("épanchement,normal".encode("latin-1")), 7)())


def test_an_urlencoded_text_field_over_1_mib_is_refused_with_413_naming_it_as_a_multipart_one():
    """The follower counted multipart text parts only: an urlencoded ``text`` of 2.1 MB reached Starlette's own
    limit, 400 "Field exceeded maximum size of 1024KB.", naming no field. Counted as Starlette counts it (name and
    value, percent escapes included) as the body streams in, before Starlette's parser sees the chunk."""
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    from medvl.serve.middleware import TEXT_PART_LIMIT, form_text_checked

    def form(body: bytes, size: int = 65_536):
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
        messages = iter([{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                         for i, c in enumerate(chunks)])

        async def receive():
            return next(messages)

        content_type = "application/x-www-form-urlencoded"
        scope = {"type": "http", "method": "POST", "app": None, "headers": [(b"content-type", content_type.encode())]}
        async def parsed():
            return await Request(scope, form_text_checked(receive, content_type)).form()

        return asyncio.run(parsed())

    with pytest.raises(HTTPException, match="form field 'text' is over 1,048,576 bytes: a text field") as refused:
        form(b"k=1&text=" + b"nodule+" * 300_000)  # 2.1 MB
    assert refused.value.status_code == 413
    at_limit = b"a" * (TEXT_PART_LIMIT - len("text"))
    assert form(b"k=1&text=" + at_limit + b"&where=age+%3E+1")["text"] == at_limit.decode()  # Starlette takes it
    with pytest.raises(HTTPException, match="form field 'text' is over") as refused:
        form(b"text=" + at_limit + b"b&k=1")
    assert refused.value.status_code == 413
    with pytest.raises(HTTPException, match="form field 'text' is over"):  # é sent raw is read escaped: 6 bytes
        form(b"text=" + at_limit[:-5] + "é".encode())
    assert form(b"text=" + at_limit[:-6] + "é".encode() + b"&k=1")["text"] == at_limit[:-6].decode() + "é"


def test_a_service_on_another_backend_answers_as_the_library_on_that_backend(model_dir, png, tmp_path):
    token = TOKENS[0]
    settings = ServeSettings()  # backend auto: channels-last for a medvl model folder
    assert settings.backend == "auto" and resolve_backend(model_dir, "auto") == "torch-channels-last"
    assert resolve_backend(model_dir, "onnx") == "onnx"
    app = create_app(model_dir, settings=settings, token_digests=[token_digest(token)])
    with Server(app) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        headers = {"Authorization": f"Bearer {token}"}
        assert http.get("/v1/models", headers=headers).json()["models"][0]["backend"] == "torch-channels-last"
        answer = zero_shot(http, png.read_bytes(), headers=headers).json()
        embedded = http.post("/v1/embed", headers=headers, files={"image": ("x.png", png.read_bytes())}).json()
    assert settings.backend == "auto"  # the caller's settings are untouched: they may serve a transformers folder next
    np.testing.assert_allclose(embedded["embedding"],
                               load_model(model_dir, backend="torch-channels-last").encode_images([png])[0].numpy(),
                               atol=1e-5)
    expected = predict(model_dir, [png], LABELS.split(","))[0]  # eager torch: the same answer
    for name, probability in expected["probabilities"].items():
        assert answer["probabilities"][name] == pytest.approx(probability, abs=1e-4)
    with pytest.raises(InputError, match="unknown backend 'tpu'"):
        ServeSettings(backend="tpu").validate()
    with pytest.raises(InputError, match="torch_threads"):
        ServeSettings(torch_threads=-1).validate()
    result, output = invoke("serve", "--model", model_dir, "--backend", "onnx", "--no-auth")
    assert result.exit_code == 2 and "medvl export onnx" in output  # refused before the server starts


def test_a_real_chest_x_ray_jpeg_is_answered_as_the_library_does(client, model_dir, shared_data):
    jpeg = min((shared_data / "figure1-covid-cxr" / "images").glob("*.jpg"), key=lambda path: path.stat().st_size)
    assert jpeg.stat().st_size < UPLOAD_LIMIT
    answer = zero_shot(client, jpeg.read_bytes(), jpeg.name)
    assert answer.status_code == 200, answer.text
    expected = predict(model_dir, [jpeg], LABELS.split(","))[0]
    for name, probability in expected["probabilities"].items():
        assert answer.json()["probabilities"][name] == pytest.approx(probability, abs=1e-5)


def test_search_and_report_draft_answer_as_the_cli_library_calls(client, model_dir, index_dir, png):
    from medvl.rag import draft_report

    token = auth()
    answer = client.post("/v1/search", headers=token, files={"image": ("x.png", png.read_bytes())},
                         data={"k": "5", "where": "age > 20"})
    assert answer.status_code == 200, answer.text
    with open_index(index_dir) as index:
        model = load_model(model_dir)
        hits = search_index(index, model, image=png, k=5, where="age > 20")
        draft = draft_report(index, model, png, k=6, min_similarity=0.0)
    assert [hit["id"] for hit in answer.json()["hits"]] == [hit.id for hit in hits]
    assert answer.json()["query"]["input_flags"] == {}
    by_text = client.post("/v1/search", headers=token, data={"text": "enlarged heart", "k": "3"})
    assert by_text.status_code == 200 and len(by_text.json()["hits"]) == 3
    assert "input_flags" not in by_text.json()["query"]
    # a query text longer than the text tower reads is refused, as at the CLI, without the text in the answer
    cut = client.post("/v1/search", headers=token, data={"text": "Secret effusion. " * 100, "k": "3"})
    assert cut.status_code == 422 and "tokens long" in cut.json()["detail"] and "Secret" not in cut.text
    blank = _png_bytes(np.full((50, 70), 7, np.uint8))
    flagged = client.post("/v1/search", headers=token, files={"image": ("b.png", blank)}, data={"k": "2"})
    assert flagged.status_code == 200 and list(flagged.json()["query"]["input_flags"]) == ["blank"]
    no_draft = client.post("/v1/report/draft", headers=token, files={"image": ("b.png", blank)},
                           data={"min_similarity": "0"})
    assert no_draft.status_code == 200 and no_draft.json()["abstention"] == "no_content"
    drafted = client.post("/v1/report/draft", headers=token, files={"image": ("x.png", png.read_bytes())},
                          data={"k": "6", "min_similarity": "0"})
    assert drafted.status_code == 200
    assert drafted.json()["text"] == draft.text() and drafted.json()["abstained"] == draft.abstained
    bad = client.post("/v1/search", headers=token, files={"image": ("x.png", png.read_bytes())},
                      data={"k": "0"})
    assert bad.status_code == 422 and "k must be >= 1" in bad.json()["detail"]


USER_FINDING = """---
name: air_leak
title: Air leak
synonyms: [pneumothorax]
definition: A user's finding, air outside the lung.
---
"""


def test_report_drafts_use_the_services_knowledge_base_as_the_cli_uses_its_own(client, model_dir, index_dir, png,
                                                                               tmp_path):
    """The service always drafted with the shipped knowledge base: a user's finding files (--knowledge of
    medvl report draft) could not be served, and the API's drafts differed from the CLI's."""
    from medvl.rag import ReportLabeller, draft_report, load_knowledge

    (tmp_path / "knowledge").mkdir()
    (tmp_path / "knowledge" / "air_leak.md").write_text(USER_FINDING)
    fields = {"k": "6", "min_similarity": "0"}
    shipped = client.post("/v1/report/draft", headers=auth(), files={"image": ("x.png", png.read_bytes())},
                          data=fields).json()
    token = TOKENS[0]
    app = create_app(model_dir, index=index_dir, settings=ServeSettings(knowledge=tmp_path / "knowledge"),
                     token_digests=[token_digest(token)])
    with Server(app) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        served = http.post("/v1/report/draft", headers={"Authorization": f"Bearer {token}"},
                           files={"image": ("x.png", png.read_bytes())}, data=fields).json()
    with open_index(index_dir) as index:
        expected = draft_report(index, load_model(model_dir), png, k=6, min_similarity=0.0,
                                labeller=ReportLabeller(load_knowledge(tmp_path / "knowledge"))).to_dict()
    assert "air_leak" in [f["name"] for f in served["findings"]]  # the phantom reports name pneumothorax
    assert "air_leak" not in [f["name"] for f in shipped["findings"]]
    assert {key: served[key] for key in expected} == json.loads(json.dumps(expected))
    for args, message in ((["--knowledge", tmp_path / "nope"], "--knowledge"), (["--no-builtin-knowledge"],
                                                                               "--no-builtin-knowledge")):
        result, output = invoke("serve", "--model", model_dir, "--no-auth", *args)
        assert result.exit_code == 2 and message in output, output
    (tmp_path / "knowledge" / "broken.md").write_text("---\nname: [unclosed\n---\n")
    result, output = invoke("serve", "--model", model_dir, "--no-auth", "--knowledge", tmp_path / "knowledge")
    assert result.exit_code == 2 and "broken.md" in output, output  # refused before the service listens


def test_a_knowledge_entry_longer_than_the_served_model_reads_fails_the_start_not_each_draft(model_dir, index_dir,
                                                                                             tmp_path):
    """A user's finding whose synonym the served model's text encoder cannot read whole was refused at every draft
    asking for related entries (and the service reported healthy): it is refused when the service loads, naming the
    file, entry and synonym, never the text."""
    from medvl.errors import DataError

    (tmp_path / "knowledge").mkdir()
    (tmp_path / "knowledge" / "long_entry.md").write_text(
        "---\nname: long_entry\nsynonyms: [heart, " + "effusion " * 120 + "]\n---\n")
    with pytest.raises(DataError, match=r"long_entry\.md: entry 'long_entry': synonym 2 is \d+ tokens long") as caught:
        create_app(model_dir, index=index_dir, settings=ServeSettings(knowledge=tmp_path / "knowledge"),
                   token_digests=[], require_token=False)
    assert "effusion" not in str(caught.value)


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_a_pgvector_index_rebuilt_under_the_service_is_followed_or_refused(model_dir, phantom_dir, png, tmp_path):
    """A PostgreSQL index is a live table: ``medvl index build`` swaps it under a running service. Rebuilt with
    another model, its vectors no longer match the served model's queries: search, draft and explain answer 503
    with the reason (as the CLI refuses that model), never hits scored by a foreign model. Rebuilt with the
    served model and other filter columns, the service filters on the new columns: an unknown one is a 422."""
    from fastapi.testclient import TestClient

    from cli_helpers import postgres_server, write_manifest
    from medvl.models.registry import create_model

    train = load_dataset(phantom_dir).select("train")
    torch = pytest.importorskip("torch")
    torch.manual_seed(7)
    other_dir = tmp_path / "other"
    create_model("phantom-tiny").save_pretrained(other_dir)
    few = tmp_path / "few"
    (few / "images").mkdir(parents=True)
    for record in train[:5]:
        (few / "images" / Path(record.image).name).write_bytes(Path(record.image).read_bytes())
    write_manifest(few / "manifest.csv", ["image", "kind"],
                   [[f"images/{Path(r.image).name}", "x"] for r in train[:5]])
    with postgres_server("medvl-pg-serve-") as (server, _):
        url = server.get_uri() + "#served"
        build_index(load_model(model_dir), train, url, model_dir=model_dir, show_progress=False)
        with TestClient(create_app(model_dir, index=url, require_token=False)) as http:
            def search(**fields):
                return http.post("/v1/search", data={"k": "3", **fields})

            assert search(text="pleural effusion").status_code == 200
            build_index(load_model(other_dir), train, url, model_dir=other_dir, show_progress=False)
            refusals = [search(text="pleural effusion"),
                        http.post("/v1/search", files={"image": ("x.png", png.read_bytes())}, data={"k": "3"}),
                        http.post("/v1/report/draft", files={"image": ("x.png", png.read_bytes())})]
            for answer in refusals:
                assert answer.status_code == 503, answer.text
                assert "rebuilt with another model since it was opened" in answer.json()["detail"]
            result, output = invoke("search", "--index", url, "--model", model_dir, "--text", "effusion")
            assert result.exit_code == 2 and "weights differ" in output  # the CLI's refusal of the same model
            described = http.get("/v1/models").json()["models"][0]["index"]
            assert "rebuilt with another model" in described["unavailable"] and described["cases"] is None
            build_index(load_model(model_dir), load_dataset(few), url, model_dir=model_dir, show_progress=False)
            described = http.get("/v1/models").json()["models"][0]["index"]  # read again before any search
            assert described["filter_columns"] == {"kind": "text"} and described["cases"] == 5
            assert described["unavailable"] is None
            followed = search(text="pleural effusion", k="10")
            assert followed.status_code == 200 and len(followed.json()["hits"]) == 5
            assert search(text="x", where="kind = 'x'").status_code == 200
            unknown = search(text="x", where="age > 50")
            assert unknown.status_code == 422 and "age" in unknown.json()["detail"], unknown.text


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_a_pgvector_index_dropped_under_the_service_is_a_503_with_the_reason(model_dir, phantom_dir, tmp_path):
    """A table dropped under a running service (its ``medvl_indexes`` row left) made /v1/search and even /v1/models
    answer 500 (psycopg's UndefinedTable); with the row gone too, search answered 422, a client error for the
    server's condition. Both are 503 with the reason now, and /v1/models gives it as the index's ``unavailable``."""
    import psycopg
    from fastapi.testclient import TestClient

    from cli_helpers import postgres_server

    train = load_dataset(phantom_dir).select("train")
    with postgres_server("medvl-pg-gone-") as (server, _):
        url = server.get_uri() + "#served"
        build_index(load_model(model_dir), train.subset(train[:6]), url, model_dir=model_dir, show_progress=False)
        with TestClient(create_app(model_dir, index=url, require_token=False)) as http:
            assert http.post("/v1/search", data={"text": "effusion"}).status_code == 200
            assert http.get("/v1/health").json() | {"waiting": 0} == {"status": "ok", "batching": True, "waiting": 0,
                                                                     "index": "ok"}
            service = http.app.state.service
            for statement, reason in (("DROP TABLE served", "names table 'served', which does not exist"),
                                      ("DELETE FROM medvl_indexes WHERE name = 'served'", "any more")):
                with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                    conn.execute(statement)
                answer = http.post("/v1/search", data={"text": "effusion"})
                assert answer.status_code == 503 and reason in answer.json()["detail"], answer.text
                models = http.get("/v1/models")
                assert models.status_code == 200, models.text
                assert reason in models.json()["models"][0]["index"]["unavailable"]
                service.index_health_seconds = 0
                health = http.get("/v1/health")  # no token: the word, not the reason
                assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
                assert health.json()["index"] == "unavailable" and "served" not in health.text


def test_health_answers_promptly_while_the_model_thread_is_busy_and_its_index_word_follows(model_dir, index_dir,
                                                                                           tmp_path):
    """/v1/health asked the index on the model thread and waited for it: behind a long forward pass or search (here
    the model thread held until released) a health probe waited as long. It now waits a bounded time, then answers
    with the last word; the question, still queued, runs when the thread is free, and the next probe has its word."""
    from medvl.serve.service import ModelService

    served = tmp_path / "served.idx"
    shutil.copytree(index_dir, served)
    service = ModelService(model_dir, served, ServeSettings())
    service.index_health_seconds, service.index_health_wait = 0, 0.2
    release = threading.Event()
    try:
        assert service.index_health() == "ok"
        busy = service.model_thread.submit(release.wait, 30)  # a long task ahead of every question
        shutil.rmtree(served)
        with ThreadPoolExecutor(1) as probe:
            started = time.monotonic()
            word = probe.submit(service.index_health).result(timeout=5)
            assert word == "ok" and time.monotonic() - started < 2  # the last word, at once
            assert probe.submit(service.index_health).result(timeout=5) == "ok"
        release.set()
        busy.result(timeout=5)
        service._index_check.result(timeout=5)  # the question queued meanwhile has run: its word is kept
        assert service.index_health() == "unavailable"
    finally:
        release.set()
        service.model_thread.shutdown()
        service.workers.shutdown()
        service.index.close()


def test_a_damaged_faiss_case_table_is_a_503_naming_the_column_and_health_stops_saying_ok(model_dir, index_dir, png,
                                                                                            tmp_path, caplog):
    """A report cell that is not UTF-8 made /v1/search answer 500 (sqlite3's error, whose message quotes the report)
    while /v1/health went on saying the index was ok. It is a 503 naming the column, never the cell, in the answer
    and the log, and /v1/health says the index is unavailable."""
    from contextlib import closing

    from fastapi.testclient import TestClient

    damaged = tmp_path / "damaged.idx"
    shutil.copytree(index_dir, damaged)
    with closing(sqlite3.connect(damaged / "cases.sqlite")) as conn, conn:
        report = conn.execute("SELECT report FROM cases WHERE report != '' ORDER BY vid").fetchone()[0]
        conn.execute("UPDATE cases SET report = report || X'FF'")
    reason = ("cannot read the cases table (a cell of column 'report' is not UTF-8 text): a damaged index: rebuild it "
              "with `medvl index build`")
    with caplog.at_level(logging.DEBUG), TestClient(create_app(model_dir, index=damaged, require_token=False)) as http:
        assert http.get("/v1/health").json()["index"] == "ok"
        for path, form in (("/v1/search", {"data": {"text": "effusion"}}),
                           ("/v1/report/draft", {"files": {"image": ("x.png", png.read_bytes(), "image/png")}})):
            answer = http.post(path, **form)
            assert answer.status_code == 503 and answer.json()["detail"] == reason, (path, answer.text)
        health = http.get("/v1/health")  # no token: the word, not the reason
        assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
        assert health.json()["index"] == "unavailable"
        assert http.get("/v1/models").json()["models"][0]["index"]["unavailable"] == reason
    assert report[:40] not in caplog.text and "with text" not in caplog.text


def test_an_index_found_damaged_answers_503_on_every_index_route_until_restarted_as_health_says(
        model_dir, index_dir, phantom_dir, png, tmp_path):
    """Once a search met a damaged row, /v1/health said the index was unavailable while every search, draft,
    explanation and thumbnail not meeting that row was still answered 200 from it. They answer 503 with the reason,
    as long as health says unavailable (the flag stays until the service is restarted over a rebuilt index)."""
    from contextlib import closing

    from fastapi.testclient import TestClient

    damaged = tmp_path / "damaged.idx"
    shutil.copytree(index_dir, damaged)
    with closing(open_index(damaged)) as index:
        everything = search_index(index, load_model(model_dir), text="effusion", k=len(index), verify_model=False)
    nearest, last = everything[0].id, everything[-1].id
    with closing(sqlite3.connect(damaged / "cases.sqlite")) as conn, conn:  # one row of all: the farthest
        conn.execute("UPDATE cases SET report = report || X'FF' WHERE id = ?", (last,))
    reason = ("cannot read the cases table (a cell of column 'report' is not UTF-8 text): a damaged index: rebuild it "
              "with `medvl index build`")
    image = {"image": ("x.png", png.read_bytes(), "image/png")}
    app = create_app(model_dir, index=damaged, settings=ServeSettings(data_root=phantom_dir), require_token=False)
    with TestClient(app) as http:
        before = http.post("/v1/search", data={"text": "effusion", "k": "1"})
        assert before.status_code == 200 and before.json()["hits"][0]["id"] == nearest, before.text
        met = http.post("/v1/search", data={"text": "effusion", "k": str(len(everything))})
        assert met.status_code == 503 and met.json()["detail"] == reason, met.text
        assert http.get("/v1/health").json() == {**http.get("/v1/health").json(), "status": "degraded",
                                                 "index": "unavailable"}
        for answer in (http.post("/v1/search", data={"text": "effusion", "k": "1"}),
                       http.post("/v1/report/draft", files=image, data={"k": "3"}),
                       http.post("/v1/explain", files=image, data={"labels": "nodule,no_finding", "k": "1"}),
                       http.get(f"/v1/cases/{quote(nearest, safe='')}/thumbnail")):
            assert answer.status_code == 503 and answer.json()["detail"] == reason, (answer.request.url, answer.text)
        assert http.post("/v1/zero-shot", files=image, data={"labels": LABELS}).status_code == 200  # the model's


def test_a_faiss_index_changed_under_the_service_is_followed_between_requests(model_dir, index_dir, phantom_dir,
                                                                              png, tmp_path):
    """``medvl index delete`` (add, build over it) swaps a new folder in; the service kept the version it opened:
    deleted cases went on being found by /v1/search, cited by /v1/report/draft and shown as thumbnails, and /v1/models
    kept the old count and ``sha256``, while ``medvl search`` left them out. The service reads the new version between
    requests; one rebuilt with another model, or removed, answers 503 with the reason, and health says so."""
    from fastapi.testclient import TestClient

    from medvl.index.base import info_sha256
    from medvl.models.registry import create_model

    torch = pytest.importorskip("torch")
    served = tmp_path / "served.idx"
    shutil.copytree(index_dir, served)
    image = {"image": ("x.png", png.read_bytes(), "image/png")}
    app = create_app(model_dir, index=served, settings=ServeSettings(data_root=phantom_dir), require_token=False)
    with TestClient(app) as http:
        def search(k: int = 5) -> list[str]:
            answer = http.post("/v1/search", files=image, data={"k": str(k)})
            assert answer.status_code == 200, answer.text
            return [hit["id"] for hit in answer.json()["hits"]]

        def described() -> dict:
            return http.get("/v1/models").json()["models"][0]["index"]

        before, cases = search(), described()["cases"]
        draft = http.post("/v1/report/draft", files=image, data={"k": "5"}).json()
        cited = {case for finding in draft["findings"] for case in finding["cases"]}
        gone = sorted(cited & set(before))[:2]
        assert gone and all(thumbnail(http, case_id, {}).status_code == 200 for case_id in gone)
        result, output = invoke("index", "delete", "--index", served, *gone)
        assert result.exit_code == 0, output
        after = search()
        assert not set(gone) & set(after)
        assert after == [case for case in before if case not in gone] + after[-len(gone):]
        draft = http.post("/v1/report/draft", files=image, data={"k": "5"})
        assert draft.status_code == 200 and not any(case in draft.text for case in gone), draft.text
        for case_id in gone:
            answer = thumbnail(http, case_id, {})
            assert answer.status_code == 404 and answer.json()["detail"] == "no indexed case has this id"
        with open_index(served) as index:
            assert described() | {"unavailable": None} == {**described(), "cases": cases - len(gone),
                                                          "sha256": info_sha256(index.info)}
        torch.manual_seed(5)
        other = tmp_path / "other"
        create_model("phantom-tiny").save_pretrained(other)
        build_index(load_model(other), load_dataset(phantom_dir).select("test"), served, model_dir=other,
                    show_progress=False)
        refused = http.post("/v1/search", data={"text": "effusion"})
        assert refused.status_code == 503 and "rebuilt with another model" in refused.json()["detail"], refused.text
        assert "rebuilt with another model" in described()["unavailable"]
        shutil.rmtree(served)
        http.app.state.service.index_health_seconds = 0
        assert http.get("/v1/health").json()["index"] == "unavailable"
        refused = http.get(f"/v1/cases/{quote(after[0], safe='')}/thumbnail")
        assert refused.status_code == 503 and refused.json()["detail"] == "index not found", refused.text
        assert str(tmp_path) not in refused.text and str(tmp_path) not in json.dumps(described())
        assert http.post("/v1/zero-shot", files=image, data={"labels": LABELS}).status_code == 200  # the model's


def test_concurrent_requests_share_forward_passes_and_get_their_own_answers(server, client, model_dir, phantom_dir):
    paths = [record.image for record in load_dataset(phantom_dir).select("test")[:8]]
    batcher = server.app.state.service.batcher
    passes, items = batcher.batches, batcher.items
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda path: zero_shot(client, path.read_bytes(), headers=auth(TOKENS[0])), paths))
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
    assert batcher.items - items == 8 and batcher.batches - passes < 8  # some requests shared a pass
    for answer, expected in zip(answers, predict(model_dir, paths, LABELS.split(",")), strict=True):
        for name, probability in expected["probabilities"].items():
            assert answer.json()["probabilities"][name] == pytest.approx(probability, abs=1e-5)


@pytest.fixture
def blank(model_dir):
    """The served model and one blank image, preprocessed: what the batcher tests send."""
    model = load_model(model_dir)
    return model, model.preprocessor.load(np.zeros((64, 64), np.uint8))


@contextlib.contextmanager
def started_batcher(encode, **options):
    """A started ``MicroBatcher`` running ``encode`` on its own thread (inside a running event loop)."""
    with ThreadPoolExecutor(1) as thread:
        batcher = MicroBatcher(encode, thread, **options)
        batcher.start()
        yield batcher


def test_the_batcher_drains_its_queue_on_close(blank):
    model, pixels = blank

    async def run():
        with started_batcher(model.encode_images, max_batch=4, max_wait_ms=1000) as batcher:
            pending = [asyncio.ensure_future(batcher.embed(pixels)) for _ in range(10)]
            await asyncio.sleep(0)  # all queued
            await batcher.close()
            results = await asyncio.gather(*pending)
            with pytest.raises(ServiceBusy):
                await batcher.embed(pixels)
            return results, batcher.batches

    results, batches = asyncio.run(run())
    assert len(results) == 10 and batches == 3  # 4 + 4 + 2, nothing dropped
    assert [timing.batch_size for _, timing in results] == [4] * 8 + [2] * 2


def test_a_batch_waits_for_as_many_requests_as_arrived_together_lately(blank):
    """A lone request is not delayed; after a batch of 4, the next batch waits (up to max_wait) for 4 again:
    under steady load the clients just answered are about to send their next requests."""
    model, pixels = blank

    async def run():
        with started_batcher(model.encode_images, max_batch=8, max_wait_ms=3000) as batcher:
            timings = {"lone": [(await batcher.embed(pixels))[1]]}
            timings["four"] = [t for _, t in await asyncio.gather(*(batcher.embed(pixels) for _ in range(4)))]
            expected = batcher.expected()
            early = [asyncio.ensure_future(batcher.embed(pixels)) for _ in range(2)]
            await asyncio.sleep(0.3)  # the other two come later, inside max_wait
            late = [asyncio.ensure_future(batcher.embed(pixels)) for _ in range(2)]
            timings["waited"] = [t for _, t in await asyncio.gather(*early, *late)]
            await asyncio.sleep(RECENT_S + 0.2)  # nothing for a while: back to not waiting
            timings["idle"] = [(await batcher.embed(pixels))[1]]
            await batcher.close()
            return timings, expected

    timings, expected = asyncio.run(run())
    assert [t.batch_size for t in timings["lone"]] == [1] and timings["lone"][0].queue_ms < 1000
    assert [t.batch_size for t in timings["four"]] == [4] * 4 and expected == 4
    assert [t.batch_size for t in timings["waited"]] == [4] * 4  # one pass, not 2 + 2
    assert timings["waited"][0].queue_ms >= 250  # the first two waited for the late ones
    assert [t.batch_size for t in timings["idle"]] == [1] and timings["idle"][0].queue_ms < 1000


def test_a_full_queue_is_answered_busy(blank):
    model, pixels = blank
    gate = threading.Event()

    def gated_encode(batch):  # the real forward pass, held until the queue has filled
        gate.wait(timeout=30)
        return model.encode_images(batch)

    async def run():
        with started_batcher(gated_encode, max_batch=1, max_wait_ms=0, max_queue=1) as batcher:
            running = asyncio.ensure_future(batcher.embed(pixels))
            await asyncio.sleep(0.05)  # taken by the worker, held in the forward pass
            queued = asyncio.ensure_future(batcher.embed(pixels))
            await asyncio.sleep(0)
            with pytest.raises(ServiceBusy, match="too many images waiting"):
                await batcher.embed(pixels)
            gate.set()
            results = await asyncio.gather(running, queued)
            await batcher.close()
            return results

    assert len(asyncio.run(run())) == 2


def test_after_all_that_the_service_still_answers_correctly(client, model_dir, png):
    answer = zero_shot(client, png.read_bytes())
    assert answer.status_code == 200
    expected = predict(model_dir, [png], LABELS.split(","))[0]
    assert answer.json()["prediction"] == expected["prediction"]
    assert client.get("/v1/health").json() == {"status": "ok", "batching": True, "waiting": 0,
                                                  "index": "ok"}


def test_a_model_loading_in_the_background_is_reported_and_routes_wait(model_dir, tmp_path):
    app = create_app(model_dir, token_digests=[token_digest(TOKENS[0])], load_in_background=True)
    from fastapi.testclient import TestClient

    with TestClient(app) as http:
        assert http.get("/v1/health").json()["status"] in ("loading", "ok")
        deadline = time.monotonic() + 30
        while http.get("/v1/health").json()["status"] != "ok":
            answer = http.get("/v1/models", headers=auth(TOKENS[0]))
            if answer.status_code == 200:  # the load finished between the two requests
                break
            assert answer.status_code == 503 and "loading" in answer.json()["detail"]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert http.get("/v1/models", headers=auth(TOKENS[0])).status_code == 200
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with TestClient(create_app(tmp_path / "broken", token_digests=[], require_token=False,
                               load_in_background=True)) as http:
        deadline = time.monotonic() + 10
        while (health := http.get("/v1/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health.status_code == 503 and "could not be loaded" in health.json()["detail"]
        assert http.get("/v1/models").status_code == 503


def test_a_route_asked_while_the_model_loads_says_when_to_ask_again_and_a_failed_load_does_not(
        model_dir, tmp_path, monkeypatch):
    """The 503 of a model still loading carried no ``Retry-After`` although asking again is the answer (a full
    queue's 503 has one); it now does. The 503 of a load that failed has none: asking again does not help."""
    import threading

    from fastapi.testclient import TestClient

    from medvl.serve import service as service_module

    loadable = threading.Event()
    real_load = service_module.load_model

    def slow_load(*args, **kwargs):  # the real load, held back until the test has asked once
        assert loadable.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(service_module, "load_model", slow_load)
    with TestClient(create_app(model_dir, token_digests=[], require_token=False, load_in_background=True)) as http:
        answer = http.get("/v1/models")
        assert answer.status_code == 503 and "still loading" in answer.json()["detail"]
        assert answer.headers["Retry-After"] == "2"
        loadable.set()
        deadline = time.monotonic() + 30
        while http.get("/v1/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert http.get("/v1/models").status_code == 200
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with TestClient(create_app(tmp_path / "broken", token_digests=[], require_token=False,
                               load_in_background=True)) as http:
        deadline = time.monotonic() + 30
        while http.get("/v1/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        answer = http.get("/v1/models")
        assert answer.status_code == 503 and "could not be loaded" in answer.json()["detail"]
        assert "Retry-After" not in answer.headers


def _edit_text_config(folder: Path) -> None:
    path = folder / "text" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_attention_heads": "MRN123"}))


@pytest.mark.parametrize("damage, reason", [
    (lambda m: (m / "meta.json").write_text('["MRN123"]'), "damaged: cannot read model files (meta.json: not a JSON "
                                                            "object"),
    (_edit_text_config, "damaged: cannot read the text tower in text/"),
    (lambda m: (m / "index").mkdir() or (m / "index" / "index.json").write_text('["MRN123"]'),
     "index.json: not a JSON object"),
    # every damaged file above is medvl's error; a library failing in a way medvl does not foresee is injected
    (None, "RuntimeError: a library failed reading MRN123"),
])
def test_a_model_that_fails_to_load_for_any_reason_is_reported_failed_never_left_loading(
        damage, reason, model_dir, tmp_path, log_lines, monkeypatch):
    """A load that raises, whatever the exception, ends in ``failed``: the routes behind a token give the reason (the
    CLI's line for medvl's errors); the public /v1/health and one log line name the error type only (no file
    content, no path: /v1/health gave out the reason, with the server's absolute model path in it, to anyone)."""
    import shutil

    from fastapi.testclient import TestClient

    from medvl.serve import service as service_module

    folder = tmp_path / "damaged"
    shutil.copytree(model_dir, folder)
    if damage is None:
        def failing(*args, **kwargs):
            raise RuntimeError("a library failed reading MRN123")

        monkeypatch.setattr(service_module, "load_model", failing)
    else:
        damage(folder)
    index = folder / "index" if (folder / "index").exists() else None
    app = create_app(folder, index=index, token_digests=[], require_token=False, load_in_background=True)
    with TestClient(app) as http:
        deadline = time.monotonic() + 30
        while (health := http.get("/v1/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline, "still loading"
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert health.json()["error"].endswith("Error") and "could not be loaded" in health.json()["detail"]
        assert reason not in health.text and "MRN123" not in health.text and str(tmp_path) not in health.text
        refused = http.get("/v1/models")  # a token would be needed, but for require_token=False
        assert refused.status_code == 503 and reason in refused.json()["detail"], refused.text
    failures = [line for line in log_lines() if "model not loaded" in line]
    assert len(failures) == 1 and "Error" in json.loads(failures[0])["error"]
    assert not any("MRN123" in line for line in log_lines())


# -------------------------------------------------------------------------- previews, thumbnails


def _png_pixels(answer) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png" and answer.headers["cache-control"] == "no-store"
    return np.asarray(Image.open(io.BytesIO(answer.content)))


def _numpy_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 LINEAR windowing to 0-255, written out plainly."""
    scaled = ((values.astype(np.float64) - (center - 0.5)) / (width - 1) + 0.5).clip(0, 1)
    return np.round(scaled * 255).astype(np.uint8)


def _numpy_min_max(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return np.round((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)


def preview(client, data: bytes, window: str | None = None):
    return client.post("/v1/preview", headers=auth(), files={"image": ("scan", data)},
                       data={"window": window} if window else {})


def test_render_preview_matches_a_plain_numpy_rendering():
    from medvl.clinical.windowing import WINDOW_PRESETS, render_preview

    rng = np.random.default_rng(4)
    hu = rng.uniform(-1100, 1500, (40, 56)).astype(np.float32)
    for name, window in WINDOW_PRESETS.items():
        np.testing.assert_array_equal(render_preview(hu, name), _numpy_window(hu, window.center, window.width))
    np.testing.assert_array_equal(render_preview(hu), _numpy_min_max(hu))
    volume = rng.normal(size=(7, 30, 20)).astype(np.float32)
    np.testing.assert_array_equal(render_preview(volume), _numpy_min_max(volume[3]))  # the middle slice
    gray = rng.integers(0, 256, (30, 20), dtype=np.uint8)
    np.testing.assert_array_equal(render_preview(gray), gray)  # 8-bit pixels as they are
    rgb = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(render_preview(rgb), rgb)
    large = rng.uniform(-1000, 1000, (1024, 600)).astype(np.float32)
    shown = render_preview(large, "bone", max_side=512)
    blocks = _numpy_window(large, 400, 1800).reshape(512, 2, 300, 2).mean(axis=(1, 3))  # 2 x 2 area means
    assert shown.shape == (512, 300) and np.abs(shown.astype(float) - blocks).max() <= 1.0
    assert render_preview(rng.normal(size=(3, 900, 300)), max_side=128).shape == (128, 43)


def test_a_png_preview_is_the_image_itself_and_never_cached(client, png):
    shown = _png_pixels(preview(client, png.read_bytes()))
    np.testing.assert_array_equal(shown, np.asarray(Image.open(png)))
    refused = preview(client, png.read_bytes(), "lung")
    assert refused.status_code == 422 and "DICOM or NIfTI" in refused.json()["detail"]


def test_a_real_ct_dicom_preview_is_its_de_identified_pixels_through_the_preset(client, tmp_path, log_lines,
                                                                                 upload_tmp):
    import pydicom
    from pydicom.data import get_testdata_file

    from medvl.clinical.deid import deidentify

    original = Path(get_testdata_file("CT_small.dcm"))
    deidentify(original, tmp_path / "clean.dcm")
    dataset = pydicom.dcmread(tmp_path / "clean.dcm")
    hu = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    for name, (center, width) in {"lung": (-600, 1500), "mediastinum": (50, 350), "bone": (400, 1800)}.items():
        answer = preview(client, original.read_bytes(), name)
        np.testing.assert_array_equal(_png_pixels(answer), _numpy_window(hu, center, width))
        assert answer.headers["X-Preview-Window"] == name
    plain = preview(client, original.read_bytes())  # CT_small holds no window: min-max
    np.testing.assert_array_equal(_png_pixels(plain), _numpy_min_max(hu))
    assert plain.headers["X-Preview-Window"] == "none"
    unknown = preview(client, original.read_bytes(), "liver; drop table")
    assert unknown.status_code == 422 and "lung, mediastinum, soft_tissue, bone, brain" in unknown.json()["detail"]
    assert _request_line(log_lines, unknown)["status"] == 422  # the window is checked first
    logged = "\n".join(log_lines())
    previews = [json.loads(line) for line in log_lines() if '"route": "/v1/preview"' in line]
    assert [line["upload_kind"] for line in previews if line["status"] == 200] == ["dicom"] * 4
    assert "CompressedSamples" not in logged and "CT1" not in logged
    assert not list(upload_tmp.iterdir())  # nothing of the uploads kept


def test_a_dicom_preview_has_square_pixels_from_its_pixel_spacing_or_aspect_ratio_as_a_nifti_slice_has(client,
                                                                                                       tmp_path):
    """A DICOM's Pixel Spacing / Pixel Aspect Ratio was ignored: 1.0 x 0.5 mm pixels were shown squashed (128 x 128)
    while the same slice as NIfTI was stretched to square pixels (256 x 128)."""
    import pydicom
    from pydicom.data import get_testdata_file

    from medvl.clinical.nifti import write_nifti

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelSpacing = [1.0, 0.5]  # rows 1 mm apart, columns 0.5 mm: each pixel twice as tall as wide
    ds.save_as(tmp_path / "aniso.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    nifti = write_nifti(tmp_path / "aniso.nii.gz", hu[None].astype(np.float32), (1.0, 1.0, 0.5))
    shown = _png_pixels(preview(client, (tmp_path / "aniso.dcm").read_bytes()))
    assert shown.shape == _png_pixels(preview(client, nifti.read_bytes())).shape == (256, 128)
    del ds.PixelSpacing
    ds.PixelAspectRatio = [4, 3]  # vertical : horizontal, as ultrasound states it
    ds.save_as(tmp_path / "aspect.dcm")
    assert _png_pixels(preview(client, (tmp_path / "aspect.dcm").read_bytes())).shape == (171, 128)


def test_a_dicom_without_a_preset_is_shown_in_its_own_window_and_a_multi_frame_by_its_middle_frame(client):
    import pydicom
    from pydicom.data import get_testdata_file

    with_window = Path(get_testdata_file("MR_small.dcm"))  # Window Center 600, Width 1600
    answer = preview(client, with_window.read_bytes())
    stored = pydicom.dcmread(with_window).pixel_array  # no rescale: stored values are the modality values
    np.testing.assert_array_equal(_png_pixels(answer), _numpy_window(stored, 600, 1600))
    assert answer.headers["X-Preview-Window"] == "file" and "X-Preview-Slice" not in answer.headers
    frames = Path(get_testdata_file("emri_small.dcm"))  # 10 frames of 64 x 64, no window
    answer = preview(client, frames.read_bytes())
    np.testing.assert_array_equal(_png_pixels(answer), _numpy_min_max(pydicom.dcmread(frames).pixel_array[5]))
    assert answer.headers["X-Preview-Slice"] == "5/10" and answer.headers["X-Preview-Window"] == "none"


def test_a_multi_frame_dicom_of_sagittal_frames_is_previewed_by_its_middle_axial_slice_as_its_nifti(client, tmp_path):
    """Review finding: a multi-frame file stored as sagittal frames (an enhanced CT here, 8 frames 10 mm apart along
    x, each its own value) was previewed by its middle stored frame, one sagittal frame of a single grey level, where
    a 3D model reads the file in RAS and the NIfTI of the same voxels is previewed by its middle axial slice. The two
    previews are now the same picture."""
    import copy

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian

    from medvl.clinical.nifti import write_nifti
    from medvl.data.images import read_image

    count, rows, columns = 8, 12, 16  # sagittal: rows superior -> inferior, columns anterior -> posterior
    frames = np.zeros((count, rows, columns), np.uint16)
    for k in range(count):
        frames[k] = 1000 + 100 * k + np.arange(columns)[None, :] * 3 + np.arange(rows)[:, None]

    def multi_frame(name: str, orientation: list[int], step: list[float]) -> Path:
        ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
        ds.NumberOfFrames, ds.Rows, ds.Columns = count, rows, columns
        ds.file_meta.TransferSyntaxUID, ds.PixelData = ExplicitVRLittleEndian, frames.tobytes()
        shared = ds.SharedFunctionalGroupsSequence[0]
        del shared.FrameVOILUTSequence  # no window: the previews are min-max
        shared.PlaneOrientationSequence[0].ImageOrientationPatient = orientation
        groups = []
        for k in range(count):
            group = copy.deepcopy(ds.PerFrameFunctionalGroupsSequence[0])
            group.PlanePositionSequence[0].ImagePositionPatient = [-40.0 + step[0] * k, -100.0 + step[1] * k, 50.0]
            groups.append(group)
        ds.PerFrameFunctionalGroupsSequence = groups
        ds.save_as(tmp_path / name)
        return tmp_path / name

    sagittal = multi_frame("sagittal.dcm", [0, 1, 0, 0, 0, -1], [10.0, 0.0])
    volume = read_image(sagittal, modality_values=True)  # RAS, as a 3D model reads it
    assert volume.shape == (rows, columns, count)
    shared = pydicom.dcmread(sagittal).SharedFunctionalGroupsSequence[0]
    spacing = float(shared.PixelMeasuresSequence[0].PixelSpacing[0])
    nifti = write_nifti(tmp_path / "sagittal.nii.gz", volume, (spacing, spacing, 10.0))
    answer, reference = preview(client, sagittal.read_bytes()), preview(client, nifti.read_bytes())
    shown = _png_pixels(answer)
    np.testing.assert_array_equal(shown, _png_pixels(reference))
    assert answer.headers["X-Preview-Slice"] == reference.headers["X-Preview-Slice"] == f"{rows // 2}/{rows}"
    assert shown.shape[0] == columns  # anterior -> posterior down the picture, every frame across it
    # axial frames are shown as before: the middle stored frame
    axial = multi_frame("axial.dcm", [1, 0, 0, 0, 1, 0], [0.0, 0.0])
    ds = pydicom.dcmread(axial)
    for k, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        group.PlanePositionSequence[0].ImagePositionPatient = [-40.0, -100.0, 50.0 - 10 * k]
    ds.save_as(axial)
    answer = preview(client, axial.read_bytes())
    assert answer.headers["X-Preview-Slice"] == f"{count // 2}/{count}"
    np.testing.assert_array_equal(_png_pixels(answer), _numpy_min_max(frames[count // 2]))


def test_a_ct_window_preset_on_an_mr_dicom_is_refused(client):
    """A lung window (HU) used to be applied to MR signal values without a word: a nearly white picture
    captioned "lung window"."""
    from pydicom.data import get_testdata_file

    mr = Path(get_testdata_file("emri_small.dcm")).read_bytes()  # Modality MR
    refused = preview(client, mr, "lung")
    assert refused.status_code == 422
    assert refused.json()["detail"] == ("window presets are CT windows in HU; this DICOM's modality is MR, whose "
                                        "values hold no HU: choose no preset (the file's own window)")
    shown = preview(client, mr)
    assert shown.status_code == 200 and shown.headers["X-Preview-Presets"] == "none"  # the page offers none


def test_a_preview_says_whether_the_ct_presets_apply_to_the_file(client, png):
    from pydicom.data import get_testdata_file

    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    assert preview(client, ct).headers["X-Preview-Presets"] == "ct"
    assert preview(client, ct, "lung").headers["X-Preview-Presets"] == "ct"
    assert preview(client, png.read_bytes()).headers["X-Preview-Presets"] == "none"
    colour = Path(get_testdata_file("SC_rgb.dcm")).read_bytes()  # an RGB secondary capture: no HU either
    assert preview(client, colour).headers["X-Preview-Presets"] == "none"


def test_the_ct_presets_apply_to_a_nifti_in_hu_not_to_an_mr_volume(client, tmp_path):
    """Every NIfTI was answered X-Preview-Presets: ct, so the page offered the CT presets for an MR volume (the MNI152
    T1 template nilearn ships, values 0 to about 100) and "lung" turned it nearly white. A NIfTI states no modality:
    the presets are now offered for one whose slice holds air in HU only; a preset asked for is applied either way (the
    header cannot tell an MR from a CT cropped to soft tissue)."""
    from medvl.data.phantom import generate_phantom
    from medvl.serve.previews import parse_window, preview_upload

    nilearn = pytest.importorskip("nilearn")
    mr = (Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    if not mr.is_file():
        pytest.skip(f"{mr} not found")
    settings = ServeSettings()  # the template (1.6 MB) is over the test service's upload limit
    kind, picture = preview_upload(mr.read_bytes(), settings, None)
    assert kind.startswith("nifti") and picture.headers()["X-Preview-Presets"] == "none" and picture.window == "none"
    kind, picture = preview_upload(mr.read_bytes(), settings, parse_window("lung"))
    assert picture.headers()["X-Preview-Presets"] == "none" and picture.window == "lung"
    generate_phantom(tmp_path / "ct", n=1, seed=2, size=32, kind="ct3d", splits={"test": 1.0})
    [ct] = sorted((tmp_path / "ct").rglob("*.nii.gz"))
    assert preview(client, ct.read_bytes()).headers["X-Preview-Presets"] == "ct"
    assert preview(client, ct.read_bytes(), "lung").headers["X-Preview-Presets"] == "ct"


def test_a_nifti_volume_preview_is_its_middle_axial_slice(client, tmp_path):
    from medvl.clinical.nifti import read_nifti, write_nifti
    from medvl.data.phantom import generate_phantom

    generate_phantom(tmp_path / "ct", n=1, seed=2, size=32, kind="ct3d", splits={"test": 1.0})
    [ct] = sorted((tmp_path / "ct").rglob("*.nii.gz"))
    volume = read_nifti(ct)[0]  # HU, RAS
    middle = volume[volume.shape[0] // 2][::-1, ::-1]  # anterior up, the patient's right on the left
    answer = preview(client, ct.read_bytes(), "soft_tissue")
    np.testing.assert_array_equal(_png_pixels(answer), _numpy_window(middle, 50, 400))
    assert answer.headers["X-Preview-Slice"] == f"{volume.shape[0] // 2}/{volume.shape[0]}"
    random = np.random.default_rng(5).normal(size=(9, 20, 30)).astype(np.float32)
    path = write_nifti(tmp_path / "v.nii", random, (2.0, 1.0, 1.0))
    np.testing.assert_array_equal(_png_pixels(preview(client, path.read_bytes())),
                                  _numpy_min_max(random[4][::-1, ::-1]))


def test_a_nifti_preview_is_read_slab_by_slab_not_decoded_whole(client, tmp_path):
    """The preview decoded the whole upload (read_nifti: about 2 GB for a 0.5 MB gzip file of 254 M voxels) to show
    one slice of it. It is now read slab by slab and only the middle slice kept: the memory it allocates while
    answering (numpy's, traced) stays under half of the volume as float32, and the picture is the same."""
    import gzip
    import tracemalloc

    import nibabel

    from medvl.clinical.nifti import read_nifti
    from medvl.clinical.windowing import radiological_view, render_preview

    stored = np.full((256, 200, 320), -1000, np.int16)  # air, a soft-tissue block and a bone corner: it compresses
    stored[40:200, 30:170, 60:300], stored[10:50, 150:190, 100:220] = 40, 900
    nibabel.save(nibabel.Nifti1Image(stored, np.diag([0.8, 1.0, 2.0, 1.0])), tmp_path / "large.nii")
    path = tmp_path / "large.nii.gz"
    path.write_bytes(gzip.compress((tmp_path / "large.nii").read_bytes(), 9))  # under the test service's 0.25 MiB
    data = path.read_bytes()
    tracemalloc.start()
    try:
        answer = preview(client, data, "soft_tissue")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    volume_bytes = stored.size * 4  # as float32
    assert peak < volume_bytes / 2, f"{peak / 2**20:.1f} MiB allocated for a {volume_bytes / 2**20:.0f} MiB volume"
    volume, spacing = read_nifti(path)
    expected = render_preview(radiological_view(volume), "soft_tissue", 512, spacing=spacing)
    np.testing.assert_array_equal(_png_pixels(answer), expected)
    assert answer.headers["X-Preview-Slice"] == f"{volume.shape[0] // 2}/{volume.shape[0]}"


def test_a_nifti_preview_has_square_pixels_as_a_viewer_shows_it(client, tmp_path):
    """A sphere 80 mm across in a volume of 20 sagittal slices 5 mm apart (1 mm in-plane) was shown 20 x 100 px,
    squashed 5:1, since the spacing read_nifti gives was dropped; its axial slice now has square pixels."""
    import nibabel

    x, y, z = np.meshgrid((np.arange(20) - 9.5) * 5, np.arange(100) - 49.5, np.arange(100) - 49.5, indexing="ij")
    sphere = np.where(x**2 + y**2 + z**2 < 40**2, 60, -1000).astype(np.int16)
    nibabel.save(nibabel.Nifti1Image(sphere, np.diag([5.0, 1.0, 1.0, 1.0])), tmp_path / "sphere.nii.gz")
    shown = _png_pixels(preview(client, (tmp_path / "sphere.nii.gz").read_bytes()))
    assert shown.shape == (100, 100)
    rows, columns = np.flatnonzero((shown > 127).any(axis=1)), np.flatnonzero((shown > 127).any(axis=0))
    assert 76 <= np.ptp(rows) <= 82 and abs(int(np.ptp(rows)) - int(np.ptp(columns))) <= 2, (rows, columns)


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_a_one_slice_sagittal_or_coronal_nifti_is_previewed_as_the_slice_the_model_reads(client, tmp_path, plane):
    """A one-slice coronal (X x 1 x Z) or sagittal (1 x Y x Z) file is read by a 2D model as that slice, superior up
    (``one_slice_view``), but its preview was the middle axial row of the volume: 1 x 40 pixels, under which the
    page laid the explanation's 40 x 30 overlay. The preview is now the slice the model reads, its pixels square."""
    import nibabel

    from medvl.clinical.windowing import render_preview
    from medvl.data.images import read_image_2d

    data = np.arange(30 * 40, dtype=np.float32).reshape(30, 40) - 600.0  # data[y or x, z]
    shape = (1, 30, 40) if plane == "sagittal" else (30, 1, 40)
    path = tmp_path / f"{plane}.nii.gz"
    nibabel.save(nibabel.Nifti1Image(data.reshape(shape), np.diag([2.0, 2.0, 1.0, 1.0])), path)
    answer = preview(client, path.read_bytes())
    shown = _png_pixels(answer)
    assert shown.shape == (40, 60)  # 40 slices 1 mm apart, 30 voxels 2 mm wide: square pixels of 1 mm
    np.testing.assert_array_equal(shown, render_preview(read_image_2d(path), None, 512, spacing=(1.0, 2.0)))
    assert answer.headers["X-Preview-Slice"] == "0/1" and answer.headers["X-Preview-Presets"] == "ct"


def test_preview_refuses_bombs_corrupt_and_unsupported_files_as_the_other_routes_do(client, tmp_path):
    from pydicom.data import get_testdata_file

    from medvl.clinical.nifti import write_nifti

    bomb = preview(client, _png_declaring(60_000, 60_000))
    assert bomb.status_code == 413 and "image too large" in bomb.json()["detail"]
    dicom = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    truncated = preview(client, dicom[: len(dicom) // 2], "lung")
    assert truncated.status_code == 422 and "truncated" in truncated.json()["detail"]
    nifti = write_nifti(tmp_path / "v.nii.gz", np.zeros((6, 16, 16), np.float32), (1.0, 1.0, 1.0)).read_bytes()
    assert preview(client, nifti[: len(nifti) - 12]).status_code == 422
    assert preview(client, b"GIF89a" + b"\0" * 200).status_code == 415
    assert client.post("/v1/preview", files={"image": ("x", dicom)}).status_code == 401


def thumbnail(client, case_id: str, headers=None):
    return client.get(f"/v1/cases/{quote(case_id, safe='')}/thumbnail", headers=headers or auth())


def test_a_cases_thumbnail_is_its_image_from_the_data_root(client, index_dir, phantom_dir, log_lines):
    with open_index(index_dir) as index:
        case = index.search(np.zeros((1, index.dim), np.float32), k=3)[0][2]
    shown = _png_pixels(thumbnail(client, case.id))
    image = np.asarray(Image.open(phantom_dir / case.image_path))
    assert max(shown.shape) <= 128
    np.testing.assert_array_equal(shown, image)  # 64 px phantoms: never enlarged
    assert "/" in case.id  # phantom ids hold a folder: "images/phantom_00012", sent as images%2Fphantom_00012
    as_is = client.get(f"/v1/cases/{case.id}/thumbnail", headers=auth())
    np.testing.assert_array_equal(_png_pixels(as_is), image)
    assert client.get(f"/v1/cases/{quote(case.id, safe='')}/thumbnail").status_code == 401
    for unknown in ("no-such-case", "../../../../etc/passwd", "/etc/passwd", "images/phantom_00001' or '1'='1",
                    "x" * 5000, "'" * 1000):  # quoted, 1,000 apostrophes were a filter too long: "--where" 422
        answer = thumbnail(client, unknown)
        assert answer.status_code == 404 and answer.json()["detail"] == "no indexed case has this id", unknown
    request = _request_line(log_lines, answer)
    assert request["route"] == "/v1/cases/{case_id:path}/thumbnail"
    assert request["status"] == 404
    logged = "\n".join(log_lines())
    assert case.id not in logged and "passwd" not in logged


def test_large_thumbnails_are_made_small(model_dir, tmp_path):
    from medvl.data.phantom import generate_phantom

    data = tmp_path / "large"
    generate_phantom(data, n=4, seed=1, size=300, splits={"train": 1.0})
    build_index(load_model(model_dir), load_dataset(data), tmp_path / "idx", model_dir=model_dir,
                show_progress=False)
    token = TOKENS[-2]
    app = create_app(model_dir, index=tmp_path / "idx", settings=ServeSettings(data_root=data),
                     token_digests=[token_digest(token)])
    with Server(app) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        case_id = load_dataset(data)[0].id
        shown = _png_pixels(thumbnail(http, case_id, auth(token)))
        assert shown.shape == (128, 128)
        pixels = np.asarray(Image.open(data / f"{case_id}.png"), dtype=np.float64)
        assert np.abs(shown - np.asarray(Image.fromarray(pixels.astype(np.uint8)).resize(
            (128, 128), Image.Resampling.BOX), dtype=np.float64)).max() <= 1


def test_thumbnails_are_404_without_a_data_root_or_a_stored_path_and_403_out_of_the_root(
        model_dir, index_dir, phantom_dir, tmp_path):
    import shutil

    import data_store
    from pydicom.data import get_testdata_file

    dicom = tmp_path / "dicom"
    dicom.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), dicom / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), dicom / "mr.dcm")
    shutil.copy(Path(data_store.__file__).parent / "data" / "SC_rgb.dcm", dicom / "sc.dcm")
    build_index(load_model(model_dir), load_dataset(dicom), tmp_path / "dicom.idx", model_dir=model_dir,
                show_progress=False)
    dicom_id = load_dataset(dicom)[0].id
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    with open_index(index_dir) as index:
        [case] = index.search(np.zeros((1, index.dim), np.float32), k=1)[0]
    outside = tmp_path / "outside.png"
    shutil.copy(data / case.image_path, outside)
    (data / case.image_path).unlink()
    (data / case.image_path).symlink_to(outside)  # a stored path leading out of the root through a link
    token = TOKENS[-3]
    services = {"no data root": (index_dir, None, case.id, 404, "without a data root"),
                "dicom": (tmp_path / "dicom.idx", dicom, dicom_id, 404, "stores no image path"),
                "escape": (index_dir, data, case.id, 403, "leaves the data root")}
    for name, (index, root, case_id, status, reason) in services.items():
        app = create_app(model_dir, index=index, settings=ServeSettings(data_root=root),
                         token_digests=[token_digest(token)])
        with Server(app) as running, httpx.Client(base_url=running.url, timeout=30) as http:
            answer = thumbnail(http, case_id, auth(token))
            assert answer.status_code == status and reason in answer.json()["detail"], (name, answer.text)
            assert str(tmp_path) not in answer.text
    (data / case.image_path).unlink()  # a missing file
    app = create_app(model_dir, index=index_dir, settings=ServeSettings(data_root=data),
                     token_digests=[token_digest(token)])
    with Server(app) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        answer = thumbnail(http, case.id, auth(token))
        assert answer.status_code == 404 and "not found under the data root" in answer.json()["detail"]
    with pytest.raises(InputError, match="not a folder"):
        ServeSettings(data_root=tmp_path / "missing").validate()


def test_a_thumbnail_is_404_when_the_file_under_the_data_root_is_not_the_indexed_image(model_dir, index_dir,
                                                                                         phantom_dir, tmp_path):
    """A file at a case's stored path that holds another image (overwritten since indexing, or the case replaced
    from another folder by ``medvl index add --replace``) is not the case's image: 404 saying so, never another
    patient's picture. It used to be shown because a file was there; a file rewritten after a first thumbnail is
    checked again."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    with open_index(index_dir) as index:
        first, second = index.search(np.zeros((1, index.dim), np.float32), k=2)[0]
    token = TOKENS[-3]
    app = create_app(model_dir, index=index_dir, settings=ServeSettings(data_root=data),
                     token_digests=[token_digest(token)])
    with Server(app) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        assert thumbnail(http, first.id, auth(token)).status_code == 200
        shutil.copy(data / second.image_path, data / first.image_path)  # another patient's film at its path
        answer = thumbnail(http, first.id, auth(token))
        assert answer.status_code == 404, answer.text
        assert "the image under the data root is not the indexed one" in answer.json()["detail"]
        assert str(tmp_path) not in answer.text
        shutil.copy(phantom_dir / first.image_path, data / first.image_path)  # put back: shown again
        np.testing.assert_array_equal(_png_pixels(thumbnail(http, first.id, auth(token))),
                                      np.asarray(Image.open(phantom_dir / first.image_path)))


# ------------------------------------------------------------------------- explanations, VQA


QUESTION = "is there a nodule in the left lung?"


def explain(client, image: bytes, headers=None, **fields):
    return client.post("/v1/explain", headers=headers or auth(), files={"image": ("image.png", image)},
                       data={name: str(value) for name, value in fields.items()})


def vqa(client, images: list[bytes], question: str = QUESTION, headers=None):
    return client.post("/v1/vqa", headers=headers or auth(), data={"question": question},
                       files=[("image", (f"film{n}.png", image)) for n, image in enumerate(images)])


def _overlay(heatmap: dict) -> np.ndarray:
    import base64

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(heatmap["png"]))))


def test_explain_answers_as_the_library_with_overlays_of_the_images_shape_concepts_and_cases(
        client, model_dir, index_dir, bottleneck_file, png, phantom_dir):
    from medvl.data.images import read_image
    from medvl.explain.concepts import ConceptBottleneck
    from medvl.explain.explanation import explain_image, explain_pixels
    from medvl.serve.previews import heatmap_overlay

    answer = explain(client, png.read_bytes(), top=2, k=4)
    assert answer.status_code == 200, answer.text
    shown = answer.json()
    bottleneck = ConceptBottleneck.load(bottleneck_file)
    model = load_model(model_dir)
    # what medvl explain computes for the file, without labels as the request has none: the captions' classes
    cli = explain_image(model, png, methods=["patch_text", "gradcam"], top=2, bottleneck=bottleneck)
    library, _ = explain_pixels(model, read_image(png), methods=["patch_text", "gradcam"], top=2, bottleneck=bottleneck)
    assert shown["methods"] == ["patch_text", "gradcam"] and shown["image"]["shape"] == [64, 64]
    assert shown["overlay"]["shape"] == [64, 64]  # a 64 px image: the overlay is the image's own shape
    assert set(shown["probabilities"]) == set(bottleneck.classes)
    for name, probability in cli["probabilities"].items():
        assert shown["probabilities"][name] == pytest.approx(probability, abs=1e-5)
    assert [f["finding"] for f in shown["findings"]] == [f["finding"] for f in cli["findings"]]
    for served, expected, maps in zip(shown["findings"], cli["findings"], library["findings"], strict=True):
        assert served["concepts"] or served["concepts_against"]
        for key in ("concepts", "concepts_against"):  # reasons for the finding, and apart, the strongest against
            assert [c["concept"] for c in served[key]] == [c["concept"] for c in expected[key]]
            for concept, reference in zip(served[key], expected[key], strict=True):
                assert concept["weight"] == pytest.approx(reference["weight"])
                assert concept["contribution"] == pytest.approx(reference["contribution"], abs=1e-5)
                assert (concept["contribution"] > 0) == (key == "concepts")
        for method in ("patch_text", "gradcam"):
            assert served["heatmaps"][method]["peak"] == expected["heatmaps"][method]["peak"]
            overlay = _overlay(served["heatmaps"][method])
            assert overlay.shape == (64, 64, 4)  # RGBA over the image, pixel for pixel
            reference = heatmap_overlay(maps["heatmaps"][method]["map"]).astype(int)
            assert np.abs(overlay.astype(int) - reference).max() <= 1
    with open_index(index_dir) as index:
        hits = search_index(index, model, image=png, k=4)
    assert [case["id"] for case in shown["neighbours"]] == [hit.id for hit in hits]
    assert "text" not in shown["neighbours"][0]  # no report text in an explanation
    assert shown["left_out_copies"] == []
    indexed = load_dataset(phantom_dir).select("train")[0]  # an indexed image is not its own nearest case
    answer = explain(client, Path(indexed.image).read_bytes(), methods="patch_text", k=2)
    assert answer.status_code == 200, answer.text
    assert answer.json()["left_out_copies"] == [indexed.id]
    assert len(answer.json()["neighbours"]) == 2 and indexed.id not in [c["id"] for c in answer.json()["neighbours"]]


def test_an_rgb_copy_of_an_indexed_grey_film_is_left_out_of_explanations_and_drafts(client, phantom_dir):
    """Three equal channels: the same picture to the model, left out of its own nearest cases and named as the grey
    original is (it was its own first neighbour, at similarity 1.000), as medvl explain and report draft do."""
    from medvl.data.images import read_image

    indexed = load_dataset(phantom_dir).select("train")[0]
    rgb = _png_bytes(np.stack([read_image(indexed.image)] * 3, axis=-1))
    answer = explain(client, rgb, methods="patch_text", k=2)
    assert answer.status_code == 200, answer.text
    assert answer.json()["left_out_copies"] == [indexed.id]
    assert indexed.id not in [case["id"] for case in answer.json()["neighbours"]]
    drafted = client.post("/v1/report/draft", headers=auth(), files={"image": ("x.png", rgb)},
                          data={"k": "3", "min_similarity": "0"})
    assert drafted.status_code == 200, drafted.text
    assert drafted.json()["settings"]["left_out_copies"] == [indexed.id]


def test_explain_overlays_of_a_large_image_have_the_previews_declared_shape(client, model_dir):
    from medvl.explain.explanation import explain_pixels
    from medvl.serve.previews import overlay_shape

    rows, columns = np.mgrid[0:300, 0:900]
    image = ((rows + columns) % 256).astype(np.uint8)
    answer = explain(client, _png_bytes(image), methods="patch_text", labels="nodule,no_finding")
    assert answer.status_code == 200, answer.text
    shape = answer.json()["overlay"]["shape"]
    assert shape == list(overlay_shape((300, 900))) == [171, 512]  # as the preview shrinks it
    # the peaks are on that grid, and the answer says so; scaled to the image's they land near medvl explain's
    assert answer.json()["map_shape"] == shape and answer.json()["image"]["shape"] == [300, 900]
    cli, _ = explain_pixels(load_model(model_dir), image, labels=["nodule", "no_finding"], methods=["patch_text"])
    assert cli["map_shape"] == [300, 900]
    served, expected = answer.json()["findings"][0]["heatmaps"]["patch_text"]["peak"], \
        cli["findings"][0]["heatmaps"]["patch_text"]["peak"]
    scale = np.array([300, 900]) / np.array(shape)
    assert np.all(np.abs(np.array(served) * scale - np.array(expected)) <= scale + 1), (served, expected)
    assert answer.json()["image"]["shape"] == [300, 900]
    [finding] = answer.json()["findings"]
    assert list(finding["heatmaps"]) == ["patch_text"]
    assert _overlay(finding["heatmaps"]["patch_text"]).shape == (171, 512, 4)
    preview = _png_pixels(client.post("/v1/preview", headers=auth(), files={"image": ("x", _png_bytes(image))}))
    assert preview.shape == (171, 512)


def test_explain_refuses_bad_options_with_reasons_and_needs_a_token(client, png):
    for fields, reason in (({"methods": "patch_text,lime"}, "heatmap methods must be among patch_text"),
                           ({"top": 4}, "top must be <= 3"), ({"labels": "nodule"}, "at least 2 distinct labels"),
                           ({"labels": "nodule,martian", "label_column": "findings"}, "unknown label column"),
                           ({"k": 0}, "k must be >= 1")):
        answer = explain(client, png.read_bytes(), **fields)
        assert answer.status_code == 422 and reason in answer.json()["detail"], (fields, answer.text)
    assert explain(client, b"GIF89a" + b"\0" * 200).status_code == 415
    assert client.post("/v1/explain", files={"image": ("x.png", png.read_bytes())}).status_code == 401
    assert client.post("/v1/vqa", files={"image": ("x.png", png.read_bytes())},
                       data={"question": QUESTION}).status_code == 401



def test_explain_labels_made_only_of_separators_are_refused_as_medvl_explain_refuses_them(
        client, model_dir, bottleneck_file, png, tmp_path):
    """`labels= , ,` parsed to no label, which the service took for no labels given and explained the bottleneck's
    findings with a 200; medvl explain --labels ' , ,' exits 2. A blank field still means the default."""
    reason = "need at least 2 distinct labels to explain a prediction, got []"
    answer = explain(client, png.read_bytes(), labels=" , ,", methods="patch_text")
    assert answer.status_code == 422 and reason in answer.json()["detail"], answer.text
    result, output = invoke("explain", png, "--model", model_dir, "--labels", " , ,", "--method", "patch_text",
                            "--bottleneck", bottleneck_file, "--out", tmp_path / "why")
    assert result.exit_code == 2 and reason in output, output
    assert explain(client, png.read_bytes(), labels=" ", methods="patch_text").status_code == 200


def test_explain_refuses_findings_the_bottleneck_does_not_predict_as_medvl_explain_does(
        client, model_dir, bottleneck_file, png, tmp_path):
    """With --bottleneck, /v1/explain answered 200 for labels the bottleneck does not know, their findings without
    concept keys and without a word, while medvl explain refused them (exit 2)."""
    from medvl.data.images import read_image
    from medvl.explain.concepts import ConceptBottleneck
    from medvl.explain.explanation import explain_pixels

    token = auth()
    for labels in ("foo,bar", "nodule,martian"):
        answer = explain(client, png.read_bytes(), token, labels=labels, methods="patch_text")
        result, output = invoke("explain", png, "--model", model_dir, "--labels", labels, "--method", "patch_text",
                                "--bottleneck", bottleneck_file, "--out", tmp_path / labels.replace(",", "-"))
        assert answer.status_code == 422 and result.exit_code == 2, (answer.text, output)
        detail = answer.json()["detail"]
        unknown = labels.removeprefix("nodule,").replace(",", ", ")
        assert detail.startswith(f"the concept bottleneck does not predict {unknown}; it knows"), detail
        assert f"error: {detail}" in " ".join(output.split()), (output, detail)
    with pytest.raises(InputError, match="the concept bottleneck does not predict martian"):  # the library's call
        explain_pixels(load_model(model_dir), read_image(png), labels=["nodule", "martian"],
                       bottleneck=ConceptBottleneck.load(bottleneck_file))


def test_explain_without_labels_takes_the_captions_classes_not_the_bottlenecks_label_values(model_dir, phantom_dir,
                                                                                          png, tmp_path):
    """With a bottleneck fitted on a column the captions do not describe (cardiomegaly: 0 / 1) and no labels, the
    service explained the values "0" and "1" as zero-shot findings. No labels means the captions' classes, as in
    medvl explain: such a bottleneck does not predict them (422, the CLI's message); labels given still choose."""
    from fastapi.testclient import TestClient

    from medvl.explain.concepts import fit_bottleneck, load_concepts

    train = load_dataset(phantom_dir).select("train")
    cardio = fit_bottleneck(load_model(model_dir), train, "cardiomegaly", load_concepts("chest_xray"))
    path = cardio.save(tmp_path / "cardiomegaly.json")
    image = {"image": ("x.png", png.read_bytes())}
    with TestClient(create_app(model_dir, settings=ServeSettings(bottleneck=path), require_token=False)) as http:
        refused = http.post("/v1/explain", files=image, data={"methods": "patch_text"})
        chosen = http.post("/v1/explain", files=image, data={"methods": "patch_text", "labels": "0,1"})
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert detail.startswith("the concept bottleneck does not predict no_finding") and "it knows 0, 1" in detail
    assert chosen.status_code == 200 and set(chosen.json()["probabilities"]) == {"0", "1"}, chosen.text
    result, output = invoke("explain", png, "--model", model_dir, "--bottleneck", path, "--method", "patch_text")
    assert result.exit_code == 2 and f"error: {detail}" in " ".join(output.split()), output


def test_zero_shot_and_explain_tell_the_client_of_bare_name_prompts_and_agree_on_the_label_column(model_dir, png):
    """/v1/zero-shot did not tell the client its prompts fell back to the bare class names (only the operator's
    log did), and said "label_column": null where /v1/explain (and medvl explain --json) said "". A service
    without a bottleneck: with one, /v1/explain refuses classes it does not predict."""
    from fastapi.testclient import TestClient

    from medvl.explain.explanation import explain_image

    image = {"image": ("x.png", png.read_bytes())}
    bare = "no label column of the captions describes all 2 classes asked for (2 of them none does): the prompts " \
           "are the bare class names in the templates"
    with TestClient(create_app(model_dir, require_token=False)) as http:
        for labels, column, warnings in (("foo,bar", None, [bare]), ("no_finding,nodule", "finding", [])):
            predicted = http.post("/v1/zero-shot", files=image, data={"labels": labels})
            explained = http.post("/v1/explain", files=image, data={"labels": labels, "methods": "patch_text"})
            assert predicted.status_code == 200 and explained.status_code == 200, (predicted.text, explained.text)
            for answer in (predicted.json(), explained.json()):
                assert answer["label_column"] == column and answer["warnings"] == warnings, answer
            assert explained.json()["probabilities"] == pytest.approx(predicted.json()["probabilities"], abs=1e-5)
    cli = explain_image(load_model(model_dir), png, labels=["foo", "bar"], methods=["patch_text"])  # its --json
    assert cli["label_column"] is None and cli["warnings"] == [bare]


def test_explain_answers_with_the_served_model_not_the_folder_changed_since_the_start(model_dir, phantom_dir, png,
                                                                                     tmp_path):
    """/v1/explain loaded the model folder afresh at the first explanation: weights replaced since the start made it
    explain another model's probabilities than /v1/zero-shot's, a guard fitted into the folder since made it alone
    call the upload out of distribution. It explains with a copy of the served torch model; on another backend with
    the folder's torch model if it is the served one (its guard and captions the served model's), else 503."""
    import torch
    from fastapi.testclient import TestClient

    other = tmp_path / "other"
    changed = load_model(model_dir)
    with torch.no_grad():
        for weights in changed.parameters():
            weights.add_(0.05 * torch.randn(weights.shape, generator=torch.Generator().manual_seed(0)))
    changed.save_pretrained(other)
    image, labels = {"image": ("x.png", png.read_bytes())}, {"labels": LABELS}
    served = tmp_path / "served"
    for backend, refused in (("torch", False), ("auto", True)):
        shutil.rmtree(served, ignore_errors=True)
        shutil.copytree(model_dir, served)
        with TestClient(create_app(served, settings=ServeSettings(backend=backend), require_token=False)) as http:
            predicted = http.post("/v1/zero-shot", files=image, data=labels).json()
            shutil.copyfile(other / "model.safetensors", served / "model.safetensors")
            explained = http.post("/v1/explain", files=image, data={**labels, "methods": "patch_text"})
            if refused:
                assert explained.status_code == 503, explained.text
                assert explained.json()["detail"].startswith("the model folder served holds other weights than the "
                                                             "model this service loaded at start"), explained.text
            else:
                assert explained.status_code == 200, explained.text
                assert explained.json()["probabilities"] == pytest.approx(predicted["probabilities"], abs=1e-5)
    shutil.rmtree(served)
    shutil.copytree(model_dir, served)
    with TestClient(create_app(served, require_token=False)) as http:  # auto: channels-last, the torch copy loaded
        predicted = http.post("/v1/zero-shot", files=image, data=labels).json()
        result, output = invoke("ood", "fit", "--model", served, "--data", phantom_dir, "-q")
        assert result.exit_code == 0, output
        explained = http.post("/v1/explain", files=image, data={**labels, "methods": "patch_text"})
        assert explained.status_code == 200, explained.text
        assert "ood_score" not in predicted and "ood_score" not in explained.json()  # the served model has no guard
        assert explained.json()["probabilities"] == pytest.approx(predicted["probabilities"], abs=1e-5)


def test_explain_answers_503_when_the_served_folder_loses_its_weights_or_goes_after_the_start(model_dir, png,
                                                                                              tmp_path, log_lines):
    """A folder mid-redeploy (weights missing) or removed made /v1/explain answer 422, the client's fault, naming the
    server's folder: it is 503 as for replaced weights, and the explanation comes back once the folder does."""
    from fastapi.testclient import TestClient

    served = tmp_path / "served"
    shutil.copytree(model_dir, served)
    image, form = {"image": ("x.png", png.read_bytes())}, {"labels": LABELS, "methods": "patch_text"}
    with TestClient(create_app(served, require_token=False)) as http:  # auto: channels-last, torch copy from the folder
        (served / "model.safetensors").unlink()
        missing = http.post("/v1/explain", files=image, data=form)
        shutil.rmtree(served)
        gone = http.post("/v1/explain", files=image, data=form)
        assert http.post("/v1/zero-shot", files=image, data={"labels": LABELS}).status_code == 200
        for answer in (missing, gone):
            assert answer.status_code == 503, answer.text
            assert answer.json()["detail"].startswith("the model folder served cannot be read since the start")
            assert str(tmp_path) not in answer.text
        shutil.copytree(model_dir, served)
        assert http.post("/v1/explain", files=image, data=form).status_code == 200
    logged = "\n".join(log_lines())
    assert "cannot load the served model folder (ModelError)" in logged and "served" not in logged.replace(
        "the served model folder", "")  # the error type only: the log names no file (README)


def test_refusals_and_abstentions_name_the_services_fields_not_cli_options(client, png):
    """The service's answers said '--where: ...', '(pass --labels a,b,...)' and '(--min-similarity)'."""
    image, token = ("x.png", png.read_bytes()), auth()
    where = client.post("/v1/search", headers=token, files={"image": image}, data={"where": "age > 50 --"})
    assert where.status_code == 422 and where.json()["detail"].startswith("where: unexpected character '-'")
    labels = explain(client, png.read_bytes(), token, labels="nodule")
    assert labels.status_code == 422 and labels.json()["detail"] == (
        "need at least 2 distinct labels to explain a prediction, got ['nodule']: name them (labels a,b,...)")
    draft = client.post("/v1/report/draft", headers=token, files={"image": image}, data={"min_similarity": "1"})
    assert draft.status_code == 200 and draft.json()["abstained"], draft.text
    assert draft.json()["reason"].endswith(" < 1 (min_similarity)"), draft.json()["reason"]
    for answer in (where, labels, draft):
        assert "--" not in answer.text.replace("age > 50 --", ""), answer.text


def test_vqa_answers_as_the_library_for_one_and_two_images(client, vqa_dir, phantom_dir, log_lines):
    from medvl.eval.vqa import answer_with_rationale
    from medvl.models.vqa import load_vqa_model

    films = [record.image for record in load_dataset(phantom_dir).select("test")[:2]]
    model = load_vqa_model(vqa_dir)
    for images in (films[:1], films):
        answer = vqa(client, [path.read_bytes() for path in images])
        assert answer.status_code == 200, answer.text
        expected = answer_with_rationale(model, images, QUESTION)
        shown = answer.json()
        assert shown["answer"] == expected["answer"] and shown["alternative"] == expected["alternative"]
        assert shown["probability"] == pytest.approx(expected["probability"], abs=1e-5)
        assert shown["alternative_probability"] == pytest.approx(expected["alternative_probability"], abs=1e-5)
        assert shown["answer_type"] == expected["answer_type"] and shown["answer"] in model.answers
        assert [h["grid"] for h in shown["heatmaps"]] == [h["grid"] for h in expected["heatmaps"]]
        assert [image["kind"] for image in shown["images"]] == ["png"] * len(images)
        assert shown["input_flags"] == expected["input_flags"] == [{}] * len(images)
        # named as medvl vqa --json names it (the run folder's name; it was the path as typed there)
        assert shown["model"] == expected["model"] == vqa_dir.name
    flagged = vqa(client, [films[0].read_bytes(), _png_bytes(np.zeros((40, 40), np.uint8))])
    assert flagged.status_code == 200 and [list(f) for f in flagged.json()["input_flags"]] == [[], ["blank"]]
    request = _request_line(log_lines, flagged)
    assert request["route"] == "/v1/vqa"
    assert request["status"] == 200 and request["model_ms"] >= 0
    logged = "\n".join(log_lines())
    assert "nodule in the left" not in logged and "film0" not in logged  # no question, no file name


def test_vqa_refuses_an_empty_question_and_too_many_images(client, png, vqa_dir, tmp_path):
    for question in ("", "   "):  # "" was "question: Field required" (a form's empty field reads as missing)
        answer = vqa(client, [png.read_bytes()], question)
        assert answer.status_code == 422 and "the question is empty" in answer.json()["detail"], answer.text
    too_many = vqa(client, [png.read_bytes()] * 3)
    assert too_many.status_code == 422 and "3 images given; the VQA model takes 1 to 2" in too_many.json()["detail"]
    assert vqa(client, [png.read_bytes()], "x" * 1001).status_code == 422
    # under 1,000 characters but past the question encoder's tokens: it was cut there and answered
    long = vqa(client, [png.read_bytes()], "the patient was seen today for a follow up " * 8 + QUESTION)
    assert long.status_code == 422 and "tokens at most" in long.json()["detail"], long.text
    for unread in ("☃ ☃ 你好", "?"):  # no word the question encoder knows: it was answered as if read
        answer = vqa(client, [png.read_bytes()], unread)
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"].startswith("question: the question has no word this VQA model knows")
        assert unread not in answer.json()["detail"]
    partly = vqa(client, [png.read_bytes()], "Is there a ☃ 你好 nodule?")  # answered, its unknown words counted
    assert partly.status_code == 200 and partly.json()["unknown_words"] >= 2, partly.text
    assert vqa(client, [png.read_bytes()], "Is a pulmonary nodule present?").json()["unknown_words"] == 0
    assert vqa(client, [png.read_bytes()]).json()["unknown_words"] == 2  # no phantom question says "left lung"
    # a term no training question holds, spelt by the word-piece tokenizer from known pieces: counted as medvl vqa
    # counts it (it was 0: only unknown tokens counted)
    unseen = vqa(client, [png.read_bytes()], "Is there atelectasis?")
    result, output = invoke("vqa", png, "--model", vqa_dir, "--question", "Is there atelectasis?", "--json",
                            tmp_path / "answer.json")
    assert result.exit_code == 0, output
    assert unseen.status_code == 200 and unseen.json()["unknown_words"] == 1, unseen.text
    assert json.loads((tmp_path / "answer.json").read_text())["unknown_words"] == 1
    assert vqa(client, [b"GIF89a" + b"\0" * 200]).status_code == 415
    assert client.post("/v1/vqa", headers=auth(), data={"question": QUESTION}).status_code == 422  # no image


def test_a_refused_film_of_several_is_named_by_its_place(client, png):
    """A truncated second film was refused as 'corrupt or truncated image' without saying which of the two."""
    whole = png.read_bytes()
    answer = vqa(client, [whole, whole[: len(whole) // 2]])
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"].startswith("image 2 of 2: corrupt or truncated image"), answer.text
    assert vqa(client, [b"GIF89a" + b"\0" * 200, whole]).json()["detail"].startswith("image 1 of 2: unsupported")


def test_without_a_vqa_model_vqa_is_409_and_the_page_is_told(model_dir, png):
    from fastapi.testclient import TestClient

    app = create_app(model_dir, token_digests=[token_digest(TOKENS[0])])
    with TestClient(app) as http:
        answer = vqa(http, [png.read_bytes()], headers=auth(TOKENS[0]))
        assert answer.status_code == 409 and "--vqa-model" in answer.json()["detail"]
        described = http.get("/v1/models", headers=auth(TOKENS[0])).json()["models"][0]
        assert described["vqa"] is None and described["explain"]["concepts"] is None
        explained = explain(http, png.read_bytes(), headers=auth(TOKENS[0]), labels="nodule,no_finding")
        assert explained.status_code == 200 and "neighbours" not in explained.json()  # no index: no cases
        assert all("concepts" not in finding for finding in explained.json()["findings"])



def test_vqa_refuses_a_body_over_the_images_it_takes_before_reading_it(client, model_dir, png):
    """/v1/vqa let in 4 uploads' worth (--max-upload-mb each) whatever the VQA model takes, and with no VQA model at
    all: read in full, then refused (422 'the VQA model takes 1 to 2', 409). A body over the images the model takes,
    or over one image without a model, is now refused (413) from its Content-Length, before it is read."""
    from fastapi.testclient import TestClient

    form = {"Content-Type": "multipart/form-data; boundary=B"}
    limit = client.get("/v1/models", headers=auth()).json()["models"][0]["vqa"]["max_images"]
    assert limit < ServeSettings().max_vqa_images
    answer = client.post("/v1/vqa", headers={**auth(), **form}, content=b"x" * (UPLOAD_LIMIT * (limit + 1)))
    assert answer.status_code == 413 and "per image" in answer.json()["detail"], answer.text
    app = create_app(model_dir, token_digests=[token_digest(TOKENS[0])],
                     settings=ServeSettings(max_upload_bytes=UPLOAD_LIMIT, rate_limit=0))
    with TestClient(app) as http:
        answer = http.post("/v1/vqa", headers={**auth(TOKENS[0]), **form}, content=b"x" * (UPLOAD_LIMIT * 2))
        assert answer.status_code == 413 and "per image" not in answer.json()["detail"], answer.text
        assert vqa(http, [png.read_bytes()], headers=auth(TOKENS[0])).status_code == 409


def test_a_bottleneck_of_another_embedding_size_is_refused_at_start(model_dir, bottleneck_file, tmp_path):
    """Refused naming the file (the message named only its name, and the CLI's none at all)."""
    import re

    from medvl.explain.concepts import ConceptBottleneck

    other = ConceptBottleneck.load(bottleneck_file)
    other.concept_vectors = other.concept_vectors[:, :8]
    other.save(tmp_path / "other.json")
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "other.json")) + ": .*8 dimensions, the model"):
        create_app(model_dir, settings=ServeSettings(bottleneck=tmp_path / "other.json"), require_token=False)
    other = ConceptBottleneck.load(bottleneck_file)
    other.model = {**other.model, "weights_sha256": "0" * 64}  # the same size, fitted with other weights
    other.save(tmp_path / "weights.json")
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "weights.json"))
                       + ": the concept bottleneck was fitted with another"):
        create_app(model_dir, settings=ServeSettings(bottleneck=tmp_path / "weights.json"), require_token=False)
    result, output = invoke("serve", "--model", model_dir, "--vqa-model", tmp_path / "missing", "--no-auth")
    assert result.exit_code == 2 and "not found" in output


def test_a_damaged_bottleneck_is_refused_at_start_not_on_every_request(model_dir, bottleneck_file, tmp_path):
    from medvl.errors import DataError

    data = json.loads(bottleneck_file.read_text())
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps({**data, "mean": data["mean"][:-1]}))
    with pytest.raises(DataError, match=r"damaged.json: not a concept bottleneck file \(mean is"):
        create_app(model_dir, settings=ServeSettings(bottleneck=damaged), require_token=False)
    result, output = invoke("serve", "--model", model_dir, "--bottleneck", damaged, "--no-auth")
    assert result.exit_code == 2 and "not a concept bottleneck file" in output and "Traceback" not in output


def test_zero_shot_answers_while_an_explanation_holds_the_heavy_lane(server, client, png):
    lane = server.app.state.service.lane
    gate = threading.Event()
    lane.thread.submit(gate.wait, 30)  # the lane's one thread is busy, as with a long explanation
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(explain, client, png.read_bytes(), None, labels="nodule,no_finding")
            started = time.monotonic()
            answer = zero_shot(client, png.read_bytes())
            assert answer.status_code == 200 and time.monotonic() - started < 10
            assert not waiting.done()  # the explanation waits for the lane, zero-shot did not
            gate.set()
            assert waiting.result(timeout=60).status_code == 200
    finally:
        gate.set()


def test_the_heavy_lane_runs_one_at_a_time_and_refuses_beyond_its_queue():
    from medvl.serve.lane import HeavyLane

    gate = threading.Event()

    async def run():
        lane = HeavyLane(max_waiting=1)
        first = asyncio.ensure_future(lane.run(gate.wait, 30))
        second = asyncio.ensure_future(lane.run(lambda: "second"))
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceBusy, match="too many explanation / VQA requests waiting"):
            await lane.run(lambda: "third")
        gate.set()
        results = await asyncio.gather(first, second)
        lane.close()
        with pytest.raises(ServiceBusy, match="shutting down"):
            await lane.run(lambda: None)
        return results

    assert asyncio.run(run()) == [True, "second"]


def test_a_busy_heavy_lane_answers_503_with_retry_after(server, client, png):
    """The 429s carried Retry-After, the heavy lane's 'retry shortly' 503 did not: a client could not back off."""
    lane = server.app.state.service.lane
    gate, token = threading.Event(), auth()  # one token: 6 requests, within its burst
    lane.thread.submit(gate.wait, 60)  # the lane's one thread is busy, as with a long explanation
    try:
        full = lane.max_waiting + 1  # requests on the lane when it is full: one computing, max_waiting waiting
        with ThreadPoolExecutor(full) as pool:
            waiting = [pool.submit(explain, client, png.read_bytes(), token, labels="nodule,no_finding",
                                   methods="patch_text") for _ in range(full)]
            deadline = time.monotonic() + 30
            while lane.pending < full and time.monotonic() < deadline:
                time.sleep(0.02)
            busy = explain(client, png.read_bytes(), token, labels="nodule,no_finding", methods="patch_text")
            gate.set()
            assert all(future.result(timeout=120).status_code == 200 for future in waiting)
    finally:
        gate.set()
    assert busy.status_code == 503 and "retry shortly" in busy.json()["detail"], busy.text
    assert int(busy.headers["Retry-After"]) >= 1


# ------------------------------------------------------------------------------- OpenAPI docs


def test_the_docs_load_nothing_from_another_host_and_their_files_are_served(client):
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page.text, re.IGNORECASE), page.text
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert any(url.endswith(".js") for url in referenced) and any(url.endswith(".css") for url in referenced)
    for url in referenced:
        assert url.startswith("/")
        answer = client.get(url)
        assert answer.status_code == 200 and answer.content, url
        if url.endswith(".js"):
            assert "SwaggerUIBundle" in answer.text and len(answer.content) > 100_000  # the real bundle
    assert "validatorUrl" in page.text  # no validation badge fetched from validator.swagger.io
    assert client.get("/redoc").status_code == 404
    schema = client.get("/openapi.json").json()
    assert {"/v1/explain", "/v1/vqa"} <= set(schema["paths"])
    assert schema["paths"]["/v1/vqa"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/v1/health"]["get"]


def test_the_openapi_document_declares_each_routes_refusals_with_the_body_they_have_and_the_checked_limits(
        client, png):
    """Every POST route declared only 200 and FastAPI's 422, whose ``detail`` is a list of ``{loc, msg, type}``, while
    every real refusal has ``detail`` as one string; 401 / 403 / 404 / 409 / 413 / 415 / 429 / 503 were not declared, so
    a client generated from the document failed on every error. ``target`` and ``window`` had no allowed values,
    ``k`` and ``top`` no limits. Each route declares its refusals with their real body, which real answers validate
    against, and the values and limits the service checks."""
    import jsonschema

    from medvl.clinical.windowing import WINDOW_PRESETS
    from medvl.index.base import MAX_K, TARGETS
    from medvl.index.where import MAX_LENGTH
    from medvl.rag.draft import MIN_CASES

    document = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            statuses = {int(status) for status in operation["responses"] if status != "200"}
            expected = {503} if path == "/v1/health" else {401, 429, 503}
            expected |= {400, 408, 413, 415, 422} if method == "post" else set()
            expected |= {"/v1/vqa": {409}, "/v1/cases/{case_id}/thumbnail": {403, 404, 422}}.get(path, set())
            assert statuses == expected, (path, statuses)

    def declared(path: str, method: str, status: int) -> dict:  # its $ref resolved within the document
        response = document["paths"][path][method]["responses"][str(status)]
        return {**response["content"]["application/json"]["schema"], "components": document["components"]}

    image = {"image": ("x.png", png.read_bytes(), "image/png")}
    case = quote("images/no-such-case", safe="")
    answers = [("/v1/search", "post", client.post("/v1/search", files=image, data={"k": "abc"}, headers=auth())),
               ("/v1/search", "post", client.post("/v1/search", data={"text": "x", "K": "3"}, headers=auth())),
               ("/v1/search", "post", client.post("/v1/search", data={"text": "x", "target": "x"}, headers=auth())),
               ("/v1/zero-shot", "post", client.post("/v1/zero-shot", data={"labels": "a,b"}, headers=auth())),
               ("/v1/zero-shot", "post", zero_shot(client, b"GIF89a" + b"\0" * 200)),
               ("/v1/embed", "post", client.post("/v1/embed", files=image)),
               ("/v1/cases/{case_id}/thumbnail", "get", client.get(f"/v1/cases/{case}/thumbnail", headers=auth()))]
    assert [answer.status_code for *_, answer in answers] == [422, 422, 422, 422, 415, 401, 404]
    for path, method, answer in answers:
        body = answer.json()
        jsonschema.validate(body, declared(path, method, answer.status_code))
        assert isinstance(body["detail"], str), body

    def form(path: str) -> dict:
        reference = document["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        return document["components"]["schemas"][reference.rsplit("/", 1)[1]]["properties"]

    search, draft, explain = form("/v1/search"), form("/v1/report/draft"), form("/v1/explain")
    assert search["target"]["enum"] == list(TARGETS)
    check_window_schema(form("/v1/preview")["window"], WINDOW_PRESETS)
    assert (search["k"]["minimum"], search["k"]["maximum"], explain["k"]["maximum"]) == (1, MAX_K, MAX_K)
    assert draft["k"]["minimum"] == MIN_CASES and draft["min_support"]["exclusiveMaximum"] == 1
    assert (explain["top"]["minimum"], explain["top"]["maximum"]) == (1, ServeSettings().max_explain_top)
    assert search["where"]["maxLength"] == draft["where"]["maxLength"] == MAX_LENGTH
    refused = client.post("/v1/search", data={"text": "x", "k": str(MAX_K + 1)}, headers=auth())
    assert refused.status_code == 422 and str(MAX_K) in refused.json()["detail"]  # the limit declared is the one met
    # /v1/vqa's question was declared optional (default ''), though refused without one, and its images unlimited
    reference = document["paths"]["/v1/vqa"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    body = document["components"]["schemas"][reference.rsplit("/", 1)[1]]
    question, films = body["properties"]["question"], body["properties"]["image"]
    assert set(body["required"]) == {"image", "question"} and "default" not in question
    assert question["minLength"] == 1 and question["type"] == "string"
    assert (films["minItems"], films["maxItems"]) == (1, ServeSettings().max_vqa_images)
    missing = client.post("/v1/vqa", files=image, headers=auth())  # refused as declared, in the library's words
    assert missing.status_code == 422 and "the question is empty" in missing.json()["detail"], missing.text
    too_many = client.post("/v1/vqa", data={"question": "is there a nodule?"}, headers=auth(),
                           files=[("image", ("x.png", png.read_bytes(), "image/png"))] * (films["maxItems"] + 1))
    assert too_many.status_code in (413, 422), too_many.text


def check_window_schema(schema: dict, presets) -> None:
    """The preview's ``window`` declared as the service reads it: a strict lower-case enum refused ``LUNG`` or
    ``soft tissue``, which the service takes (any case, '-' or a space for '_', blank for none). The declared schema
    now takes exactly the names ``parse_window`` takes."""
    import jsonschema

    from medvl.serve.previews import parse_window

    def taken(name: str) -> bool:
        try:
            parse_window(name)
        except InputError:
            return False
        return True

    declared = jsonschema.Draft202012Validator(schema)
    names = [*presets, *(name.upper() for name in presets), "Soft Tissue", "soft-tissue", " Lung ", "", "  ",
             "liver", "lungs", "lung;", "soft__tissue", "soft_ tissue", "lung window", "-600,1500", "lung\nbone",
             "\ufefflung", "lung\x1f", "lung\x85", "\tlung\r\n"]
    assert [declared.is_valid(name) for name in names] == [taken(name) for name in names], names
    assert sum(map(taken, names)) == 2 * len(presets) + 6 and "enum" not in schema
    assert schema["examples"] == list(presets) and "any case" in schema["description"]


# ------------------------------------------------------------------------------- medvl serve


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_medvl_serve_answers_health_within_10_s_and_drains_on_sigterm(model_dir, png):
    port, token = _free_port(), TOKENS[-1]
    env = {**os.environ, "MEDVL_API_TOKENS": token}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "medvl.cli.main", "serve", "--model", str(model_dir),
                                "--port", str(port), "--max-wait-ms", "20", "--torch-threads", "1"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            alive = _wait_for(http, process, started, {"loading", "ok"})
            _wait_for(http, process, started, {"ok"})
            with ThreadPoolExecutor(6) as pool:
                pending = [pool.submit(_status, http, png.read_bytes(), token) for _ in range(6)]
                time.sleep(0.05)
                process.send_signal(signal.SIGTERM)
                statuses = [future.result() for future in pending]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert alive < 10, f"health answered after {alive:.1f} s"
    assert process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    # answered requests were finished before the queue closed; later ones found the port closed
    assert set(statuses) <= {200, "closed"} and statuses.count(200) >= 1, statuses
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("message") == "request"]
    assert requests and all(line["request_id"] and "ms" in line for line in requests)
    assert any(line.get("message") == "micro-batcher stopped" for line in lines)
    start = next(line for line in lines if line.get("message") == "serving")
    # medvl[serve]; the backend is auto's choice for a medvl model
    assert (start["backend"], start["http"], start["loop"]) == ("torch-channels-last", "httptools", "uvloop")
    assert start["torch_threads"] == 1


def test_a_client_cannot_pose_as_other_addresses_with_x_forwarded_for(model_dir):
    """The real server (uvicorn): requests without a valid token are slowed per client address, and a loopback
    client's X-Forwarded-For header does not make it another address (it did: 100 forged addresses, no 429)."""
    port, started = _free_port(), time.monotonic()
    env = {**os.environ, "MEDVL_API_TOKENS": TOKENS[0]}
    process = subprocess.Popen([sys.executable, "-m", "medvl.cli.main", "serve", "--model", str(model_dir),
                                "--port", str(port), "--failed-auth-burst", "3", "--torch-threads", "1"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            _wait_for(http, process, started, {"ok"})
            statuses = [http.get("/v1/models", headers={"X-Forwarded-For": f"10.0.{i // 250}.{i % 250}"}).status_code
                        for i in range(6)]
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert statuses == [401, 401, 401, 429, 429, 429]


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_allowance(model_dir):
    """--trusted-proxy 127.0.0.1: the X-Forwarded-For of a request from that proxy names the client counted for
    requests without a valid token (the last address in the header that is not a trusted proxy itself)."""
    port, started = _free_port(), time.monotonic()
    env = {**os.environ, "MEDVL_API_TOKENS": TOKENS[0]}
    process = subprocess.Popen([sys.executable, "-m", "medvl.cli.main", "serve", "--model", str(model_dir),
                                "--port", str(port), "--failed-auth-burst", "3", "--torch-threads", "1",
                                "--trusted-proxy", "127.0.0.1", "--trusted-proxy", "10.9.0.0/16"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            _wait_for(http, process, started, {"ok"})

            def status(forwarded: str) -> int:
                return http.get("/v1/models", headers={"X-Forwarded-For": forwarded}).status_code

            first = [status("203.0.113.7") for _ in range(4)]
            other = status("198.51.100.2")
            # a client's own header before the proxies' addresses: the last untrusted one is the client
            chained = [status("198.51.100.2, 203.0.113.7, 10.9.3.4"), status("6.6.6.6, 198.51.100.2")]
            valid = http.get("/v1/models", headers={"X-Forwarded-For": "203.0.113.7",
                                                     "Authorization": f"Bearer {TOKENS[0]}"}).status_code
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert first == [401, 401, 401, 429]
    assert other == 401  # its own allowance
    assert chained == [429, 401]  # 203.0.113.7 (spent); 198.51.100.2 (its second of three)
    assert valid == 200  # a valid token is rate-limited per token, not per address
    start = next(json.loads(line) for line in stderr.splitlines() if '"serving"' in line)
    assert start["trusted_proxies"] == ["127.0.0.1/32", "10.9.0.0/16"]


@pytest.mark.parametrize("value", ["localhost", "*", "10.0.0.0/33"])
def test_a_trusted_proxy_must_be_an_address_or_network(model_dir, value):
    result, output = invoke("serve", "--model", model_dir, "--trusted-proxy", value)
    assert result.exit_code == 2
    assert "--trusted-proxy" in output and "not an IP address or network" in output


# ------------------------------------------------------------------ slow clients, uploads in flight (real sockets)

def _form_body(image: bytes) -> bytes:
    """A multipart body of one ``image`` field (boundary ``B``)."""
    return (b'--B\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
            + image + b"\r\n--B--\r\n")


def _post_head(token: str, length: int | None, route: str = "/v1/embed") -> bytes:
    """A POST's request line and headers: ``Content-Length: length``, or a chunked body when ``length`` is None."""
    size = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return (f"POST {route} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: multipart/form-data; boundary=B\r\n{size}\r\n\r\n").encode()


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))


def _answer(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes] | None:
    """One HTTP answer read from ``sock``: (status, headers with lower-case names, body); None when the connection
    closes without one or nothing comes within ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = (line.partition(":") for line in lines[1:])
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except TimeoutError:
        return None
    return int(lines[0].split()[1]), headers, body


def _seconds_until_closed(sock: socket.socket, since: float, limit: float = 5.0) -> float | None:
    """Seconds from ``since`` until the server closes ``sock`` (None: still open after ``limit`` seconds)."""
    sock.settimeout(max(limit - (time.monotonic() - since), 0.01))
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except OSError:  # reset
        pass
    return time.monotonic() - since


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_connection_not_finishing_its_headers_in_time_is_closed_and_logged_without_client_data(
        model_dir, log_lines, parser):
    """uvicorn has no deadline for request headers: a connection sending half of its headers stayed open for
    ever, and about a thousand of them (ulimit -n) made the service unreachable, with nothing in the log (the
    token check and its rate limits run once the headers are complete). It is closed after header_timeout
    seconds from its opening, and from the answer before on a kept-alive connection; headers that arrive in
    pieces within the time are answered; one WARNING line counts the closed connections."""
    from medvl.serve.connections import http_protocol

    app = create_app(model_dir, settings=ServeSettings(header_timeout=0.5), token_digests=[token_digest(TOKENS[0])])
    with Server(app, http=http_protocol(parser)) as server:
        half, opened = _connect(server), time.monotonic()
        half.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # never finished
        kept = _connect(server)
        kept.sendall(b"GET /v1/health HTTP/1.1\r\n")
        time.sleep(0.2)
        kept.sendall(b"Host: x\r\n\r\n")  # in two pieces, complete within the time
        health = _answer(kept)
        answered = time.monotonic()
        time.sleep(0.2)
        kept.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # the next request, never finished
        half_closed = _seconds_until_closed(half, opened)
        kept_closed = _seconds_until_closed(kept, answered)
        unbroken = httpx.get(f"{server.url}/v1/health", timeout=10).status_code
        half.close()
        kept.close()
    assert health is not None and health[0] == 200
    assert half_closed is not None and 0.45 <= half_closed < 4, half_closed
    # uvicorn's own keep-alive timeout (5 s) does not apply: the second request's first bytes cancelled it
    assert kept_closed is not None and 0.45 <= kept_closed < 4, kept_closed
    assert unbroken == 200
    warnings = [json.loads(line) for line in log_lines() if '"medvl.serve.connections"' in line]
    assert warnings and warnings[0]["level"] == "WARNING" and warnings[0]["connections"] == 1, warnings
    assert "127.0.0.1" not in json.dumps(warnings) and "health" not in json.dumps(warnings)


def test_a_body_trickling_in_is_refused_408_and_one_arriving_in_time_is_answered(model_dir, png):
    """A client that sent its headers and then one byte every few seconds held its request (and its upload's
    memory) for ever. A body gets body_timeout seconds and one more per min_body_rate bytes received."""
    app = create_app(model_dir, settings=ServeSettings(body_timeout=1.0, rate_limit=0),
                     token_digests=[token_digest(TOKENS[0])])
    body = _form_body(png.read_bytes())
    with Server(app) as server:
        paced = _connect(server)
        paced.sendall(_post_head(TOKENS[0], len(body)) + body[: len(body) // 2])
        time.sleep(0.5)
        paced.sendall(body[len(body) // 2:])
        in_time = _answer(paced, timeout=30)
        trickle, started = _connect(server), time.monotonic()
        trickle.sendall(_post_head(TOKENS[0], len(body)) + body[:200])
        for offset in range(200, 230):  # a byte every 0.2 s
            if select.select([trickle], [], [], 0.2)[0]:
                break
            trickle.sendall(body[offset:offset + 1])
        refused = _answer(trickle, timeout=1)
        took = time.monotonic() - started
        closed = _seconds_until_closed(trickle, time.monotonic(), limit=2)
        paced.close()
        trickle.close()
    assert in_time is not None and in_time[0] == 200, in_time
    assert refused is not None and refused[0] == 408, refused
    assert "did not arrive in time" in json.loads(refused[2])["detail"] and refused[1]["connection"] == "close"
    assert 0.9 < took < 4 and closed is not None


def test_uploads_in_flight_are_bounded_and_a_request_beyond_is_503_before_its_body_is_read(model_dir):
    """Uploads are held in memory (never on disk), and nothing bounded how many: 60 clients each holding back
    the last bytes of a 30 MB upload took 1.8 GB. The bytes of the bodies in flight are bounded: a declared body
    that would go over is refused at once (503, Retry-After), a chunked one as it streams in; the budget is
    given back when a request ends, and /v1/models reports it."""
    from medvl.serve.settings import FORM_OVERHEAD

    image = _png_bytes((np.random.default_rng(0).random((480, 480)) * 255).astype(np.uint8))
    body = _form_body(image)
    budget = 2 * (UPLOAD_LIMIT + FORM_OVERHEAD)  # room for two of these bodies, not three
    assert 2 * len(body) <= budget < 3 * len(body) and len(image) <= UPLOAD_LIMIT
    settings = ServeSettings(max_upload_bytes=UPLOAD_LIMIT, max_vqa_images=1, max_inflight_bytes=budget, rate_limit=0)
    app = create_app(model_dir, settings=settings, token_digests=[token_digest(TOKENS[0])])
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        limits = http.get("/v1/models", headers=auth(TOKENS[0])).json()["models"][0]["limits"]
        held = [_connect(server), _connect(server)]
        for sock in held:  # all but the last bytes: the request waits for them, its upload in memory
            sock.sendall(_post_head(TOKENS[0], len(body)) + body[:-100])
        time.sleep(0.5)
        third = _connect(server)
        third.sendall(_post_head(TOKENS[0], len(body)))  # headers only: refused before any byte of its body
        busy = _answer(third)
        chunked = _connect(server)
        chunked.sendall(_post_head(TOKENS[0], None) + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        busy_chunked = _answer(chunked)
        for sock in held:
            sock.sendall(body[-100:])
        answers = [_answer(sock, timeout=30) for sock in held]
        time.sleep(0.2)
        after = http.post("/v1/embed", headers=auth(TOKENS[0]), files={"image": ("x.png", image)})
        for sock in (*held, third, chunked):
            sock.close()
    assert limits == {"max_upload_bytes": UPLOAD_LIMIT, "max_inflight_bytes": budget}
    assert [answer and answer[0] for answer in answers] == [200, 200]
    assert busy is not None and busy[0] == 503 and busy[1]["retry-after"] == "2", busy
    assert json.loads(busy[2])["detail"].startswith("too many uploads in flight (the service takes in 0.6 MiB")
    assert busy_chunked is not None and busy_chunked[0] == 503 and busy_chunked[1]["retry-after"] == "2"
    assert after.status_code == 200, after.text  # the budget was given back


def test_the_in_flight_budget_defaults_to_eight_uploads_and_holds_the_largest_body(tmp_path):
    """The largest body is /v1/vqa's uploads with a VQA model, one upload without (the route then takes one file and
    answers 409): a budget of 0.2 MiB for 0.05 MiB uploads was refused as too small for 4 of them. The budget
    refused is said rounded (it said 0.0999994 MiB)."""
    from medvl.serve.settings import FORM_OVERHEAD, MIB

    # validate checks only that the VQA folder exists: no model is loaded here
    assert ServeSettings().inflight_limit == 8 * (32 * MIB + FORM_OVERHEAD)  # 256.5 MiB
    assert ServeSettings(max_upload_bytes=MIB, max_vqa_images=16, vqa_model=tmp_path).inflight_limit == \
        16 * MIB + FORM_OVERHEAD
    assert ServeSettings(max_upload_bytes=MIB, max_vqa_images=16).inflight_limit == 8 * (MIB + FORM_OVERHEAD)
    assert ServeSettings(max_inflight_bytes=200 * MIB).validate().inflight_limit == 200 * MIB
    assert ServeSettings(max_inflight_bytes=100 * MIB).validate().inflight_limit == 100 * MIB  # no VQA model
    small = int(0.05 * MIB)
    assert ServeSettings(max_upload_bytes=small, max_inflight_bytes=int(0.2 * MIB)).validate().largest_body == \
        small + FORM_OVERHEAD
    with pytest.raises(InputError, match=r"max_inflight_bytes must hold the largest request body, 128\.06 MiB "
                                         r"\(/v1/vqa's 4 uploads and their form\), got 100 MiB"):
        ServeSettings(max_inflight_bytes=100 * MIB, vqa_model=tmp_path).validate()
    with pytest.raises(InputError, match=r"largest request body, 0\.11 MiB \(one upload and its form\), "
                                         r"got 0\.1 MiB$"):
        ServeSettings(max_upload_bytes=small, max_inflight_bytes=int(0.1 * MIB)).validate()


def test_an_upload_over_1_mib_is_not_spooled_to_disk(model_dir, monkeypatch):
    """Starlette writes a multipart file part over 1 MiB to a temporary file; within the upload limit the
    service keeps it in memory (a patient image never reaches disk)."""
    from PIL import Image
    from starlette.testclient import TestClient

    rolled = []
    original = tempfile.SpooledTemporaryFile.rollover

    def rollover(self):
        rolled.append(1)
        return original(self)

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", rollover)
    stream = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((900, 900, 3)) * 255).astype(np.uint8)).save(stream, "PNG")
    assert stream.tell() > 2 * 1024 * 1024
    app = create_app(model_dir, settings=ServeSettings(max_upload_bytes=8 * 1024 * 1024), require_token=False)
    with TestClient(app) as http:
        answer = http.post("/v1/zero-shot", files={"image": ("big.png", stream.getvalue())}, data={"labels": LABELS})
        # a part over the upload limit but within the body limit (the VQA route takes several uploads) is refused
        # once read, still from memory: it was spooled to disk first
        over = http.post("/v1/vqa", files={"image": ("big.png", stream.getvalue() + bytes(6 * 1024 * 1024))},
                         data={"question": "Is there a nodule?"})
    assert answer.status_code == 200, answer.text
    assert over.status_code in (409, 413), over.text  # no VQA model here: refused after the form was read
    assert not rolled


def test_rate_limit_counters_stay_bounded():
    from medvl.serve import auth

    limiter = auth.TokenAuth(digests=[], failure_rate=1.0, failure_burst=2)
    for i in range(auth.MAX_BUCKETS + 500):  # as many addresses, each failing once
        limiter.failure_retry_after(f"10.{i}", now=0.0)
    assert len(limiter._buckets) <= auth.MAX_BUCKETS
    limiter.failure_retry_after("last", now=0.0)
    assert limiter.failure_retry_after("last", now=0.0) == 0.0 and limiter.failure_retry_after("last", now=0.0) > 0


def test_torch_threads_set_the_model_threads_forward_passes(model_dir, png):
    """In a process of its own: the setting is torch's, process-wide."""
    script = (
        "import sys, torch\n"
        "from medvl.serve.service import ModelService\n"
        "from medvl.serve.settings import ServeSettings\n"
        "default = torch.get_num_threads()\n"
        "service = ModelService(sys.argv[1], None, ServeSettings(torch_threads=1).validate())\n"
        "on_model = service.model_thread.submit(torch.get_num_threads).result()\n"
        "plain = ModelService(sys.argv[1], None, ServeSettings().validate())\n"
        "print(default, on_model, plain.model_thread.submit(torch.get_num_threads).result())\n")
    default, on_model, plain = map(int, _two_thread_python(script, model_dir).split())
    assert (default, on_model) == (2, 1)
    assert plain == 1  # torch's setting is the process's: a second service in it keeps it


def test_torch_threads_reach_the_onnx_sessions(model_dir, tmp_path):
    """The ONNX sessions take their thread count when the model loads: --torch-threads is set before it."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from medvl.scale import export_onnx

    exported = export_onnx(model_dir, out=tmp_path / "exported", int8=False).parent
    script = (
        "import sys, torch\n"
        "from medvl.serve.service import ModelService\n"
        "from medvl.serve.settings import ServeSettings\n"
        "service = ModelService(sys.argv[1], None, ServeSettings(backend='onnx', torch_threads=1).validate())\n"
        "print(*(s.get_session_options().intra_op_num_threads for s in service.net.sessions.values()))\n")
    assert _two_thread_python(script, exported).split() == ["1", "1"]


def _two_thread_python(script: str, model: Path) -> str:
    """What ``script`` prints, run with ``model`` as its argument in a Python process of its own on 2 threads."""
    done = subprocess.run([sys.executable, "-c", script, str(model)], env={**os.environ, "OMP_NUM_THREADS": "2"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _wait_for(http, process, started: float, statuses: set[str]) -> float:
    """Seconds from ``started`` until ``/v1/health`` reports one of ``statuses``."""
    while True:
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() - started < 60, f"health never reported {statuses}"
        try:
            if http.get("/v1/health").json()["status"] in statuses:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.05)


def _status(http, image: bytes, token: str):
    try:
        return zero_shot(http, image, "x.png", auth(token)).status_code
    except httpx.TransportError:
        return "closed"


def test_no_auth_is_refused_off_loopback(model_dir):
    result, output = invoke("serve", "--model", model_dir, "--host", "0.0.0.0", "--no-auth")
    assert result.exit_code == 2 and "loopback" in output


def test_serve_options_are_refused_in_one_line_naming_the_option_typed(model_dir, monkeypatch):
    """--max-upload-mb nan / inf crashed with a traceback (exit 1) when converted to bytes; a value below one byte
    was refused as 'max_upload_bytes ... got 0', and --max-batch 0 as 'max_batch': the settings' names, not the
    options'. --max-pixels above the decoder's own limit (100 M) was taken, and a larger image refused with 422 naming
    that limit, one the operator never set."""
    from medvl.data.images import MAX_PIXELS

    with pytest.raises(InputError, match="max_pixels must be <= 100000000, got 100000001"):
        ServeSettings(max_pixels=MAX_PIXELS + 1).validate()
    monkeypatch.setenv("MEDVL_API_TOKENS", TOKENS[0])
    for options, reason in ((["--max-pixels", "200000000"], "--max-pixels must be <= 100000000, got 200000000"),
                            (["--max-upload-mb", "nan"], "--max-upload-mb must be a finite number, got nan"),
                            (["--max-upload-mb", "inf"], "--max-upload-mb must be a finite number, got inf"),
                            (["--max-upload-mb", "-1"], "--max-upload-mb must allow at least one byte (> 0), got -1"),
                            (["--max-upload-mb", "0.0000001"],
                             "--max-upload-mb must allow at least one byte (> 0), got 1e-07"),
                            (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
                            (["--rate-burst", "0"], "--rate-burst must be >= 1"),
                            (["--max-wait-ms", "inf"], "--max-wait-ms must be a finite number"),
                            (["--max-inflight-mb", "0"], "--max-inflight-mb must be > 0, got 0"),
                            (["--max-inflight-mb", "20"], "--max-inflight-mb must hold the largest request body, "
                                                          "32.06 MiB (one upload and its form), got 20 MiB"),
                            (["--header-timeout", "0"], "--header-timeout must be > 0"),
                            (["--body-timeout", "nan"], "--body-timeout must be a finite number")):
        result, output = invoke("serve", "--model", model_dir, "--port", _free_port(), *options)
        assert result.exit_code == 2, (options, output)
        errors = {line for line in output.splitlines() if line.startswith("error:")}  # result.output holds stderr too
        assert len(errors) == 1 and reason in output and "max_" not in output and "Traceback" not in output, output


def test_a_port_out_of_range_or_taken_is_refused_before_the_model_loads(model_dir, monkeypatch):
    """--port 70000 listened on 4464 (70000 - 65536) while the log announced 70000; a taken port failed only after
    the model had loaded, as a JSON log line and exit 3."""
    monkeypatch.setenv("MEDVL_API_TOKENS", TOKENS[0])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result, output = invoke("serve", "--model", model_dir, "--port", port)
        assert result.exit_code == 2, output
        assert f"error: --host 127.0.0.1 --port {port}: cannot listen there" in output, output
        assert "model ready" not in output and time.monotonic() - started < 5
    for port, reason in ((70000, "--port must be <= 65535, got 70000"), (0, "--port must be >= 1, got 0"),
                         (-5, "--port must be >= 1, got -5")):
        result, output = invoke("serve", "--model", model_dir, "--port", port)
        assert result.exit_code == 2 and reason in output, output


def test_the_weights_hash_is_computed_once_per_loaded_model_and_again_after_a_change(model_dir):
    import torch

    from medvl.index.base import _WEIGHTS_SHA256, model_fingerprint, weights_sha256

    model = load_model(model_dir)
    first = weights_sha256(model)
    assert model in _WEIGHTS_SHA256 and weights_sha256(model) == first
    assert model_fingerprint(model)["weights_sha256"] == first == weights_sha256(load_model(model_dir))
    original = model.logit_scale.detach().clone()
    with torch.no_grad():
        model.logit_scale.add_(1.0)  # an in-place change, as an optimizer step makes
    assert weights_sha256(model) != first
    with torch.no_grad():
        model.logit_scale.copy_(original)
    assert weights_sha256(model) == first
