"""The reading page in a real browser: Debian's Chromium, headless, driven by playwright, against the real
service on 127.0.0.1 (a tiny model trained on a phantom, an index built by ``medvl index build``, a
concept bottleneck fitted by ``medvl explain``, a tiny VQA model trained by ``medvl train vqa``).
A real chest X-ray from ../shared/data is uploaded and every panel (the heatmap overlay over the image
and the VQA answer included) is checked against the API's own answer for the same upload; the
browser may reach 127.0.0.1 only, and keeps nothing."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is not installed (scripts/chromium.sh install)", allow_module_level=True)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cli_helpers import invoke  # noqa: E402
from medvl.serve import ServeSettings, create_app  # noqa: E402
from medvl.serve.auth import token_digest  # noqa: E402
from serve_helpers import (  # noqa: E402
    Server,
    build_case_index,
    fit_concept_bottleneck,
    train_tiny_model,
    train_tiny_vqa_model,
)

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO_ROOT / "docs" / "images" / "reading-page.png"
SCREENSHOT_LIMIT = 300 * 1024
CHEST_XRAY = Path("vqa-rad") / "images" / "synpic18319.jpg"  # VQA-RAD (CC0): a PA chest X-ray with nodules
TOKENS = [f"page-test-token-{n:02d}-{'y' * 12}" for n in range(46)]
WRONG_TOKEN = "not-a-valid-token-" + "z" * 12
PANELS = ("zero-shot", "explain", "similar", "draft")
QUESTION = "Is there a nodule?"
ANSWER_MS = 60_000
MAX_REQUESTS = 40  # what one test's page may ask of the service at most


@pytest.fixture(scope="module")
def model_dir(phantom_dir, tmp_path_factory):
    """A phantom model with an OOD guard: a real chest X-ray is unlike its training images."""
    model = train_tiny_model(phantom_dir, tmp_path_factory.mktemp("page") / "run")
    result, output = invoke("ood", "fit", "--model", model, "--data", phantom_dir, "-q")
    assert result.exit_code == 0, output
    return model


@pytest.fixture(scope="module")
def index_dir(model_dir, phantom_dir, tmp_path_factory):
    return build_case_index(model_dir, phantom_dir, tmp_path_factory.mktemp("page-index") / "cases.idx")


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    return train_tiny_vqa_model(tmp_path_factory.mktemp("page-vqa"))


@pytest.fixture(scope="module")
def bottleneck_file(model_dir, phantom_dir, tmp_path_factory):
    image = sorted((phantom_dir / "images").glob("*.png"))[0]
    return fit_concept_bottleneck(model_dir, phantom_dir, image, tmp_path_factory.mktemp("page-concepts") / "out")


@pytest.fixture(scope="module")
def server(model_dir, index_dir, phantom_dir, vqa_dir, bottleneck_file):
    settings = ServeSettings(data_root=phantom_dir, vqa_model=vqa_dir, bottleneck=bottleneck_file)
    app = create_app(model_dir, index=index_dir, settings=settings,
                     token_digests=[token_digest(token) for token in TOKENS])
    with Server(app) as running:
        yield running


@pytest.fixture(scope="module")
def chest_xray(shared_data) -> Path:
    path = shared_data / CHEST_XRAY
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


class PageWatch:
    """What a page sent and what went wrong in it: requests off the service are aborted and kept."""

    def __init__(self, server_url: str):
        self.server_url = server_url
        self.max_requests = MAX_REQUESTS  # what the page may ask of the service (a test reading many files: more)
        self.requests: list[str] = []
        self.bodies: list[bytes] = []
        self.refused: list[str] = []
        self.errors: list[str] = []

    def route(self, route):
        url = route.request.url
        if url == self.server_url or url.startswith(self.server_url + "/"):
            self.requests.append(url)
            self.bodies.append(route.request.post_data_buffer or b"")
            route.continue_()
        else:
            self.refused.append(url)
            route.abort()

    def console(self, message):
        """The page logs nothing, and the Content-Security-Policy has nothing to block."""
        if message.type in ("log", "info", "debug") or "Content Security Policy" in message.text:
            self.errors.append(f"{message.type}: {message.text}")


@pytest.fixture
def watch(server):
    return PageWatch(server.url)


def open_watched(browser, url: str, watch: PageWatch, console: bool = True):
    """A new desktop-sized browser context and page on the service at ``url``, its requests and errors kept by
    ``watch`` (console lines too, with ``console``); (context, page), the page at ``/``."""
    context = browser.new_context(viewport={"width": 1360, "height": 900}, service_workers="block")
    context.route("**/*", watch.route)
    opened = context.new_page()
    opened.on("pageerror", lambda error: watch.errors.append(str(error)))
    if console:
        opened.on("console", watch.console)
    opened.goto(url + "/")
    return context, opened


@pytest.fixture
def page(browser, server, watch):
    context, opened = open_watched(browser, server.url, watch)
    yield opened
    storage = opened.evaluate("localStorage.length + sessionStorage.length")
    cookies = context.cookies()
    context.close()
    assert not watch.refused, f"requests beyond the service: {watch.refused}"
    assert not watch.errors, watch.errors
    assert len(watch.requests) <= watch.max_requests, watch.requests
    assert storage == 0 and cookies == []


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def connect(page, token: str) -> None:
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Connect").click()


def wait_for_panels(page, state: str = "done") -> None:
    for panel in PANELS:
        page.locator(f"#{panel}[data-state={state}]").wait_for(timeout=ANSWER_MS)


def api_answers(client, token: str, image: Path, fields: dict[str, str]) -> dict[str, dict]:
    """The service's own JSON for the upload and the options the page sent."""
    headers = {"Authorization": f"Bearer {token}"}
    common = {"k": fields["k"]}

    def post(route: str, data: dict) -> dict:
        answer = client.post(route, headers=headers, files={"image": ("image", image.read_bytes())}, data=data)
        assert answer.status_code == 200, answer.text
        return answer.json()

    return {"zero-shot": post("/v1/zero-shot", {"labels": fields["labels"]}),
            "explain": post("/v1/explain", {"labels": fields["labels"]}),
            "similar": post("/v1/search", common),
            "draft": post("/v1/report/draft", {**common, "min_similarity": fields["min_similarity"],
                                                "min_support": fields["min_support"]})}


def page_fields(page) -> dict[str, str]:
    return {"labels": page.get_by_label("Labels (comma-separated)").input_value(),
            "k": page.get_by_label("Number of cases").input_value(),
            "min_similarity": page.get_by_label("Min. similarity").input_value(),
            "min_support": page.get_by_label("Min. support").input_value()}


# ------------------------------------------------------------------------------------ checks


def check_zero_shot(page, expected: dict) -> None:
    rows = page.locator("#zero-shot .bars li")
    shown = [(row.get_attribute("data-label"), float(row.get_attribute("data-probability")),
              row.locator(".value").inner_text()) for row in rows.all()]
    assert {label for label, _, _ in shown} == set(expected["probabilities"])
    for label, probability, text in shown:
        assert probability == pytest.approx(expected["probabilities"][label], abs=1e-5)
        assert float(text.rstrip("%")) == pytest.approx(probability * 100, abs=0.051)
    assert [p for _, p, _ in shown] == sorted((p for _, p, _ in shown), reverse=True)
    assert page.locator("#zero-shot .bars li.top").get_attribute("data-label") == expected["prediction"]
    assert page.locator("#zero-shot [data-input-flags]").count() == (1 if expected["input_flags"] else 0)
    check_warnings(page, "zero-shot", expected)
    warning = page.locator("#zero-shot [data-out-of-distribution]")
    assert warning.count() == (1 if expected.get("out_of_distribution") else 0)
    if expected.get("out_of_distribution"):
        assert "OOD score" in warning.inner_text() and "above the guard's threshold" in warning.inner_text()


def check_similar(page, expected: dict) -> None:
    warning = page.locator("#similar [data-out-of-distribution]")  # the query image's verdict, as for zero-shot
    assert warning.count() == (1 if expected["query"].get("out_of_distribution") else 0)
    cards = page.locator("#similar .case").all()
    assert [card.get_attribute("data-case-id") for card in cards] == [hit["id"] for hit in expected["hits"]]
    for card, hit in zip(cards, expected["hits"], strict=True):
        assert float(card.get_attribute("data-score")) == pytest.approx(hit["score"], abs=1e-5)
        assert card.locator(".score").inner_text() == f"similarity {float(card.get_attribute('data-score')):.3f}"
        assert card.locator(".report").inner_text() == (hit["text"] or "No report stored for this case.")


def check_draft(page, expected: dict) -> None:
    if expected["abstained"]:
        assert page.locator("#draft [data-abstention] .reason").inner_text() == expected["reason"]
        return
    shown = [(item.locator(".text").inner_text(), [cite.inner_text() for cite in item.locator(".cite").all()])
             for item in page.locator("#draft .sentences li").all()]
    ordered = [s for section in ("findings", "impression") for s in expected["sentences"] if s["section"] == section]
    assert shown == [(s["text"], s["cases"]) for s in ordered]
    assert page.locator("#draft [data-abstention]").count() == 0
    # the service's own rule (a finding's sentence is kept for the finding's consensus, its support may be lower),
    # not "every sentence is stated by more than min_support", and each finding sentence's consensus share
    assert page.locator("#draft .caption").inner_text() == expected["rule"]
    for item, sentence in zip(page.locator("#draft .sentences li").all(), ordered, strict=True):
        shares = [f"{name} {sentence['findings'][name]} in {share * 100:.1f}%"
                  for name, share in sentence["consensus"].items()]
        assert item.get_attribute("data-consensus") == (", ".join(shares) if shares else None)
    check_warnings(page, "draft", expected)


def check_warnings(page, panel: str, expected: dict) -> None:
    """The answer's OOD flag and prompt warnings are shown in its panel, as the API gives them."""
    warning = page.locator(f"#{panel} [data-out-of-distribution]")
    assert warning.count() == (1 if expected.get("out_of_distribution") else 0), panel
    if expected.get("out_of_distribution"):
        assert f"OOD score {expected['ood_score']:.3g}" in warning.inner_text()
    prompts = page.locator(f"#{panel} [data-prompt-warnings]")
    assert prompts.count() == (1 if expected.get("warnings") else 0), panel
    for text in expected.get("warnings") or []:
        assert text in prompts.inner_text()


def shown_pixels(page, selector: str) -> np.ndarray:
    """The pixels the browser decoded for an image on the page (grayscale: its red channel), once loaded."""
    return shown_rgba(page, selector)[..., 0]


def shown_rgba(page, selector: str) -> np.ndarray:
    """The RGBA pixels the browser decoded for an image on the page, once loaded."""
    image = page.locator(selector)
    image.wait_for(timeout=ANSWER_MS)
    page.wait_for_function("image => image.complete && image.naturalWidth > 0", arg=image.element_handle(),
                           timeout=ANSWER_MS)
    width, height, data = image.evaluate(
        "image => { const canvas = document.createElement('canvas');"
        " canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;"
        " const context = canvas.getContext('2d'); context.drawImage(image, 0, 0);"
        " const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;"
        " return [canvas.width, canvas.height, Array.from(pixels)]; }")
    return np.asarray(data, dtype=np.uint8).reshape(height, width, 4)


def check_explain(page, expected: dict) -> None:
    """The findings and concepts shown are the API's; each heatmap toggled on is the API's overlay, laid over
    the image shown."""
    import base64

    blocks = page.locator("#explain .finding").all()
    assert [block.get_attribute("data-finding") for block in blocks] == [f["finding"] for f in expected["findings"]]
    for block, finding in zip(blocks, expected["findings"], strict=True):
        assert float(block.get_attribute("data-probability")) == pytest.approx(finding["probability"], abs=1e-5)
        if finding.get("concepts") == [] and finding.get("concepts_against") == []:  # said, as the CLI says it
            assert block.locator(".empty").inner_text() == \
                f"No concept pushes towards or against {finding['finding']} in this image."
        for side, key in (("for", "concepts"), ("against", "concepts_against")):  # each concept by its contribution
            concepts = block.locator(f".concepts[data-side={side}] li").all()
            assert [item.get_attribute("data-concept") for item in concepts] == \
                [c["concept"] for c in finding.get(key, [])]
            for item, concept in zip(concepts, finding.get(key, []), strict=True):
                assert float(item.get_attribute("data-weight")) == pytest.approx(concept["weight"], abs=1e-9)
                sign = "+" if concept["contribution"] >= 0 else "−"
                assert sign == ("+" if side == "for" else "−")
                assert item.locator(".contribution").inner_text() == f"{sign}{abs(concept['contribution']):.3f}"
    check_warnings(page, "explain", expected)
    assert page.locator("#preview img.overlay").count() == 0  # off until asked for
    top = expected["findings"][0]
    for method, heatmap in top["heatmaps"].items():
        page.locator(f"#explain .toggle button[data-method={method}]").click()
        assert page.locator(f"#explain .toggle button[data-method={method}]").get_attribute("aria-pressed") == "true"
        shown = shown_rgba(page, f"#preview img.overlay[data-method={method}]")
        sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(heatmap["png"]))).convert("RGBA"))
        assert shown.shape == sent.shape and shown.shape[:2] == tuple(expected["overlay"]["shape"])
        # the same overlay: its alpha within one level (an explanation computed beside the page's other requests
        # can round a weight on the 0.5 boundary the other way; 2 of 215,552 pixels did once)
        assert np.abs(shown[..., 3].astype(int) - sent[..., 3].astype(int)).max() <= 1
        opaque = sent[..., 3] >= 64  # the canvas keeps premultiplied colours: compare where they survive
        assert np.abs(shown[..., :3][opaque].astype(int) - sent[..., :3][opaque]).max() <= 4
        base = page.locator("#preview img:not(.overlay)").bounding_box()
        over = page.locator("#preview img.overlay").bounding_box()
        assert all(abs(base[key] - over[key]) <= 1 for key in ("x", "y", "width", "height")), (base, over)
    assert page.locator("#preview img.overlay").get_attribute("data-finding") == top["finding"]


def ask(page, question: str) -> None:
    page.get_by_label("Question").fill(question)
    page.get_by_role("button", name="Ask").click()
    page.locator("#vqa[data-state=done]").wait_for(timeout=ANSWER_MS)


def check_vqa(page, expected: dict) -> None:
    answer = page.locator("#vqa .answer")
    assert answer.get_attribute("data-answer") == expected["answer"]
    assert answer.locator(".text").inner_text() == expected["answer"]
    assert float(answer.get_attribute("data-probability")) == pytest.approx(expected["probability"], abs=1e-5)
    assert float(answer.locator(".probability").inner_text().rstrip("%")) == \
        pytest.approx(expected["probability"] * 100, abs=0.051)
    alternative = answer.locator(".alternative")
    assert alternative.get_attribute("data-alternative") == expected["alternative"]
    assert float(alternative.get_attribute("data-probability")) == \
        pytest.approx(expected["alternative_probability"], abs=1e-5)


def png_answer(answer) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png" and answer.headers["cache-control"] == "no-store"
    return np.asarray(Image.open(io.BytesIO(answer.content)).convert("L"))


def check_thumbnails(page, client, token: str) -> None:
    """Every similar case shows its thumbnail: the service's own PNG for that case, pixel for pixel."""
    page.wait_for_function("() => [...document.querySelectorAll('#similar .case')]"
                           ".every(card => card.dataset.thumbnail === 'shown')", timeout=ANSWER_MS)
    cards = page.locator("#similar .case").all()
    assert cards
    for number, card in enumerate(cards, 1):
        case_id = card.get_attribute("data-case-id")
        expected = png_answer(client.get(f"/v1/cases/{quote(case_id, safe='')}/thumbnail",
                                         headers={"Authorization": f"Bearer {token}"}))
        np.testing.assert_array_equal(shown_pixels(page, f"#similar .case:nth-child({number}) .thumb img"), expected)


def save_screenshot(page, folder: Path) -> None:
    """A full-page screenshot, its colours reduced so that the committed file stays small: written to
    ``folder``, and over the README's (docs/images/reading-page.png) only with MEDVL_UPDATE_SCREENSHOT=1, so
    that a test run leaves the checkout as it found it."""
    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    target = SCREENSHOT if os.environ.get("MEDVL_UPDATE_SCREENSHOT") == "1" else folder / SCREENSHOT.name
    target.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    assert target.stat().st_size < SCREENSHOT_LIMIT


# ------------------------------------------------------------------------------------- tests


def test_a_wrong_token_shows_the_services_401_reason_and_nothing_else_is_asked(page, watch, client):
    refused = client.get("/v1/models", headers={"Authorization": f"Bearer {WRONG_TOKEN}"})
    assert refused.status_code == 401
    connect(page, WRONG_TOKEN)
    alert = page.get_by_role("alert")
    alert.wait_for(timeout=ANSWER_MS)
    assert "401" in alert.inner_text() and refused.json()["detail"] in alert.inner_text()
    assert page.get_by_label("API token").input_value() == ""  # the token is not left in the page
    assert page.get_by_role("button", name="Read image").is_disabled()
    assert WRONG_TOKEN not in page.content()
    assert [url.rsplit("/", 1)[-1] for url in watch.requests if "/v1/" in url] == ["health", "models"]
    connect(page, "page-test-token-€-" + "y" * 12)  # a pasted € was "cannot reach the service (fetch ...)"
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('ASCII')")
    assert page.locator("#error").inner_text() == ("Error: a token holds ASCII characters only; this one holds another "
                                                   "(a typographic quote, a letter with an accent, ...): paste the "
                                                   "token again")
    assert [url.rsplit("/", 1)[-1] for url in watch.requests if "/v1/" in url] == ["health", "models"]


def test_every_panel_shows_the_apis_answer_for_a_real_chest_xray(page, watch, client, chest_xray, tmp_path):
    token = TOKENS[0]
    connect(page, token)
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    models = client.get("/v1/models", headers={"Authorization": f"Bearer {TOKENS[1]}"}).json()["models"][0]
    assert page.get_by_label("Labels (comma-separated)").input_value() == ", ".join(models["labels"]["finding"])
    assert models["name"] in page.locator("#model-info").inner_text()

    page.locator("#file").set_input_files(chest_xray)
    wait_for_panels(page)
    expected = api_answers(client, TOKENS[1], chest_xray, page_fields(page))
    assert expected["zero-shot"]["out_of_distribution"]  # a real radiograph, a phantom model: its warning is shown
    assert expected["similar"]["query"]["out_of_distribution"]  # under the similar cases too
    assert expected["draft"]["out_of_distribution"] and expected["explain"]["out_of_distribution"]  # and there
    check_zero_shot(page, expected["zero-shot"])
    check_similar(page, expected["similar"])
    check_draft(page, expected["draft"])
    check_thumbnails(page, client, TOKENS[1])
    check_explain(page, expected["explain"])
    ask(page, QUESTION)
    vqa = client.post("/v1/vqa", headers={"Authorization": f"Bearer {TOKENS[1]}"},
                      files={"image": ("image", chest_xray.read_bytes())}, data={"question": QUESTION})
    assert vqa.status_code == 200, vqa.text
    check_vqa(page, vqa.json())
    assert page.locator("#preview img[data-source=browser]").evaluate("image => image.naturalWidth") > 0
    assert page.locator("#window-field").is_hidden()  # no window for a JPEG
    assert page.locator("#file").get_attribute("accept") is None  # it hid DICOM files without an extension
    assert "JPEG read by the service" in page.locator("#file-info").inner_text()
    assert token not in page.content()
    forms = [body for body in watch.bodies if b'name="image"; filename="image"' in body]  # the form parts
    assert len(forms) == 5 and not any(chest_xray.stem.encode() in body for body in watch.bodies)  # its name stays
    save_screenshot(page, tmp_path)


def test_a_citation_leads_to_its_case_by_keyboard(page, client, chest_xray):
    connect(page, TOKENS[2])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(chest_xray)
    wait_for_panels(page)
    page.get_by_text("Draft settings").focus()
    page.keyboard.press("Enter")  # opens the settings
    page.get_by_label("Min. similarity").fill("-1")  # a draft whatever the neighbours' similarity
    page.keyboard.press("Enter")  # reads the image again with it
    wait_for_panels(page)
    assert page.locator("#draft [data-abstention]").count() == 0
    cite = page.locator("#draft .cite").first
    cited = cite.get_attribute("data-case-id")
    cite.focus()
    page.keyboard.press("Enter")
    highlighted = page.locator("#similar .case.highlight")
    assert highlighted.count() == 1 and highlighted.get_attribute("data-case-id") == cited


def _drafted_beyond_the_shown_cases(server, records, token: str):
    """The first indexed record whose draft (the page's k, 5) is not an abstention and cites a case beyond the
    5 similar cases shown (the draft leaves the image itself out, so it reaches one case further)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=ANSWER_MS / 1000) as client:
        for record in records:
            upload = {"image": ("image", Path(record.image).read_bytes())}
            draft = client.post("/v1/report/draft", files=upload, data={"k": "5"}).json()
            hits = client.post("/v1/search", files=upload, data={"k": "5"}).json()["hits"]
            cited = {case for sentence in draft.get("sentences", []) for case in sentence["cases"]}
            if not draft["abstained"] and cited - {hit["id"] for hit in hits}:
                return record
    pytest.fail("no indexed phantom image drafts beyond the cases shown")


def test_an_indexed_image_is_said_to_be_indexed_and_its_own_report_left_out(page, server, phantom_dir):
    from medvl.data import load_dataset

    train = load_dataset(phantom_dir).select("train")  # the index holds the train split
    record = _drafted_beyond_the_shown_cases(server, list(train)[:30], TOKENS[10])
    connect(page, TOKENS[10])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(record.image)
    wait_for_panels(page)
    assert f"this image is indexed as {record.id}: its own report is left out" in \
        page.locator("#draft-note").inner_text()
    cited = {cite.get_attribute("data-case-id") for cite in page.locator("#draft .cite").all()}
    assert record.id not in cited
    # the search shows the image itself first; the draft leaves it out and reaches one case further
    shown = {card.get_attribute("data-case-id") for card in page.locator("#similar .case").all()}
    assert record.id in shown and cited - shown
    page.locator(f"#draft .cite[data-case-id='{sorted(cited - shown)[0]}']").first.click()
    assert "is cited by the draft but is not among the similar cases shown: raise k" in \
        page.locator("#read-status").inner_text()
    assert page.locator("#similar .case.highlight").count() == 0


def test_no_answer_of_the_previous_image_stays_after_a_refused_one_or_a_forgotten_token(page, chest_xray,
                                                                                      tmp_path):
    """A refused upload used to leave the previous image's notes ("prediction: ...") and say "Answered.";
    forgetting the token left the image, the similar cases' reports and the draft on screen."""
    connect(page, TOKENS[13])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(chest_xray)
    wait_for_panels(page)
    assert page.locator("#zero-shot-note").inner_text().startswith("prediction:")
    notes = tmp_path / "notes.png"
    notes.write_text("hello")  # not an image: every panel is refused (415)
    page.locator("#file").set_input_files(notes)
    wait_for_panels(page, "error")
    for panel in PANELS:
        assert page.locator(f"#{panel}-note").inner_text() == "", panel
        assert page.locator(f"#{panel} .body .panel-error").count() == 1, panel
    assert page.locator("#similar .case").count() == 0 and page.locator("#draft .cite").count() == 0
    assert page.locator("#read-status").inner_text() == "Not answered: each panel says why."
    page.locator("#file").set_input_files(chest_xray)
    wait_for_panels(page)
    assert page.locator("#read-status").inner_text() == "Answered."
    page.get_by_role("button", name="Forget token").click()
    page.locator("#connect").wait_for(timeout=ANSWER_MS)
    for panel in PANELS:
        assert page.locator(f"#{panel}-note").inner_text() == "", panel
        assert page.locator(f"#{panel} .body").inner_text() == "Connect and choose an image.", panel
    assert page.locator("#preview img").count() == 0 and page.locator("#file-info").inner_text() == ""
    assert page.get_by_role("button", name="Read image").is_disabled()


def test_a_dicom_upload_shows_the_services_preview_and_its_window_presets(page, watch, client):
    from medvl.clinical.windowing import WINDOW_PRESETS

    pydicom_data = pytest.importorskip("pydicom.data")
    dicom = Path(pydicom_data.get_testdata_file("CT_small.dcm"))
    connect(page, TOKENS[3])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(dicom)
    wait_for_panels(page)
    headers = {"Authorization": f"Bearer {TOKENS[4]}"}

    def service_preview(window: str | None) -> np.ndarray:
        return png_answer(client.post("/v1/preview", headers=headers, files={"image": ("image", dicom.read_bytes())},
                                      data={"window": window} if window else {}))

    full_range = shown_pixels(page, "#preview img[data-source=service][data-window=none]")
    np.testing.assert_array_equal(full_range, service_preview(None))
    select = page.get_by_label("Window")
    assert select.is_visible()
    assert select.locator("option").evaluate_all("options => options.map(option => option.value)") == \
        ["", *WINDOW_PRESETS]
    shown = {}
    for name in ("lung", "bone"):
        select.select_option(name)
        shown[name] = shown_pixels(page, f"#preview img[data-source=service][data-window={name}]")
        np.testing.assert_array_equal(shown[name], service_preview(name))
    assert not np.array_equal(shown["lung"], full_range) and not np.array_equal(shown["lung"], shown["bone"])
    assert "lung window" in page.locator("#preview-info").inner_text() or \
        "bone window" in page.locator("#preview-info").inner_text()
    assert "DICOM read by the service" in page.locator("#file-info").inner_text()
    expected = api_answers(client, TOKENS[4], dicom, page_fields(page))
    check_zero_shot(page, expected["zero-shot"])
    check_similar(page, expected["similar"])
    check_draft(page, expected["draft"])
    check_thumbnails(page, client, TOKENS[4])
    page.locator("#explain .toggle button[data-method=patch_text]").click()  # the overlay fits the service's preview
    overlay = page.locator("#preview img.overlay[data-method=patch_text]")
    overlay.wait_for(timeout=ANSWER_MS)
    page.wait_for_function("image => image.complete && image.naturalWidth > 0", arg=overlay.element_handle())
    size = "image => [image.naturalWidth, image.naturalHeight]"
    assert overlay.evaluate(size) == page.locator("#preview img[data-source=service]").evaluate(size)
    previews = [url for url in watch.requests if url.endswith("/v1/preview")]
    assert len(previews) == 3  # one per window chosen; the other panels were not asked again


def test_a_dicom_without_its_preamble_gets_the_window_presets_as_the_service_reads_it_as_ct(page, client,
                                                                                           tmp_path):
    """A PACS export (IM000123: no preamble, no DICM, no file meta) is read by the service as the CT it is, with
    the presets offered, but the page found no DICM at byte 128 and showed no Window select for it."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    dataset = pydicom.dcmread(pytest.importorskip("pydicom.data").get_testdata_file("CT_small.dcm"))
    bare = DicomBytesIO()
    bare.is_little_endian, bare.is_implicit_VR = True, False
    write_dataset(bare, dataset)
    export = tmp_path / "IM000123"
    export.write_bytes(bare.getvalue())
    connect(page, TOKENS[32])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(export)
    page.locator("#preview img[data-source=service]").wait_for(timeout=ANSWER_MS)
    assert page.get_by_label("Window").is_visible()
    page.get_by_label("Window").select_option("lung")
    shown = shown_pixels(page, "#preview img[data-source=service][data-window=lung]")
    headers = {"Authorization": f"Bearer {TOKENS[32]}"}
    expected = client.post("/v1/preview", headers=headers, files={"image": ("image", export.read_bytes())},
                           data={"window": "lung"})
    np.testing.assert_array_equal(shown, png_answer(expected))
    assert page.locator("#preview-info").inner_text() == "Rendered by the service: lung window."
    wait_for_panels(page)


def test_an_mr_dicom_is_shown_in_its_own_window_and_the_ct_presets_are_not_offered_for_it(page, watch):
    """The page offered the lung, bone, ... presets (CT windows in HU) for an MR file: each choice was refused."""
    pydicom_data = pytest.importorskip("pydicom.data")
    connect(page, TOKENS[23])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    presets = page.locator("#window option:not([value=''])")
    page.locator("#file").set_input_files(Path(pydicom_data.get_testdata_file("MR_small.dcm")))
    page.locator("#preview img[data-source=service][data-window=file]").wait_for(timeout=ANSWER_MS)
    assert presets.count() > 0 and all(option.is_disabled() for option in presets.all())
    assert "CT windows in HU" in page.locator("#preview-info").inner_text()
    page.locator("#file").set_input_files(Path(pydicom_data.get_testdata_file("CT_small.dcm")))
    page.locator("#preview img[data-source=service][data-window=none]").wait_for(timeout=ANSWER_MS)
    assert not any(option.is_disabled() for option in presets.all())
    assert "CT windows" not in page.locator("#preview-info").inner_text()
    page.get_by_label("Window").select_option("lung")
    page.locator("#preview img[data-source=service][data-window=lung]").wait_for(timeout=ANSWER_MS)
    wait_for_panels(page)
    assert not [url for url in watch.requests if url.endswith("/v1/preview")][3:]  # MR, CT, CT in the lung window


def test_a_file_over_the_services_upload_limit_is_not_sent(page, watch, chest_xray):
    """A file over the limit was uploaded whole to every route, each refusing it (413) after the upload. A DICOM
    over it said "Connect to see the service's preview" to a connected reader, beside a window select."""
    dicom = Path(pytest.importorskip("pydicom.data").get_testdata_file("CT_small.dcm"))
    limit = min(chest_xray.stat().st_size, dicom.stat().st_size) - 1

    def smaller_limit(route):
        answer = route.fetch()
        models = answer.json()
        models["models"][0]["limits"]["max_upload_bytes"] = limit
        route.fulfill(response=answer, json=models)

    page.route("**/v1/models", smaller_limit)
    connect(page, TOKENS[24])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(chest_xray)
    status = page.locator("#read-status")
    page.wait_for_function("() => document.querySelector('#read-status').textContent.startsWith('Not read')")
    # in bytes: rounded, a file just over the limit was "1.0 MB; the service takes files up to 1.0 MB"
    assert f"is {chest_xray.stat().st_size:,} bytes; the service takes files up to {limit:,} bytes (" \
        in status.inner_text()
    assert chest_xray.name in status.inner_text()
    page.get_by_label("Question").fill(QUESTION)
    page.get_by_role("button", name="Ask").click()
    page.locator("#vqa[data-state=error]").wait_for(timeout=ANSWER_MS)
    assert "Not asked" in page.locator("#vqa").inner_text()
    page.locator("#file").set_input_files(dicom)
    page.wait_for_function("() => document.querySelector('#read-status').textContent.includes('CT_small.dcm')")
    assert page.locator("#preview").inner_text() == "Not shown: the file is over the service's upload limit."
    assert page.locator("#window-field").is_hidden()
    sent = [url for url in watch.requests if not url.endswith(("/", "/v1/health", "/v1/models"))]
    assert sent == [], sent


def test_a_photo_chosen_while_a_dicom_preview_is_on_its_way_keeps_its_own_upright_preview(page, chest_xray,
                                                                                          tmp_path):
    """A DICOM's preview answered late (a busy service) used to replace the JPEG chosen after it, so the
    findings and heatmaps of the JPEG were shown over the CT slice. The JPEG here is stored sideways with an
    EXIF Orientation tag: the browser shows it upright, and the heatmap, from the service's reading of the same
    file, fits it (it used to be computed on the sideways pixels and squeezed over the upright picture)."""
    pydicom_data = pytest.importorskip("pydicom.data")
    dicom = Path(pydicom_data.get_testdata_file("CT_small.dcm"))
    upright = Image.open(chest_xray).convert("L").resize((96, 64))  # wider than tall, upright
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show": the stored pixels are turned the other way
    photo = tmp_path / "photo.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(photo, exif=exif.tobytes(), quality=95)
    assert Image.open(photo).size == (64, 96)

    def slow(route):
        page.wait_for_timeout(2500)
        route.fallback()

    page.route("**/v1/preview", slow)
    connect(page, TOKENS[12])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(dicom)
    page.wait_for_timeout(300)
    page.locator("#file").set_input_files(photo)
    wait_for_panels(page)
    page.wait_for_timeout(3500)  # the DICOM's preview has come back by now
    base = page.locator("#preview img:not(.overlay)")
    assert base.get_attribute("data-source") == "browser"
    # the superseded preview used to leave the box busy: the photo dimmed (opacity .55) and aria-busy for good
    assert page.locator("#preview").get_attribute("aria-busy") == "false"
    assert base.evaluate("image => getComputedStyle(image).opacity") == "1"
    assert "photo.jpg" in page.locator("#file-info").inner_text()
    size = "image => [image.naturalWidth, image.naturalHeight]"
    assert base.evaluate(size) == [96, 64]  # the browser turned it upright
    page.locator("#explain .toggle button[data-method=patch_text]").click()
    overlay = page.locator("#preview img.overlay[data-method=patch_text]")
    overlay.wait_for(timeout=ANSWER_MS)
    page.wait_for_function("image => image.complete && image.naturalWidth > 0", arg=overlay.element_handle())
    assert overlay.evaluate(size) == [96, 64]


def test_a_file_chosen_with_an_option_not_valid_never_shows_beside_the_previous_picture(page, client, chest_xray):
    """With an option not valid (Number of cases 0), choosing a DICOM after a photo stopped the read before the
    service's preview was asked: the photo stayed on screen above the DICOM's name, and Ask answered about the
    DICOM under the photo."""
    dicom = Path(pytest.importorskip("pydicom.data").get_testdata_file("CT_small.dcm"))
    connect(page, TOKENS[29])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(chest_xray)
    wait_for_panels(page)
    page.locator("#preview img[data-source=browser]").wait_for(timeout=ANSWER_MS)
    page.get_by_label("Number of cases").fill("0")
    page.locator("#file").set_input_files(dicom)
    page.wait_for_function("() => document.querySelector('#read-status').textContent.startsWith('Not read')",
                           timeout=ANSWER_MS)
    assert page.locator("#preview img[data-source=browser]").count() == 0
    assert "CT_small.dcm" in page.locator("#file-info").inner_text()
    shown = shown_pixels(page, "#preview img[data-source=service]")  # the DICOM's own picture, options aside
    headers = {"Authorization": f"Bearer {TOKENS[29]}"}
    expected = client.post("/v1/preview", headers=headers, files={"image": ("image", dicom.read_bytes())})
    np.testing.assert_array_equal(shown, png_answer(expected))
    ask(page, QUESTION)
    assert page.locator("#preview img:not(.overlay)").get_attribute("data-source") == "service"
    assert page.locator("#read-status").inner_text().startswith("Not read: Number of cases")


def test_a_question_longer_than_the_question_encoder_reads_is_refused_on_the_page(page, chest_xray):
    """A question past the question encoder's tokens was cut there and answered as if whole."""
    connect(page, TOKENS[33])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(chest_xray)
    page.get_by_label("Question").fill("the patient was seen in clinic today for a follow up " * 6 + QUESTION)
    page.get_by_role("button", name="Ask").click()
    page.locator("#vqa[data-state=error]").wait_for(timeout=ANSWER_MS)
    refusal = page.locator("#vqa .panel-error").inner_text()
    assert refusal.startswith("422") and "tokens at most" in refusal, refusal
    wait_for_panels(page)


def test_a_dropped_image_with_refused_options_shows_each_refusal_in_its_panel(page, client, chest_xray):
    connect(page, TOKENS[5])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    too_many = ",".join(f"label{n}" for n in range(65))  # over the service's 64 (one label: refused on the page)
    page.get_by_label("Labels (comma-separated)").fill(too_many)
    page.get_by_label("Filter").fill("colour = 'red'")
    drop(page, chest_xray)
    wait_for_panels(page, "error")
    headers = {"Authorization": f"Bearer {TOKENS[6]}"}
    image = {"image": ("image", chest_xray.read_bytes())}
    labels = client.post("/v1/zero-shot", headers=headers, files=image, data={"labels": too_many})
    where = client.post("/v1/search", headers=headers, files=image, data={"k": "5", "where": "colour = 'red'"})
    assert labels.status_code == where.status_code == 422
    assert page.locator("#zero-shot .panel-error").inner_text().startswith("422 ")
    assert labels.json()["detail"] in page.locator("#zero-shot .panel-error").inner_text()
    for panel in ("similar", "draft"):
        assert where.json()["detail"] in page.locator(f"#{panel} .panel-error").inner_text()


def test_a_blank_image_is_answered_with_a_warning_that_there_is_nothing_to_answer_on(page, client, tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((80, 80), 200, np.uint8)).save(blank)
    connect(page, TOKENS[11])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(blank)
    page.locator("#zero-shot[data-state=done]").wait_for(timeout=ANSWER_MS)
    warning = page.locator("#zero-shot [data-input-flags]")
    assert warning.get_attribute("data-input-flags") == "blank" and warning.get_attribute("role") == "alert"
    assert "No content to answer on: blank as the model sees it" in warning.inner_text()
    assert "grey levels between the 0.5th and 99.5th percentiles" in warning.inner_text()
    assert page.locator("#zero-shot .bars li").count() > 0  # the answer is still shown, under the warning
    page.locator("#draft[data-state=done]").wait_for(timeout=ANSWER_MS)
    page.locator("#similar[data-state=done]").wait_for(timeout=ANSWER_MS)
    assert page.locator("#similar [data-input-flags]").get_attribute("data-input-flags") == "blank"
    page.locator("#explain[data-state=done]").wait_for(timeout=ANSWER_MS)
    assert page.locator("#explain [data-input-flags]").get_attribute("data-input-flags") == "blank"
    assert page.locator("#draft [data-abstention]").get_attribute("data-abstention") == "no_content"
    ask(page, QUESTION)
    assert page.locator("#vqa [data-input-flags]").get_attribute("data-input-flags") == "blank"
    assert page.locator("#vqa .answer").count() == 1


def drop(page, path: Path) -> None:
    """Drop ``path`` on the page's drop zone as a browser does (a DataTransfer holding the file)."""
    transfer = page.evaluate_handle(
        "([bytes, name]) => { const transfer = new DataTransfer();"
        " transfer.items.add(new File([new Uint8Array(bytes)], name, {type: 'image/jpeg'})); return transfer; }",
        [list(path.read_bytes()), path.name])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def test_a_nifti_volume_shows_its_middle_slice_while_the_2d_model_says_why_it_cannot_read_it(page, client,
                                                                                             tmp_path):
    from medvl.data.phantom import generate_phantom

    generate_phantom(tmp_path / "ct", n=1, seed=2, size=32, kind="ct3d", splits={"test": 1.0})
    [volume] = sorted((tmp_path / "ct").rglob("*.nii.gz"))
    connect(page, TOKENS[7])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(volume)
    wait_for_panels(page, "error")
    assert "a 2D model reads one image" in page.locator("#zero-shot .panel-error").inner_text()
    page.get_by_label("Window").select_option("soft_tissue")
    shown = shown_pixels(page, "#preview img[data-source=service][data-window=soft_tissue]")
    expected = client.post("/v1/preview", headers={"Authorization": f"Bearer {TOKENS[8]}"},
                           files={"image": ("image", volume.read_bytes())}, data={"window": "soft_tissue"})
    np.testing.assert_array_equal(shown, png_answer(expected))
    assert page.locator("#preview-info").inner_text() == "Rendered by the service: slice 17 of 32 (middle) · " \
                                                         "soft_tissue window."


def test_without_a_data_root_similar_cases_show_their_ids_in_place_of_thumbnails(browser, model_dir, index_dir,
                                                                                 chest_xray):
    app = create_app(model_dir, index=index_dir, settings=ServeSettings(), token_digests=[token_digest(TOKENS[9])])
    with Server(app) as running:
        watch = PageWatch(running.url)
        context, page = open_watched(browser, running.url, watch, console=False)
        connect(page, TOKENS[9])
        page.locator("#connected").wait_for(timeout=ANSWER_MS)
        page.locator("#file").set_input_files(chest_xray)
        wait_for_panels(page)
        page.wait_for_function("() => [...document.querySelectorAll('#similar .case')]"
                               ".every(card => card.dataset.thumbnail === 'none')", timeout=ANSWER_MS)
        for card in page.locator("#similar .case").all():
            assert card.locator(".thumb").inner_text() == card.get_attribute("data-case-id")
            assert "without a data root" in card.locator(".thumb").get_attribute("title")
            assert card.locator(".thumb img").count() == 0
        assert "no VQA model" in page.locator("#vqa .body").inner_text()  # started without --vqa-model
        assert page.get_by_role("button", name="Ask").is_disabled()
        assert "No concept bottleneck" in page.locator("#explain .body").inner_text()
        context.close()
    assert not watch.refused and not watch.errors


def test_labels_the_captions_do_not_describe_are_answered_with_the_services_warning(page, client, phantom_dir):
    """Labels answered from their bare names (no caption column describes them) used to be shown as any other
    answer: the service's warning was dropped."""
    image = sorted((phantom_dir / "images").glob("*.png"))[2]
    connect(page, TOKENS[14])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.get_by_label("Labels (comma-separated)").fill("effusion, normal chest")
    page.locator("#file").set_input_files(image)
    page.locator("#zero-shot[data-state=done]").wait_for(timeout=ANSWER_MS)
    expected = client.post("/v1/zero-shot", headers={"Authorization": f"Bearer {TOKENS[15]}"},
                           files={"image": ("image", image.read_bytes())},
                           data={"labels": "effusion, normal chest"}).json()
    assert expected["warnings"] and "bare class names" in expected["warnings"][0]
    check_zero_shot(page, expected)
    assert page.locator("#zero-shot [data-prompt-warnings]").get_attribute("role") == "alert"


def test_long_words_wrap_inside_their_cards_and_a_phone_wide_page_does_not_scroll_sideways(page, browser, server,
                                                                                          phantom_dir):
    """One unbroken word (a long label, a long case id in a refusal) widened its card over the next column (the
    zero-shot bars slid under the similar cases, the page 2,751 px wide), and at 375 px the top bar alone was
    525 px wide."""
    connect(page, TOKENS[16])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    long_label = "left_lower_lobe_consolidation_with_air_bronchograms_" * 3
    page.get_by_label("Labels (comma-separated)").fill(f"{long_label}, no_finding, {'x' * 200}")
    page.locator("#file").set_input_files(sorted((phantom_dir / "images").glob("*.png"))[5])
    page.locator("#zero-shot[data-state=done]").wait_for(timeout=ANSWER_MS)
    page.locator("#similar[data-state=done]").wait_for(timeout=ANSWER_MS)
    assert page.evaluate("document.documentElement.scrollWidth") <= 1360
    cards = {name: page.locator(f"#{name}").bounding_box() for name in ("zero-shot", "similar")}
    assert cards["zero-shot"]["x"] + cards["zero-shot"]["width"] <= cards["similar"]["x"]
    for value in page.locator("#zero-shot .bars .value").all():  # every percentage inside its own card
        box = value.bounding_box()
        assert box["x"] + box["width"] <= cards["zero-shot"]["x"] + cards["zero-shot"]["width"]
    phone = browser.new_context(viewport={"width": 375, "height": 800}, service_workers="block")
    narrow = phone.new_page()
    narrow.goto(server.url + "/")
    narrow.locator("#service[data-status=ok]").wait_for(timeout=ANSWER_MS)
    assert narrow.evaluate("document.documentElement.scrollWidth") <= 375
    phone.close()


def read_with_thumbnails(browser, url: str, token: str, image: Path, k: int):
    """A page of its own (context, page) that reads ``image`` with ``k`` similar cases, and the statuses of its
    thumbnail requests as they come."""
    statuses: list[int] = []
    context = browser.new_context(viewport={"width": 1360, "height": 900}, service_workers="block")
    page = context.new_page()
    page.on("response", lambda answer: statuses.append(answer.status) if "/thumbnail" in answer.url else None)
    page.goto(url + "/")
    connect(page, token)
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.get_by_label("Number of cases").fill(str(k))
    page.locator("#file").set_input_files(image)
    page.locator("#similar[data-state=done]").wait_for(timeout=ANSWER_MS)
    return context, page, statuses


def thumbnails_when_settled(page) -> list[str]:
    """Each similar case's thumbnail state once none is loading any more."""
    page.wait_for_function("() => [...document.querySelectorAll('#similar .case')]"
                           ".every(card => card.dataset.thumbnail !== 'loading')", timeout=ANSWER_MS)
    return page.locator("#similar .case").evaluate_all("cards => cards.map(card => card.dataset.thumbnail)")


def test_many_similar_cases_all_show_their_thumbnails_within_the_tokens_rate(browser, model_dir, index_dir,
                                                                          phantom_dir, chest_xray):
    """Every thumbnail was asked for at once: past the token's burst most were refused (429) and the cases showed
    their ids only. They are now asked for a few at a time, a 429 waited out (Retry-After) and asked again."""
    settings = ServeSettings(data_root=phantom_dir, rate_limit=4.0, rate_burst=8)
    app = create_app(model_dir, index=index_dir, settings=settings, token_digests=[token_digest(TOKENS[17])])
    with Server(app) as running:
        context, page, statuses = read_with_thumbnails(browser, running.url, TOKENS[17], chest_xray, 12)
        shown = thumbnails_when_settled(page)
        context.close()
    assert shown == ["shown"] * 12, (shown, statuses)
    assert 429 in statuses  # the budget was spent: the refusals were waited out


def test_a_model_still_loading_keeps_the_token_and_connects_when_ready(page, watch, chest_xray):
    """A 503 'still loading' from /v1/models was taken for a bad token: the token was thrown away and the error
    stayed after the model was ready. An image chosen meanwhile was sent at once (five uploads the service could
    only refuse, zero-shot without its labels: 422); it is now read once the model is known."""
    answers = []

    def loading_once(route):
        answers.append(route.request.url)
        if len(answers) == 1:
            route.fulfill(status=503, headers={"Retry-After": "2"}, content_type="application/json",
                          body='{"detail": "the model is still loading; retry in a few seconds"}')
        else:
            route.fallback()

    page.route("**/v1/models", loading_once)
    connect(page, TOKENS[18])
    page.get_by_role("alert").wait_for(timeout=ANSWER_MS)
    assert "503" in page.locator("#error").inner_text() and "token is kept" in page.locator("#error").inner_text()
    page.locator("#file").set_input_files(chest_xray)
    page.wait_for_function("() => document.querySelector('#zero-shot .body').textContent === 'Connecting…'")
    assert len(answers) == 1 and not [url for url in watch.requests if url.endswith(("/zero-shot", "/preview"))]
    page.locator("#connected").wait_for(timeout=ANSWER_MS)  # asked again after Retry-After, with the same token
    assert page.locator("#error").is_hidden() and len(answers) == 2
    assert page.evaluate("document.activeElement.id") == "file"  # focus goes on to the image, not to <body>
    wait_for_panels(page)  # the image chosen meanwhile is read now, with the labels


def test_draft_settings_take_what_the_service_takes_and_an_empty_k_is_never_sent(page, watch, chest_xray,
                                                                                  tmp_path):
    """Min. similarity 0.33 was blocked by the browser (step 0.05), min. support stopped at 0.95 (the service
    takes up to below 1), and an emptied 'Number of cases' was sent as nothing: the service's default of 10."""
    connect(page, TOKENS[19])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(chest_xray)
    wait_for_panels(page)
    page.locator("details.more summary").click()
    page.get_by_label("Min. similarity").fill("0.33")
    page.get_by_label("Min. support").fill("0.99")
    sent = len(watch.bodies)
    page.get_by_role("button", name="Read image").click()
    wait_for_panels(page)
    draft = [body for body in watch.bodies[sent:] if b'name="min_support"' in body]
    assert len(draft) == 1 and b"\r\n\r\n0.33\r\n" in draft[0] and b"\r\n\r\n0.99\r\n" in draft[0]
    page.get_by_label("Number of cases").fill("")
    sent = len(watch.requests)
    other = tmp_path / "other.jpg"
    other.write_bytes(chest_xray.read_bytes())
    page.locator("#file").set_input_files(other)  # a read not through the form's button is checked too
    page.wait_for_timeout(1000)
    assert not [url for url in watch.requests[sent:] if "/v1/" in url]
    assert page.locator("#read-status").inner_text().startswith("Not read: Number of cases:")


def test_forget_token_also_clears_the_question(page, chest_xray):
    """The question box kept its text (which may name the patient) after "Forget token"."""
    connect(page, TOKENS[20])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    assert page.evaluate("document.activeElement.id") == "file"
    page.locator("#file").set_input_files(chest_xray)
    wait_for_panels(page)
    page.get_by_label("Question").fill("Is Mr Smith's nodule (MRN 123456) larger?")
    page.get_by_role("button", name="Forget token").click()
    assert page.get_by_label("Question").input_value() == ""



def test_concepts_are_shown_by_their_contribution_for_and_against_the_finding(browser, model_dir, bottleneck_file,
                                                                             chest_xray, tmp_path):
    """A concept pushing towards the finding through a negative weight was shown as '−0.041' under it (the weight,
    read as evidence against), and the concepts pushing against it were never shown. The tiny phantom model's
    fitted bottleneck keeps no concept (its L1 fit), so its weights are set here, seeded, half of them negative:
    with 23 concepts, the image's concepts then push both ways through weights of both signs."""
    from medvl.explain.concepts import ConceptBottleneck

    bottleneck = ConceptBottleneck.load(bottleneck_file)
    bottleneck.weights = np.random.default_rng(0).normal(0, 1, bottleneck.weights.shape)
    weighted = bottleneck.save(tmp_path / "weighted.json")
    settings = ServeSettings(bottleneck=weighted)
    app = create_app(model_dir, settings=settings, token_digests=[token_digest(token) for token in TOKENS[21:23]])
    with Server(app) as running, httpx.Client(base_url=running.url, timeout=60) as http:
        expected = http.post("/v1/explain", headers={"Authorization": f"Bearer {TOKENS[21]}"},
                             files={"image": ("image", chest_xray.read_bytes())}).json()
        [top] = expected["findings"]
        assert any(c["weight"] < 0 for c in top["concepts"]) and top["concepts_against"]
        watch = PageWatch(running.url)
        context, page = open_watched(browser, running.url, watch, console=False)
        connect(page, TOKENS[22])
        page.locator("#connected").wait_for(timeout=ANSWER_MS)
        page.locator("#file").set_input_files(chest_xray)
        page.locator("#explain[data-state=done]").wait_for(timeout=ANSWER_MS)
        check_explain(page, expected)
        assert "contribution" in page.locator("#explain .caption").inner_text()
        context.close()
    assert not watch.refused


def test_a_16_bit_or_transparent_png_is_shown_as_the_model_reads_it_and_an_unreadable_file_as_refused(
        page, watch, client, tmp_path):
    """The browser showed a 16-bit PNG (0-4000) nearly black and a grey + alpha PNG as a square over the dark
    background, while the model reads the first min-max scaled and the second without alpha (white): a heatmap
    over a black box, a "blank" warning beside a picture with content. Such a PNG is now shown by the service's
    preview, the heatmap laid over it. A file the browser cannot show was said to be read by the service while every
    panel refused it (415); the service's preview now says whether it reads it. A DICOM without an extension (a
    PACS export) is read as any other."""
    deep = tmp_path / "deep.png"
    Image.fromarray(np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)).save(deep)
    grey, alpha = np.full((48, 48), 255, np.uint8), np.zeros((48, 48), np.uint8)
    alpha[10:30, 10:30] = 255
    transparent = tmp_path / "transparent.png"
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(transparent)
    headers = {"Authorization": f"Bearer {TOKENS[26]}"}
    # the page, health, models; four reads: five routes and up to five thumbnails each; a few asked again after a 429
    watch.max_requests = 3 + 4 * (5 + 5) + 8
    connect(page, TOKENS[25])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    for path in (deep, transparent):
        page.locator("#file").set_input_files(path)
        shown = shown_pixels(page, "#preview img[data-source=service]")
        expected = client.post("/v1/preview", headers=headers, files={"image": ("image", path.read_bytes())})
        np.testing.assert_array_equal(shown, png_answer(expected))
        assert page.locator("#window-field").is_hidden()
        page.locator("#explain[data-state=done]").wait_for(timeout=ANSWER_MS)
    assert page.locator("#zero-shot [data-input-flags]").get_attribute("data-input-flags") == "blank"
    assert shown.min() == shown.max() == 255  # what the model reads: white, no square
    page.locator("#explain .toggle button[data-method=patch_text]").click()
    overlay = page.locator("#preview img.overlay[data-method=patch_text]")
    overlay.wait_for(timeout=ANSWER_MS)
    page.wait_for_function("image => image.complete && image.naturalWidth > 0", arg=overlay.element_handle())
    base = page.locator("#preview img:not(.overlay)").bounding_box()
    assert all(abs(base[key] - overlay.bounding_box()[key]) <= 1 for key in ("x", "y", "width", "height"))
    dicom = Path(pytest.importorskip("pydicom.data").get_testdata_file("CT_small.dcm")).read_bytes()
    unreadable = tmp_path / "scan.dcm"
    unreadable.write_bytes(b"\x00\x01 neither an image nor a DICOM data set " * 8)  # the service does not take it
    page.locator("#file").set_input_files(unreadable)
    page.locator("#preview .panel-error").wait_for(timeout=ANSWER_MS)
    assert page.locator("#preview").inner_text().startswith("415 Unsupported Media Type")
    wait_for_panels(page, "error")
    export = tmp_path / "IM000123"
    export.write_bytes(dicom)
    page.locator("#file").set_input_files(export)
    page.locator("#preview img[data-source=service][data-window=none]").wait_for(timeout=ANSWER_MS)
    wait_for_panels(page)


def test_read_image_waits_for_the_read_on_its_way_and_a_panel_refused_for_the_rate_asks_again(browser, model_dir,
                                                                                           index_dir, phantom_dir):
    """Each press of "Read image" sent four uploads while the previous read was on its way: five presses spent the
    token's rate and the read shown had panels refused (429), never asked again. The button now waits for the
    read, and a panel refused for the rate asks again after its Retry-After, as a thumbnail does."""
    settings = ServeSettings(rate_limit=1.0, rate_burst=3)  # a read's four uploads: one is refused
    app = create_app(model_dir, index=index_dir, settings=settings, token_digests=[token_digest(TOKENS[27])])
    image = sorted((phantom_dir / "images").glob("*.png"))[2]
    with Server(app) as running:
        statuses: list[tuple[str, int]] = []
        context = browser.new_context(viewport={"width": 1360, "height": 900}, service_workers="block")
        page = context.new_page()
        page.on("response", lambda answer: statuses.append((answer.url.rsplit("/", 1)[-1], answer.status))
                if answer.request.method == "POST" else None)
        page.goto(running.url + "/")
        connect(page, TOKENS[27])
        page.locator("#connected").wait_for(timeout=ANSWER_MS)
        page.locator("#file").set_input_files(image)
        page.locator("#zero-shot[data-state=busy]").wait_for(timeout=ANSWER_MS)
        assert page.get_by_role("button", name="Read image").is_disabled()
        page.evaluate("() => { for (let i = 0; i < 5; i++) document.querySelector('#read').click(); }")
        page.wait_for_function("() => /^(Answered|Not answered)/.test("
                               "document.querySelector('#read-status').textContent)", timeout=ANSWER_MS)
        states = {panel: page.locator(f"#{panel}").get_attribute("data-state") for panel in PANELS}
        said = {panel: page.locator(f"#{panel} .body").inner_text()[:200] for panel in PANELS
                if states[panel] != "done"}
        status = page.locator("#read-status").inner_text()
        enabled = page.get_by_role("button", name="Read image").is_enabled()
        context.close()
    # one read: each route answered once (a panel refused for the rate asked again until answered); a response
    # event may reach the test after the page has shown the read, so the count is not asked to be exact
    answered = [route for route, code in statuses if code == 200]
    assert len(answered) == len(set(answered)) and len(statuses) <= 4 + sum(code == 429 for _, code in statuses), \
        statuses
    assert 429 in {code for _, code in statuses}, statuses
    assert states == dict.fromkeys(PANELS, "done") and status == "Answered." and enabled, (states, said, status,
                                                                                           statuses)


def test_panels_refused_for_a_busy_service_with_retry_after_ask_again(browser, model_dir, index_dir, tmp_path):
    """The service's 503 "busy, retry shortly" (uploads in flight, a full explanation / VQA queue) carries
    Retry-After as a 429 does, yet the page waited out the 429 only: a read's own four uploads of a large file
    over the service's in-flight budget left panels refused for good."""
    settings = ServeSettings(rate_limit=0, max_upload_bytes=1024 * 1024, max_inflight_bytes=2 * 1024 * 1024)
    app = create_app(model_dir, index=index_dir, settings=settings, token_digests=[token_digest(TOKENS[30])])
    noise = np.random.default_rng(3).integers(0, 256, (900, 960), dtype=np.uint8)
    image = tmp_path / "noise.png"
    Image.fromarray(noise).save(image)
    assert 800_000 < image.stat().st_size < 1024 * 1024  # two fit in the budget at once, not four
    with Server(app) as running:
        statuses: list[int] = []
        context = browser.new_context(viewport={"width": 1360, "height": 900}, service_workers="block")
        page = context.new_page()
        page.on("response", lambda answer: statuses.append(answer.status) if answer.request.method == "POST" else None)
        page.goto(running.url + "/")
        connect(page, TOKENS[30])
        page.locator("#connected").wait_for(timeout=ANSWER_MS)
        page.locator("#file").set_input_files(image)
        page.wait_for_function("() => /^(Answered|Not answered)/.test("
                               "document.querySelector('#read-status').textContent)", timeout=2 * ANSWER_MS)
        states = {panel: page.locator(f"#{panel}").get_attribute("data-state") for panel in PANELS}
        said = {panel: page.locator(f"#{panel} .body").inner_text()[:200] for panel in PANELS}
        status = page.locator("#read-status").inner_text()
        context.close()
    assert 503 in statuses, statuses
    assert states == dict.fromkeys(PANELS, "done") and status == "Answered.", (states, said, status, statuses)


def test_a_preview_refused_for_the_rate_asks_again_and_its_caption_is_of_the_window_shown(browser, model_dir):
    """A reader going through the window presets spent the token's rate: the preview refused (429) was never
    asked again (its 429 text in place of the picture), under a caption of an earlier window ("lung window")
    while the select said "bone"."""
    dicom = Path(pytest.importorskip("pydicom.data").get_testdata_file("CT_small.dcm"))
    settings = ServeSettings(rate_limit=1.0, rate_burst=4)  # the read's preview and four panels: one is refused
    app = create_app(model_dir, settings=settings, token_digests=[token_digest(TOKENS[31])])
    with Server(app) as running:
        statuses: list[int] = []
        context = browser.new_context(viewport={"width": 1360, "height": 900}, service_workers="block")
        page = context.new_page()
        page.on("response", lambda answer: statuses.append(answer.status) if answer.url.endswith("/v1/preview")
                else None)
        page.goto(running.url + "/")
        connect(page, TOKENS[31])
        page.locator("#connected").wait_for(timeout=ANSWER_MS)
        page.locator("#file").set_input_files(dicom)
        page.locator("#window-field").wait_for(state="visible", timeout=ANSWER_MS)
        for name in ("lung", "bone", "brain", "mediastinum", "bone"):  # quickly, as a reader scrolling the select
            page.get_by_label("Window").select_option(name)
        page.locator("#preview img[data-source=service][data-window=bone]").wait_for(timeout=ANSWER_MS)
        page.wait_for_function("() => document.querySelector('#preview').getAttribute('aria-busy') === 'false'",
                               timeout=ANSWER_MS)
        caption = page.locator("#preview-info").inner_text()
        shown = page.locator("#preview").inner_text()
        context.close()
    assert 429 in statuses, statuses
    assert caption == "Rendered by the service: bone window." and shown == "", (caption, shown)


def test_a_3d_model_without_heatmaps_is_not_asked_for_them_and_a_service_without_tokens_needs_none(browser,
                                                                                                  tmp_path):
    """/v1/models says a 3D model takes no heatmap, yet every read posted the volume to /v1/explain and counted its
    422 as a refusal. A service started with --no-auth takes no token, yet the page asked for one (any text then
    connected); Connect with the field empty now connects."""
    import medvl
    from medvl.data.phantom import generate_phantom

    medvl.create_model("ct3d-tiny").save_pretrained(tmp_path / "model")
    generate_phantom(tmp_path / "ct", n=1, seed=2, size=32, kind="ct3d", splits={"test": 1.0})
    [volume] = sorted((tmp_path / "ct").rglob("*.nii.gz"))
    app = create_app(tmp_path / "model", settings=ServeSettings(), require_token=False)
    with Server(app) as running:
        watch = PageWatch(running.url)
        context, page = open_watched(browser, running.url, watch, console=False)
        assert "--no-auth" in page.locator("#token-help").inner_text()
        page.get_by_role("button", name="Connect").click()
        page.locator("#connected").wait_for(timeout=ANSWER_MS)
        unavailable = httpx.get(running.url + "/v1/models").json()["models"][0]["explain"]["unavailable"]
        # a model at random init has no captions: no labels are prefilled, and a read needs two
        page.get_by_label("Labels (comma-separated)").fill("nodule, no_finding")
        page.locator("#file").set_input_files(volume)
        page.wait_for_function("() => /^(Answered|Not answered)/.test("
                               "document.querySelector('#read-status').textContent)", timeout=ANSWER_MS)
        explain = (page.locator("#explain").get_attribute("data-state"), page.locator("#explain .body").inner_text())
        status = page.locator("#read-status").inner_text()
        context.close()
    assert unavailable and explain == ("idle", f"No heatmaps for this model: {unavailable}.")
    assert not [url for url in watch.requests if url.endswith("/v1/explain")]
    assert "of 4 panels" not in status and not watch.refused and not watch.errors, (status, watch.errors)


def test_a_question_refused_for_the_rate_is_asked_again(browser, model_dir, index_dir, phantom_dir, vqa_dir):
    """The read's panels waited out a 429 and asked again, but "Ask" showed the refusal as the answer. A question
    refused for the token's rate is now asked again after its Retry-After, like a panel of the read."""
    settings = ServeSettings(rate_limit=0.5, rate_burst=20, vqa_model=vqa_dir)
    app = create_app(model_dir, index=index_dir, settings=settings, token_digests=[token_digest(TOKENS[28])])
    image = sorted((phantom_dir / "images").glob("*.png"))[3]
    with Server(app) as running:
        statuses: list[int] = []
        context = browser.new_context(viewport={"width": 1360, "height": 900}, service_workers="block")
        page = context.new_page()
        page.on("response", lambda answer: statuses.append(answer.status) if answer.url.endswith("/v1/vqa") else None)
        page.goto(running.url + "/")
        connect(page, TOKENS[28])
        page.locator("#connected").wait_for(timeout=ANSWER_MS)
        page.locator("#file").set_input_files(image)
        page.wait_for_function("() => /^Answered/.test(document.querySelector('#read-status').textContent)",
                               timeout=ANSWER_MS)
        headers = {"Authorization": f"Bearer {TOKENS[28]}"}
        # the token's burst is spent from here, then the question is asked: it is refused once (a token comes
        # back every 2 s), waited out and asked again
        while httpx.get(running.url + "/v1/models", headers=headers).status_code != 429:
            pass
        ask(page, "is there a nodule?")
        answer = page.locator("#vqa .answer").get_attribute("data-answer")
        context.close()
    assert statuses[0] == 429 and statuses[-1] == 200 and set(statuses) == {200, 429}, statuses
    assert answer, "no answer shown"


def test_a_png_the_browser_colour_manages_or_animates_is_shown_by_the_services_preview(page, client, tmp_path):
    """A PNG with a gAMA of 1.0 was drawn gamma-corrected by the browser (grey 64 shown as 137) while the model reads
    the stored values; an animated PNG was shown as its animation while the model read its default image. The
    first is shown by the service's preview; the second by its refusal (422), as every panel refuses it."""
    from hostile_files import animated_png

    ramp = np.tile(np.arange(256, dtype=np.uint8), (16, 1))
    stored = io.BytesIO()
    Image.fromarray(ramp).save(stored, format="PNG")
    chunk = b"gAMA" + struct.pack(">I", 100_000)  # gamma 1.0: linear light
    gamma = struct.pack(">I", 4) + chunk + struct.pack(">I", zlib.crc32(chunk))
    linear = tmp_path / "linear.png"
    linear.write_bytes(stored.getvalue()[:33] + gamma + stored.getvalue()[33:])  # after IHDR (8 + 25 bytes)
    connect(page, TOKENS[27])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(linear)
    shown = shown_pixels(page, "#preview img[data-source=service]")
    np.testing.assert_array_equal(shown, ramp)
    wait_for_panels(page)
    page.locator("#file").set_input_files(animated_png(tmp_path / "animated.png"))
    page.locator("#preview .panel-error").wait_for(timeout=ANSWER_MS)
    assert "an animated PNG of 2 frames" in page.locator("#preview").inner_text()
    wait_for_panels(page, "error")


def test_the_answer_names_its_question_and_an_edited_question_is_marked_not_asked(page, chest_xray):
    """The Ask card showed the answer alone: a second question typed under it read as answered by it."""
    connect(page, TOKENS[28])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(chest_xray)
    wait_for_panels(page)
    ask(page, QUESTION)
    assert page.locator("#vqa .answer").get_attribute("data-question") == QUESTION
    assert f"Q: {QUESTION}" in page.locator("#vqa .answer").inner_text()
    assert page.locator("#vqa .stale").is_hidden()
    page.get_by_label("Question").fill("Which side is the effusion on?")
    assert page.locator("#vqa .stale").is_visible()
    page.get_by_label("Question").fill(QUESTION)
    assert page.locator("#vqa .stale").is_hidden()
    assert page.locator("#vqa [data-prompt-warnings]").count() == 0
    partly = "Is there a ☃ 你好 nodule?"  # words the question encoder does not know: answered, said so
    page.get_by_label("Question").fill(partly)
    page.get_by_role("button", name="Ask").click()
    page.locator(f"#vqa[data-state=done] .answer[data-question='{partly}']").wait_for(timeout=ANSWER_MS)
    warning = page.locator("#vqa [data-prompt-warnings]").inner_text()
    assert "of the question (or pieces of words) this VQA model does not know: none of its training questions held " \
           "them, yet they may sway the answer" in warning or "held it, yet it may sway the answer" in warning, warning
    assert "☃" not in warning


def test_a_service_restarted_with_another_setup_is_described_again_at_the_next_read(page, chest_xray):
    """/v1/models was read once, at Connect: a service restarted behind the page with a VQA model (or another index,
    labels, limits) was still described as the old one, Ask disabled. Here the first description is of a service
    without a VQA model and an index called "old"; the service answering the read has both."""
    answers = []

    def old_service_once(route):
        answers.append(route.request.url)
        if len(answers) > 1:
            route.fallback()
            return
        answer = route.fetch()
        models = answer.json()
        models["models"][0]["vqa"] = None
        models["models"][0]["index"]["name"] = "old"
        route.fulfill(response=answer, json=models)

    page.route("**/v1/models", old_service_once)
    connect(page, TOKENS[29])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    assert "index old" in page.locator("#model-info").inner_text()
    assert page.get_by_role("button", name="Ask").is_disabled()
    page.locator("#file").set_input_files(chest_xray)
    wait_for_panels(page)
    assert len(answers) == 2 and "index old" not in page.locator("#model-info").inner_text()
    assert page.get_by_role("button", name="Ask").is_enabled()
    ask(page, QUESTION)
    assert page.locator("#vqa .answer").count() == 1


def retrained(route):
    """A /v1/models answer as the service gives it after the model was retrained under the same folder name."""
    answer = route.fetch()
    models = answer.json()
    models["models"][0]["fingerprint"]["weights_sha256"] = "0" * 64
    route.fulfill(response=answer, json=models)


def test_the_answers_of_a_service_changed_behind_the_page_leave_it_at_the_next_question(page, chest_xray):
    """Ask described the service again and, when it had changed (here: a model retrained and redeployed under the
    same folder name, told by its weights' digest), kept the previous service's zero-shot, heatmap over the image,
    similar cases and draft on the page as current. They now leave it; an unchanged service keeps them."""
    connect(page, TOKENS[34])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(chest_xray)
    wait_for_panels(page)
    page.locator("#explain .toggle button[data-method=patch_text]").click()
    page.locator("#preview img.overlay").wait_for(timeout=ANSWER_MS)
    ask(page, QUESTION)  # the same service: the answers stay
    wait_for_panels(page)
    assert page.locator("#preview img.overlay").count() == 1

    page.route("**/v1/models", retrained)
    ask(page, QUESTION)
    wait_for_panels(page, "idle")
    assert page.locator("#preview img.overlay").count() == 0
    assert page.locator("#similar .case").count() == 0 and page.locator("#zero-shot .bars").count() == 0
    assert "previous service" in page.locator("#draft").inner_text()
    assert "read the image again" in page.locator("#read-status").inner_text()
    # the question is answered by the service as it is now (ask() may return on the previous answer's "done":
    # the page describes the service again before it asks)
    page.locator("#vqa[data-state=done] .answer").wait_for(timeout=ANSWER_MS)
    assert page.locator("#vqa .answer").count() == 1


def test_a_read_on_its_way_when_a_question_finds_the_service_changed_is_dropped(page, chest_xray):
    """Ask found the service changed (here: the model retrained under the same folder name) and cleared the panels,
    but the answers of a read started before the change still filled them as they came: a panel showed the previous
    service's answer as current. They are now dropped, and "Read image" is offered again."""
    held = []
    connect(page, TOKENS[39])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(chest_xray)
    wait_for_panels(page)
    page.route("**/v1/search", lambda route: held.append(route))  # the next read's similar cases wait
    page.get_by_role("button", name="Read image").click()
    page.locator("#similar[data-state=busy]").wait_for(timeout=ANSWER_MS)  # the previous read's answers have gone
    page.locator("#draft[data-state=done]").wait_for(timeout=ANSWER_MS)
    assert len(held) == 1 and page.locator("#similar").get_attribute("data-state") == "busy"

    page.route("**/v1/models", retrained)
    page.get_by_label("Question").fill(QUESTION)
    page.get_by_role("button", name="Ask").click()
    page.locator("#vqa[data-state=done] .answer").wait_for(timeout=ANSWER_MS)
    wait_for_panels(page, "idle")
    with page.expect_response("**/v1/search") as search:
        held[0].fallback()
    assert search.value.status == 200
    page.wait_for_timeout(500)  # the answer has reached the page's script by now
    assert [page.locator(f"#{panel}").get_attribute("data-state") for panel in PANELS] == ["idle"] * len(PANELS)
    assert page.locator("#similar .case").count() == 0 and "previous service" in page.locator("#similar").inner_text()
    assert "read the image again" in page.locator("#read-status").inner_text()
    assert page.get_by_role("button", name="Read image").is_enabled()
    assert page.locator("#vqa .answer").count() == 1  # the question, asked of the service as it is now, stays


def linear_rgb_icc_profile() -> bytes:
    """A valid ICC v2 RGB display profile: sRGB's primaries, a linear tone curve (gamma 1.0)."""
    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    linear = b"curv" + bytes(4) + struct.pack(">IH", 1, 256) + bytes(2)
    name = b"linear sRGB\0"
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", len(name)) + name + bytes(79)),
            (b"cprt", b"text" + bytes(4) + b"none\0"), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)), (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
            (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)), (b"rTRC", linear), (b"gTRC", linear), (b"bTRC", linear)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags:
        data += bytes(-(offset + len(data)) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + b"none" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12)
              + b"acspAPPL" + bytes(24) + s15(0.9642) + s15(1.0) + s15(0.8249) + b"none" + bytes(44))
    return header + struct.pack(">I", len(tags)) + table + data


def test_a_jpeg_with_an_icc_profile_is_shown_by_the_services_preview(page, client, tmp_path):
    """A JPEG carrying an ICC profile (APP2 ICC_PROFILE) was drawn colour-managed by the browser (a linear profile's
    grey 64 shown as 137) while the model reads the stored values: it is shown by the service's preview, as a PNG
    with iCCP is; a JPEG without one is still shown by the browser."""
    ramp = np.stack([np.tile(np.arange(256, dtype=np.uint8), (16, 1))] * 3, axis=-1)
    plain, profiled = tmp_path / "plain.jpg", tmp_path / "linear-icc.jpg"
    Image.fromarray(ramp).save(plain, quality=100, subsampling=0)
    Image.fromarray(ramp).save(profiled, quality=100, subsampling=0, icc_profile=linear_rgb_icc_profile())
    connect(page, TOKENS[35])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(plain)
    page.locator("#preview img[data-source=browser]").wait_for(timeout=ANSWER_MS)
    wait_for_panels(page)
    page.locator("#file").set_input_files(profiled)
    shown = shown_pixels(page, "#preview img[data-source=service]")
    expected = png_answer(client.post("/v1/preview", headers={"Authorization": f"Bearer {TOKENS[35]}"},
                                      files={"image": ("image", profiled.read_bytes())}))
    np.testing.assert_array_equal(shown, expected)
    assert np.abs(shown[:, 64].astype(int) - 64).max() <= 2  # the stored grey, not the colour-managed one
    wait_for_panels(page)


def test_a_cmyk_jpeg_is_shown_by_the_services_preview(page, client, tmp_path):
    """A CMYK JPEG (four components, Adobe APP14) was drawn by the browser, which turns CMYK into RGB its own way (as
    Adobe's inverted CMYK, or colour-managed with a CMYK profile of its own) while the model reads Pillow's plain
    conversion: it is shown by the service's preview, as a JPEG with an ICC profile is; a grey JPEG (one component)
    is still shown by the browser."""
    ramp = np.tile(np.arange(256, dtype=np.uint8), (16, 1))
    grey, cmyk = tmp_path / "grey.jpg", tmp_path / "cmyk.jpg"
    Image.fromarray(ramp).save(grey, quality=100)
    zeros = np.zeros_like(ramp)
    Image.fromarray(np.stack([zeros, zeros, zeros, ramp], axis=-1), mode="CMYK").save(cmyk, quality=100)
    page.locator("#file").set_input_files(grey)  # before Connect: nothing is read, the picture is chosen
    page.locator("#preview img[data-source=browser]").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(cmyk)
    page.locator("#preview p", has_text="Connect to see the service's preview").wait_for(timeout=ANSWER_MS)
    assert "a CMYK JPEG" in page.locator("#preview").inner_text()
    connect(page, TOKENS[38])
    shown = shown_pixels(page, "#preview img[data-source=service]")
    expected = png_answer(client.post("/v1/preview", headers={"Authorization": f"Bearer {TOKENS[38]}"},
                                      files={"image": ("image", cmyk.read_bytes())}))
    np.testing.assert_array_equal(shown, expected)
    assert np.abs(shown[:, 64].astype(int) - (255 - 64)).max() <= 2  # the plain conversion: 255 - K
    wait_for_panels(page)


def test_thumbnails_refused_while_the_token_is_busy_are_waited_out_as_the_panels_are(browser, model_dir, index_dir,
                                                                                   phantom_dir, chest_xray):
    """A thumbnail refused for the token's rate (429) was asked again six times only: with the token busy meanwhile
    (here another client of it spends every request it earns for 8 s) the case was left with its id, never asked
    again, while the panels wait out 429 for up to 120 s. Thumbnails now wait within the same budget."""
    import time

    settings = ServeSettings(data_root=phantom_dir, rate_limit=1.0, rate_burst=5)  # a read's five requests
    app = create_app(model_dir, index=index_dir, settings=settings, token_digests=[token_digest(TOKENS[36])])
    with Server(app) as running, httpx.Client(base_url=running.url, timeout=10) as other:
        context, page, statuses = read_with_thumbnails(browser, running.url, TOKENS[36], chest_xray, 4)
        busy_until = time.monotonic() + 8
        while time.monotonic() < busy_until:
            other.get("/v1/models", headers={"Authorization": f"Bearer {TOKENS[36]}"})
        shown = thumbnails_when_settled(page)
        context.close()
    assert shown == ["shown"] * 4, (shown, statuses)
    assert statuses.count(429) >= 6, statuses  # the thumbnails were refused again and again meanwhile


def test_fewer_than_two_labels_ask_no_zero_shot_or_explanation_but_still_the_similar_cases_and_draft(page, watch,
                                                                                                      chest_xray):
    """With the Labels field emptied, /v1/zero-shot refused (422 "labels: Field required") while /v1/explain answered
    over the model's default classes, in the same read; the page then refused the whole read, so the similar cases
    and the draft, which take no labels, were blocked too. Now neither label panel is asked and each says why
    (the service's minimum of two distinct labels), while the similar cases and the draft are read."""
    connect(page, TOKENS[37])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    labels = page.get_by_label("Labels (comma-separated)")
    for given, count in (("", 0), (" nodule , nodule ", 1)):
        labels.fill(given)
        if count == 0:
            page.locator("#file").set_input_files(chest_xray)
        else:
            page.get_by_role("button", name="Read image").click()
        # the label panels say so in the same step as the others are asked (a status of the read before is alike)
        page.locator("#zero-shot .body", has_text=f"({count} given").wait_for(timeout=ANSWER_MS)
        page.wait_for_function("() => document.querySelector('#read-status').textContent.endsWith("
                               "'Zero-shot findings not asked: fewer than 2 labels.')", timeout=ANSWER_MS)
        for panel in ("similar", "draft"):
            page.locator(f"#{panel}[data-state=done]").wait_for(timeout=ANSWER_MS)
        for panel in ("zero-shot", "explain"):
            assert page.locator(f"#{panel}").get_attribute("data-state") == "idle"
            assert f"at least 2 distinct labels ({count} given" in page.locator(f"#{panel} .body").inner_text()
        assert page.locator("#read-status").inner_text().startswith("Answered.")
        page.locator("#similar .case").first.wait_for(timeout=ANSWER_MS)
    assert not [url for url in watch.requests if url.endswith(("/v1/zero-shot", "/v1/explain"))], watch.requests
    labels.fill("nodule, no_finding")
    page.get_by_role("button", name="Read image").click()
    wait_for_panels(page)
    assert page.locator("#read-status").inner_text() == "Answered."


@pytest.fixture(scope="module")
def pairs_only_service(phantom_dir, tmp_path_factory):
    """A model trained on image-report pairs alone (a manifest of image, text and split: no label column, so
    /v1/models gives no labels) and its case index, served with the data root for thumbnails."""
    import csv
    import shutil

    folder = tmp_path_factory.mktemp("page-pairs")
    data = folder / "pairs"
    shutil.copytree(phantom_dir / "images", data / "images")
    with (phantom_dir / "manifest.csv").open(newline="") as source, \
            (data / "manifest.csv").open("w", newline="") as target:
        writer = csv.writer(target)
        writer.writerow(["image", "text", "split"])
        writer.writerows([row["image"], row["text"], row["split"]] for row in csv.DictReader(source))
    model = train_tiny_model(data, folder / "run")
    index = build_case_index(model, data, folder / "cases.idx")
    app = create_app(model, index=index, settings=ServeSettings(data_root=data),
                     token_digests=[token_digest(TOKENS[0])])
    with Server(app) as running:
        yield running, data


def test_a_model_trained_on_image_report_pairs_alone_gets_its_similar_cases_and_draft(browser, pairs_only_service):
    """A model without label columns (/v1/models' labels {}) left the Labels field empty, and the page refused
    every read before anything was sent: no similar case and no draft, though the service answers both. Now they
    are read as the API answers them, and the zero-shot and explanation panels say they need labels."""
    running, data = pairs_only_service
    image = sorted((data / "images").glob("*.png"))[4]
    watch = PageWatch(running.url)
    context, page = open_watched(browser, running.url, watch)
    connect(page, TOKENS[0])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(image)
    for panel in ("similar", "draft"):
        page.locator(f"#{panel}[data-state=done]").wait_for(timeout=ANSWER_MS)
    page.wait_for_function("() => document.querySelector('#read-status').textContent.startsWith('Answered')",
                           timeout=ANSWER_MS)
    fields = page_fields(page)
    shown = {panel: (page.locator(f"#{panel}").get_attribute("data-state"),
                     page.locator(f"#{panel} .body").inner_text()) for panel in ("zero-shot", "explain")}
    status = page.locator("#read-status").inner_text()
    with httpx.Client(base_url=running.url, timeout=60) as http:
        headers = {"Authorization": f"Bearer {TOKENS[0]}"}
        assert http.get("/v1/models", headers=headers).json()["models"][0]["labels"] == {}

        def post(route: str, form: dict) -> dict:
            answer = http.post(route, headers=headers, files={"image": ("image", image.read_bytes())}, data=form)
            assert answer.status_code == 200, answer.text
            return answer.json()

        check_similar(page, post("/v1/search", {"k": fields["k"]}))
        check_draft(page, post("/v1/report/draft", {"k": fields["k"], "min_similarity": fields["min_similarity"],
                                                     "min_support": fields["min_support"]}))
    context.close()
    assert fields["labels"] == ""
    assert status == "Answered. Zero-shot findings not asked: fewer than 2 labels.", status
    for panel, (state, text) in shown.items():
        assert state == "idle" and "at least 2 distinct labels (0 given" in text, (panel, text)
        assert "trained without label columns" in text
    assert not [url for url in watch.requests if url.endswith(("/v1/zero-shot", "/v1/explain"))], watch.requests
    assert [url for url in watch.requests if url.endswith(("/v1/search", "/v1/report/draft"))]
    assert not watch.refused and not watch.errors, watch.errors


def test_the_answer_to_a_question_and_its_refusal_are_announced_in_a_polite_status_line(page, chest_xray):
    """After Ask the answer (or the refusal) replaced the card's body, in no live region, focus left on Ask: a
    screen reader said nothing. A polite status line now sums it up in one line, as #read-status does for a read."""
    connect(page, TOKENS[40])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.locator("#file").set_input_files(chest_xray)
    wait_for_panels(page)
    status = page.locator("#vqa-status")
    assert (status.get_attribute("role"), status.get_attribute("aria-live")) == ("status", "polite")
    assert status.evaluate("node => !node.closest('.body')")  # not in the part each answer replaces
    ask(page, QUESTION)
    answer = page.locator("#vqa .answer")
    shown = f"{answer.get_attribute('data-answer')}, {answer.locator('.probability').inner_text()}"
    assert status.inner_text() == f"Answered: {shown}.", status.inner_text()
    page.get_by_label("Question").fill("?")  # no word the model knows: refused
    page.get_by_role("button", name="Ask").click()
    page.locator("#vqa[data-state=error]").wait_for(timeout=ANSWER_MS)
    page.wait_for_function("() => document.querySelector('#vqa-status').textContent.startsWith('Not answered')",
                           timeout=ANSWER_MS)
    assert "no word this VQA model knows" in status.inner_text() and status.inner_text().startswith(
        "Not answered: 422")


def test_a_service_without_an_index_is_not_asked_for_similar_cases_or_a_draft(browser, model_dir, chest_xray):
    """Without --index every read still posted to /v1/search and /v1/report/draft, and ended "Answered; 2 of 3 panels
    refused." with two 503 boxes. They are not asked now: the two panels say why, the status counts the panels
    asked."""
    app = create_app(model_dir, settings=ServeSettings(), token_digests=[token_digest(TOKENS[41])])
    with Server(app) as running:
        watch = PageWatch(running.url)
        context, page = open_watched(browser, running.url, watch)
        connect(page, TOKENS[41])
        page.locator("#connected").wait_for(timeout=ANSWER_MS)
        page.locator("#file").set_input_files(chest_xray)
        page.wait_for_function("() => /^(Answered|Not answered)/.test("
                               "document.querySelector('#read-status').textContent)", timeout=ANSWER_MS)
        panels = {panel: (page.locator(f"#{panel}").get_attribute("data-state"),
                          page.locator(f"#{panel} .body").inner_text()) for panel in ("similar", "draft")}
        status = page.locator("#read-status").inner_text()
        context.close()
    idle = ("idle", "No case index on this service (medvl serve --index).")
    assert panels == dict.fromkeys(("similar", "draft"), idle), panels
    assert status == "Answered.", status
    assert not [url for url in watch.requests if url.endswith(("/v1/search", "/v1/report/draft"))], watch.requests
    assert not watch.refused and not watch.errors, watch.errors


def test_fewer_cases_than_a_draft_needs_are_searched_but_not_drafted_and_ranks_stay_whole_at_360px(browser, server,
                                                                                                   chest_xray):
    """'Number of cases' took 1 or 2, which /v1/report/draft always refuses (it needs 3, rag.draft.MIN_CASES): the
    read ended with the draft refused. The similar cases are now listed with that k and the draft panel says it needs
    3 (the minimum /v1/models gives) without asking. At 360 px a case's rank "#1" broke over two lines."""
    from medvl.rag.draft import MIN_CASES

    watch = PageWatch(server.url)
    context = browser.new_context(viewport={"width": 360, "height": 800}, service_workers="block")
    context.route("**/*", watch.route)
    page = context.new_page()
    page.goto(server.url + "/")
    connect(page, TOKENS[42])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    page.get_by_label("Number of cases").fill(str(MIN_CASES - 1))
    page.locator("#file").set_input_files(chest_xray)
    page.wait_for_function("() => /^(Answered|Not answered)/.test("
                           "document.querySelector('#read-status').textContent)", timeout=ANSWER_MS)
    status = page.locator("#read-status").inner_text()
    draft = (page.locator("#draft").get_attribute("data-state"), page.locator("#draft .body").inner_text())
    cases = page.locator("#similar .case").count()
    ranks = page.locator("#similar .case .rank").evaluate_all(
        "nodes => nodes.map(node => [node.textContent, node.getBoundingClientRect().height, "
        "parseFloat(getComputedStyle(node).lineHeight)])")
    context.close()
    assert status == "Answered." and cases == MIN_CASES - 1, (status, cases)
    assert draft[0] == "idle" and f"a draft needs at least {MIN_CASES} cases" in draft[1], draft
    assert not [url for url in watch.requests if url.endswith("/v1/report/draft")]
    assert ranks and all(height < 1.5 * line for _, height, line in ranks), ranks  # one line each
    assert not watch.refused and not watch.errors


def drop_files(page, paths: list[Path]) -> None:
    """Drop several files at once on the page's drop zone, in this order, as a user drags them from a folder."""
    transfer = page.evaluate_handle(
        "files => { const transfer = new DataTransfer();"
        " for (const [bytes, name] of files) transfer.items.add(new File([new Uint8Array(bytes)], name,"
        " {type: 'image/png'})); return transfer; }",
        [[list(path.read_bytes()), path.name] for path in paths])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def test_a_question_about_two_dropped_films_is_asked_about_both_in_order_and_a_third_is_said_left_out(
        page, watch, client, vqa_dir):
    """The Ask card said "up to 2 images", yet the page kept the first of the files dropped and asked about it
    alone, without a word: a question comparing two films was answered on one. The films dropped together are now
    sent in the order given, up to the VQA model's max_images (/v1/vqa's several image fields), the card lists them,
    and one beyond the limit is named as not sent; the answer is the API's for the same films."""
    import json

    questions = json.loads((vqa_dir.parent / "phantom" / "vqa" / "train.json").read_text())
    pair = next(question for question in questions if len(question.get("image_names", [])) == 2)
    films = [vqa_dir.parent / "phantom" / "vqa" / name for name in pair["image_names"]]
    other = next(vqa_dir.parent / "phantom" / "vqa" / q["image_name"] for q in questions
                 if q["image_name"] not in pair["image_names"])
    headers = {"Authorization": f"Bearer {TOKENS[44]}"}
    assert client.get("/v1/models", headers=headers).json()["models"][0]["vqa"]["max_images"] == 2
    connect(page, TOKENS[43])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    drop_files(page, [*films, other])
    wait_for_panels(page)  # the first film is read
    assert page.locator("#vqa-note").inner_text() == "up to 2 images"
    assert page.locator("#vqa-films").inner_text() == (
        f"Asked about 2 images, in this order: 1. {films[0].name}, 2. {films[1].name}. "
        f"Not sent: {other.name} (this VQA model takes up to 2).")
    assert "2 more files chosen with it for a question" in page.locator("#file-info").inner_text()
    ask(page, pair["question"])
    answer = client.post("/v1/vqa", headers=headers, data={"question": pair["question"]},
                         files=[("image", ("image", film.read_bytes())) for film in films])
    assert answer.status_code == 200, answer.text
    check_vqa(page, answer.json())
    assert page.locator("#vqa .answer").get_attribute("data-images") == "2"
    [body] = [body for url, body in zip(watch.requests, watch.bodies, strict=True) if url.endswith("/v1/vqa")]
    assert body.count(b'; name="image"; filename=') == 2
    assert films[0].read_bytes() in body and films[1].read_bytes() in body and other.read_bytes() not in body
    assert body.index(films[0].read_bytes()) < body.index(films[1].read_bytes())


def damaged_idat_png(source: Path, target: Path) -> Path:
    """``source`` with bytes in the middle of its image data overwritten (the chunk's CRC made right again, its
    IEND kept): browsers decode what they can of it, Pillow refuses it."""
    data = bytearray(source.read_bytes())
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start:start + 4])[0]
    middle = start + 8 + length // 2
    data[middle:middle + 16] = b"\xff" * 16
    data[start + 8 + length:start + 12 + length] = struct.pack(">I", zlib.crc32(data[start + 4:start + 8 + length]))
    target.write_bytes(bytes(data))
    return target


def test_a_png_or_jpeg_the_service_refuses_as_unreadable_is_not_left_shown_as_a_picture(page, watch, phantom_dir,
                                                                                         chest_xray, tmp_path):
    """A PNG cut short is partly decoded by the browser (the top of the film over black): the page showed that as
    the image while every panel refused it (422 truncated). A PNG or JPEG without its end (IEND, EOI) is now shown
    by the service's preview, which says why it does not read it; and a picture the service refuses alike in every
    panel (image data damaged mid-file) is replaced by that refusal after the read."""
    png = sorted((phantom_dir / "images").glob("*.png"))[10]
    cut_png, cut_jpeg = tmp_path / "cut.png", tmp_path / "cut.jpg"
    cut_png.write_bytes(png.read_bytes()[:len(png.read_bytes()) * 2 // 3])
    cut_jpeg.write_bytes(chest_xray.read_bytes()[:len(chest_xray.read_bytes()) // 2])
    damaged = damaged_idat_png(png, tmp_path / "damaged.png")
    watch.max_requests = 3 + 3 * (4 + 1) + 6  # page, health, models; three reads and previews; a few asked again
    connect(page, TOKENS[45])
    page.locator("#connected").wait_for(timeout=ANSWER_MS)
    for path in (cut_png, cut_jpeg, damaged):
        page.locator("#file").set_input_files(path)
        wait_for_panels(page, "error")
        assert "422" in page.locator("#zero-shot .panel-error").inner_text()
        refusal = page.locator("#preview .panel-error")
        refusal.wait_for(timeout=ANSWER_MS)
        assert refusal.inner_text().startswith("422 "), (path.name, refusal.inner_text())
        assert page.locator("#preview img").count() == 0, path.name
