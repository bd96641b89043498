"""The web page in a real browser: Debian's headless chromium (chromium-driver, Selenium)
against ``ufcal serve`` on the fake engine (tests/fake_app.py: the question's ``p=`` sets
P(A), ``answers=[...]`` a free-form question's samples, ``engine-error`` fails the engine),
with API keys and UFCAL_LOG_TEXT on. One browser
session serves the whole module; the last test loads the page on the real vLLM engine.

A missing chromium skips these tests loudly; with UFCAL_REQUIRE_DEPLOY_TOOLS=1 (CI) it
fails them. ``UFCAL_WEB_SCREENSHOT=path.png`` keeps the screenshot (the README image comes from
tests/web_bench.py --screenshot)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import (
    chromium_paths,
    network_requests,
    page_load,
    small_png,
    start_chromium,
)
from tests.servers import ServerProcess, free_port, missing_tool, running

KEY = "web-test-key-0123456789"
WAIT_S = 30.0
MAX_SCREENSHOT_BYTES = 300_000
MAX_TRANSFER_BYTES = 300_000


def _require_chromium() -> None:
    if chromium_paths() is not None:
        return
    msg = (
        "chromium / chromium-driver are not installed: browser tests SKIPPED "
        "(make tools installs them: apt-get install chromium chromium-driver)"
    )
    missing_tool(msg)


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    _require_chromium()
    browser = start_chromium()
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("web")
    port = free_port()
    env = {
        "UFCAL_API_KEYS": KEY,
        "UFCAL_LOG_TEXT": "true",
        "UFCAL_LOG_LEVEL": "warning",
        "UFCAL_DB_PATH": str(logs / "web.db"),
    }
    argv = [sys.executable, "-m", "tests.fake_app", "--port", str(port)]
    with running(ServerProcess("web", argv, env, port, logs), "/readyz", 60) as started:
        yield started


# -- helpers --------------------------------------------------------------------------------


def wait(driver: WebDriver, condition: Any, what: str, timeout: float = WAIT_S) -> Any:
    try:
        # the page re-renders its tables on every poll: an element may go stale mid-check
        return WebDriverWait(
            driver,
            timeout,
            poll_frequency=0.05,
            ignored_exceptions=[StaleElementReferenceException],
        ).until(condition)
    except TimeoutException:
        console = [e["message"] for e in driver.get_log("browser")]
        raise AssertionError(f"timed out waiting for {what}; console: {console}") from None


def text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def shown(driver: WebDriver, element_id: str) -> bool:
    return bool(driver.find_element(By.ID, element_id).is_displayed())


def open_page(driver: WebDriver, base_url: str) -> None:
    """Load the page with the key already given (sessionStorage), data rendered."""
    driver.get(base_url + "/")
    driver.execute_script("sessionStorage.setItem('ufcal-api-key', arguments[0])", KEY)
    driver.get(base_url + "/")
    wait(driver, lambda d: text(d, "window-size") == "1000", "the live calibration")


def api(server: ServerProcess, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(
        method,
        server.base_url + path,
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )


def fill_form(driver: WebDriver, question: str, options: list[str]) -> None:
    """Type a question and exactly these options (adding or removing inputs)."""
    driver.execute_script(
        """
        const [question, options] = arguments;
        document.getElementById('question').value = question;
        const list = document.getElementById('options');
        while (list.children.length > 1) list.lastElementChild.remove();
        list.querySelector('input').value = '';
        """,
        question,
        options,
    )
    add = driver.find_element(By.ID, "add-option")
    for i, option in enumerate(options):
        if i:
            add.click()
        inputs = driver.find_elements(By.CSS_SELECTOR, ".option-input")
        inputs[i].send_keys(option)


def fill_answer(driver: WebDriver, answer: str | None) -> None:
    """Type the answer to score (None: leave the field empty)."""
    field = driver.find_element(By.ID, "answer")
    field.clear()
    if answer is not None:
        field.send_keys(answer)


def fill_free_form(driver: WebDriver, question: str, answer: str | None) -> None:
    """Choose a free-form question (no options) and type it and the answer to score."""
    driver.find_element(By.ID, "task-free").click()
    wait(driver, lambda d: not shown(d, "options-set"), "the options to go")
    driver.execute_script("document.getElementById('question').value = arguments[0]", question)
    fill_answer(driver, answer)


def submit(driver: WebDriver, timeout: float = WAIT_S) -> None:
    driver.find_element(By.ID, "submit").click()
    wait(driver, lambda d: d.find_element(By.ID, "submit").is_enabled(), "the reply", timeout)


def score_in_page(driver: WebDriver, question: str, options: list[str]) -> None:
    """Score through the form and wait for this reply's result (a new id)."""
    before = text(driver, "result-meta") if shown(driver, "result") else ""
    fill_form(driver, question, options)
    submit(driver)
    wait(driver, lambda d: shown(d, "result") and text(d, "result-meta") != before, "the result")


def first_row_text(driver: WebDriver) -> str:
    rows = driver.find_elements(By.CSS_SELECTOR, "#scores-body tr")
    return str(rows[0].text) if rows else ""


def label_count(driver: WebDriver) -> int:
    return int(text(driver, "label-count"))


# -- tests ----------------------------------------------------------------------------------


def test_key_prompt_shows_the_401_message_then_accepts_a_good_key(
    driver: WebDriver, server: ServerProcess
) -> None:
    driver.get(server.base_url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(server.base_url + "/")
    wait(driver, lambda d: shown(d, "key-panel"), "the key prompt")
    assert text(driver, "key-error") == ""  # asked, not yet refused

    driver.find_element(By.ID, "key-input").send_keys("not-the-key")
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
    headers = {"Authorization": "Bearer not-the-key"}  # the API's own words for it:
    wrong = httpx.get(server.base_url + "/calibration", headers=headers, timeout=10)
    assert wrong.status_code == 401
    wait(driver, lambda d: text(d, "key-error") == wrong.json()["detail"], "the 401 message")
    assert shown(driver, "key-panel")

    field = driver.find_element(By.ID, "key-input")
    field.clear()
    field.send_keys(KEY)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(driver, lambda d: not shown(d, "key-panel"), "the key panel to close")
    wait(driver, lambda d: text(d, "window-size") == "1000", "the live calibration")
    assert "engine ready" in text(driver, "engine")


def test_first_paint_and_bytes_transferred(driver: WebDriver, server: ServerProcess) -> None:
    """A cold load (empty cache): every byte of the page and its first API calls counted."""
    open_page(driver, server.base_url)
    driver.execute_cdp_cmd("Network.clearBrowserCache", {})
    driver.get(server.base_url + "/")
    wait(driver, lambda d: text(d, "window-size") == "1000", "the live calibration")
    load = page_load(driver)
    print(f"\nweb page cold load (fake engine, shared machine): {load}")
    assert load.requests >= 6  # page, script, style, icon, the first API calls
    assert load.transferred_bytes < MAX_TRANSFER_BYTES
    assert load.first_paint_ms > 0  # the 1 s target is measured by tests/web_bench.py


def test_score_shows_answer_and_chains_and_feedback_moves_the_label_count(
    driver: WebDriver, server: ServerProcess
) -> None:
    open_page(driver, server.base_url)
    before = label_count(driver)
    score_in_page(driver, "Which planet is the largest? p=0.83", ["Jupiter", "Mars", "Venus"])

    assert text(driver, "answer-label") == "A"
    assert text(driver, "answer-text") == "Jupiter"
    meta = text(driver, "result-meta")
    score_id = meta.split()[1]
    stored = api(server, "GET", "/scores?limit=5").json()["scores"]
    reply = next(s for s in stored if s["id"] == score_id)
    assert text(driver, "confidence") == f"{reply['confidence']:.3f}"
    assert text(driver, "raw-confidence") == f"{reply['confidence']:.3f}"  # no calibrator yet
    assert text(driver, "result-calibrator") == "no calibrator"
    # P(A) = 0.83, P(B) = 0.17 start chains; the fake model stays with each start
    chains = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#chains li")]
    assert chains == ["A\nweight 0.830", "B\nweight 0.170"]
    rows = driver.find_elements(By.CSS_SELECTOR, "#distribution svg g.row")
    assert len(rows) == 3
    assert "P 0.830" in rows[0].text and "P 0.170" in rows[1].text

    driver.find_element(By.ID, "result-right").click()
    wait(driver, lambda d: label_count(d) == before + 1, "the label count to go up")
    assert "recorded" in text(driver, "result-feedback")

    # the recent scores table: the question (UFCAL_LOG_TEXT on) and a feedback button
    score_in_page(driver, "Which is a gas? p=0.4", ["Iron", "Helium"])
    wait(driver, lambda d: "Which is a gas? p=0.4" in first_row_text(d), "the recent scores")
    assert "B" in first_row_text(driver).split()
    # one atomic click: the table is re-rendered by every poll
    driver.execute_script("document.querySelector('#scores-body tr button.bad').click()")
    wait(driver, lambda d: label_count(d) == before + 2, "the label count to go up again")
    wait(driver, lambda d: "wrong" in first_row_text(d), "the row's feedback")
    bars = driver.find_elements(By.CSS_SELECTOR, "#diagram rect.bar.returned")
    assert bars  # the reliability diagram draws the labelled bins


# Issue 10's additions to the API, as the page expects them (in the browser, over the real
# replies): /score's raw_confidence and calibrator, /calibration's raw and returned
# reports, and GET /calibrators.
_CALIBRATOR_REPLIES_JS = """
const real = window.fetch;
const json = (body, status) =>
  new Response(JSON.stringify(body), {status, headers: {'Content-Type': 'application/json'}});
const metrics = (ece) => ({ece, brier: 0.2, auroc: 0.7, accuracy: 0.6, ipr: 0, ce: 0.5});
window.fetch = async (url, options) => {
  const path = new URL(String(url), location.href).pathname;
  if (path === '/calibrators') {
    return json({calibrators: [
      {model: 'fake-model', method: 'uf', mode: 'logprobs', version: 3, kind: 'platt',
       params: {a: 1.2, b: -0.3}, labels: 120, positives: 70, negatives: 50, window: 1000,
       metrics: {before: metrics(0.21), after: metrics(0.04)}, fitted_at: 1796000000,
       status: 'active'},
      {model: 'fake-model', method: 'uf', mode: 'logprobs', version: 2, kind: 'isotonic',
       params: {}, labels: 60, positives: 30, negatives: 30, window: 1000,
       metrics: {before: metrics(0.25), after: metrics(0.09)}, fitted_at: 1795000000,
       status: 'retired'}]}, 200);
  }
  const response = await real(url, options);
  if (path !== '/calibration' && path !== '/score') return response;
  const body = await response.json();
  if (path === '/calibration' && response.ok) {
    body.raw = {...body, ece: 0.25};
    body.returned = {...body, ece: 0.05};
  }
  if (path === '/score' && response.ok) {
    body.raw_confidence = 0.9;
    body.calibrator = {version: 3, kind: 'platt', labels: 120};
  }
  return json(body, response.status);
};
"""


def test_page_shows_the_calibrator_fields_of_issue_10(
    driver: WebDriver, server: ServerProcess
) -> None:
    added = driver.execute_cdp_cmd(  # before the page's own script, for this test only
        "Page.addScriptToEvaluateOnNewDocument", {"source": _CALIBRATOR_REPLIES_JS}
    )
    try:
        open_page(driver, server.base_url)
    finally:
        driver.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": added["identifier"]}
        )
    score_in_page(driver, "Which one? p=0.7", ["this", "that"])
    assert text(driver, "raw-confidence") == "0.900"
    assert text(driver, "confidence") != "0.900"
    assert text(driver, "result-calibrator") == "platt v3 (120 labels)"
    wait(driver, lambda d: "platt v3" in text(d, "calibrator"), "the active calibrator")
    assert "ECE 0.210 → 0.040" in text(driver, "calibrator")
    # read each re-rendered table in one go
    statuses = driver.execute_script(
        "return [...document.querySelectorAll('#history-body tr')]"
        ".map(row => row.cells[3].textContent)"
    )
    assert statuses == ["active", "retired"]
    ece = driver.execute_script(
        "const row = [...document.querySelectorAll('#metrics-body tr')]"
        ".find(r => r.cells[0].textContent === 'ECE');"
        "return [row.cells[1].textContent, row.cells[2].textContent]"
    )
    assert ece == ["0.250", "0.050"]


@pytest.mark.parametrize(
    ("question", "options", "field"),
    [
        ("   ", ["Oxygen", "Helium"], "question"),
        ("Which one? p=0.7", ["Only this one"], "options"),
    ],
)
def test_bad_input_shows_the_apis_message_next_to_the_field(
    driver: WebDriver, server: ServerProcess, question: str, options: list[str], field: str
) -> None:
    open_page(driver, server.base_url)
    fill_form(driver, question, options)
    submit(driver)
    issues = api(server, "POST", "/score", {"question": question, "options": options}).json()
    expected = next(i["msg"] for i in issues["detail"] if i["loc"][:2] == ["body", field])
    wait(driver, lambda d: text(d, f"{field}-error") == expected, f"the {field} message")
    assert not shown(driver, "result")


FREE_QUESTION = (
    "What is the capital of Australia? "
    "answers=[Canberra|canberra|the city of Canberra|Melbourne|Canberra] p=0.7"
)


def groups_table(driver: WebDriver) -> list[list[str]]:
    """The groups table's cells, row by row (read in one go: no poll re-renders it, but a
    cell's members are a list)."""
    rows: list[list[str]] = driver.execute_script(
        "return [...document.querySelectorAll('#groups-body tr')].map(row =>"
        " [...row.cells].map(cell => cell.querySelector('ul') ?"
        " [...cell.querySelectorAll('li')].map(li => li.textContent).join(' | ') :"
        " cell.textContent))"
    )
    return rows


@pytest.mark.parametrize(
    ("answer", "match"),
    [(None, None), ("Sydney", "absent"), ("Canberra, Australia", "judge")],
)
def test_free_form_question_shows_the_groups_and_the_given_answer(
    driver: WebDriver, server: ServerProcess, answer: str | None, match: str | None
) -> None:
    open_page(driver, server.base_url)
    before = text(driver, "result-meta") if shown(driver, "result") else ""
    fill_free_form(driver, FREE_QUESTION, answer)
    submit(driver)
    wait(driver, lambda d: shown(d, "result") and text(d, "result-meta") != before, "the result")
    assert text(driver, "form-error") == ""
    # the same question through the API: the fake model is deterministic
    body: dict[str, Any] = {"question": FREE_QUESTION, "method": "uf"}
    if answer is not None:
        body["answer"] = answer
    reply = api(server, "POST", "/score", body).json()
    assert reply["task"] == "free_form"

    assert text(driver, "result-task") == "free_form"
    assert text(driver, "answer-label") == "A" and text(driver, "answer-text") == "Canberra"
    assert text(driver, "confidence") == f"{reply['confidence']:.3f}"
    assert shown(driver, "free-form")
    expected = []
    for i, group in enumerate(reply["groups"]):
        marks = (["model's"] if i == reply["answer"]["index"] else []) + (
            ["given"] if group["given"] else []
        )
        expected.append(
            [
                group["label"],
                group["representative"],
                " | ".join(group["members"]),
                str(group["count"]),
                f"{group['confidence']:.3f}",
                f"{group['raw_confidence']:.3f}",
                ", ".join(marks),
            ]
        )
    assert groups_table(driver) == expected
    members = "Canberra | canberra | the city of Canberra"
    if match == "judge":  # the given answer joins the group it means, as a member
        members += f" | {answer}"
    assert expected[0][:4] == ["A", "Canberra", members, "8"]
    assert expected[1][:4] == ["B", "Melbourne", "Melbourne", "2"]
    marked = driver.find_elements(By.CSS_SELECTOR, "#groups-body tr.given")
    ff = reply["free_form"]
    assert (
        text(driver, "ff-samples") == f"{ff['samples_taken']} · {ff['samples_usable']}" == "10 · 10"
    )
    assert text(driver, "ff-judge") == (
        f"{ff['judge_prompts']} · {ff['judge_rounds']} · {ff['judge_skipped']}"
    )
    usage = reply["usage"]
    assert text(driver, "ff-budget") == f"{usage['prompts']} / {usage['max_prompts']}"
    # the options UF ran over are the groups
    options = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#result-options li")]
    assert options == [f"{g['label']} {g['representative']}" for g in reply["groups"]]

    if answer is None:
        assert not shown(driver, "given") and not marked
        assert text(driver, "feedback-question") == "Was the answer right?"
        return
    given = reply["given"]
    assert given["match"] == match
    assert shown(driver, "given")
    assert text(driver, "given-text") == answer
    assert text(driver, "given-label") == reply["groups"][given["index"]]["label"]
    assert text(driver, "given-confidence") == f"{given['confidence']:.3f}"
    assert text(driver, "given-raw-confidence") == f"{given['raw_confidence']:.3f}"
    assert text(driver, "given-vs-model") == f"A · {reply['confidence']:.3f}"
    assert match in text(driver, "given-match")
    assert len(marked) == 1 and "given" in marked[0].text
    assert text(driver, "feedback-question") == "Was the given answer right?"
    if match == "absent":  # an option of its own, never said: exactly 0
        assert expected[-1][1:4] == ["Sydney", "Sydney", "0"]
        assert text(driver, "given-confidence") == "0.000"


def test_multiple_choice_answer_by_letter_index_or_text(
    driver: WebDriver, server: ServerProcess
) -> None:
    open_page(driver, server.base_url)
    question, options = "Which planet is the largest? p=0.8", ["Jupiter", "Mars", "Venus"]
    reply = api(
        server, "POST", "/score", {"question": question, "options": options, "answer": 1}
    ).json()
    for answer in ("b", "1", " Mars "):
        fill_answer(driver, answer)
        score_in_page(driver, question, options)
        assert text(driver, "result-task") == "multiple_choice"
        assert not shown(driver, "free-form")
        assert text(driver, "given-label") == "B" and text(driver, "given-text") == "Mars"
        assert text(driver, "given-confidence") == f"{reply['given']['confidence']:.3f}"
        assert text(driver, "given-vs-model") == f"A · {reply['confidence']:.3f}"
    # switching back and forth keeps the options; an empty answer sends none
    driver.find_element(By.ID, "task-free").click()
    driver.find_element(By.ID, "task-mc").click()
    fill_answer(driver, None)
    score_in_page(driver, question, options)
    assert not shown(driver, "given") and text(driver, "answer-text") == "Jupiter"


@pytest.mark.parametrize(
    ("options", "answer"),
    [
        (["Oxygen", "Helium"], "C"),
        (["Oxygen", "Helium"], "7"),
        (None, "the"),
    ],
)
def test_bad_answer_shows_the_apis_message_next_to_the_answer(
    driver: WebDriver, server: ServerProcess, options: list[str] | None, answer: str
) -> None:
    open_page(driver, server.base_url)
    question = "Which one? p=0.7"
    body: dict[str, Any] = {"question": question, "answer": answer}
    if options is None:
        fill_free_form(driver, question, answer)
    else:
        fill_form(driver, question, options)
        fill_answer(driver, answer)
        body["options"] = options
        body["answer"] = int(answer) if answer.isdigit() else answer  # what the page sends
    submit(driver)
    r = api(server, "POST", "/score", body)
    assert r.status_code == 422
    expected = next(i["msg"] for i in r.json()["detail"] if i["loc"] == ["body", "answer"])
    wait(driver, lambda d: text(d, "answer-error") == expected, "the answer's message")
    assert not shown(driver, "result")
    assert text(driver, "form-error") == ""


def test_engine_error_shows_the_apis_message(driver: WebDriver, server: ServerProcess) -> None:
    open_page(driver, server.base_url)
    fill_form(driver, "Please raise an engine-error", ["Oxygen", "Helium"])
    submit(driver)
    reply = api(server, "POST", "/score", {"question": "engine-error", "options": ["a", "b"]})
    assert reply.status_code == 502
    wait(driver, lambda d: text(d, "form-error") == f"502: {reply.json()['detail']}", "502")


def test_markup_in_a_question_or_option_is_shown_as_text(
    driver: WebDriver, server: ServerProcess
) -> None:
    open_page(driver, server.base_url)
    nodes_before = driver.execute_script("return document.querySelectorAll('*').length")
    attack = '<img src=x onerror="window.__injected = 1">'
    question = '<b id="bold">Which?</b><script>window.__injected = 2</script> p=0.9'
    score_in_page(driver, question, [attack, "<svg onload=window.__injected=3>"])

    assert text(driver, "answer-text") == attack  # shown literally
    wait(driver, lambda d: question in d.find_element(By.ID, "scores-body").text, "the row")
    counts = driver.execute_script(
        "return [document.querySelectorAll('img').length,"
        " document.querySelectorAll('#bold, b').length,"
        " document.scripts.length,"
        " document.querySelectorAll('svg[onload], [onerror]').length,"
        " window.__injected === undefined]"
    )
    assert counts == [0, 0, 1, 0, True]
    assert driver.execute_script("return document.querySelectorAll('*').length") > nodes_before


def test_no_request_leaves_the_origin_and_the_csp_holds(
    driver: WebDriver, server: ServerProcess
) -> None:
    network_requests(driver)  # drop what earlier tests sent
    driver.get_log("browser")
    open_page(driver, server.base_url)
    score_in_page(driver, "Which is blue? p=0.6", ["Sky", "Grass"])
    driver.find_element(By.ID, "result-wrong").click()
    wait(driver, lambda d: "recorded" in text(d, "result-feedback"), "the feedback")
    requests = network_requests(driver)
    urls = {r["url"] for r in requests}
    assert any(u.endswith("/score") for u in urls) and any(u.endswith("/feedback") for u in urls)
    assert {u for u in urls if not u.startswith(server.base_url + "/")} == set()
    # keys go to this origin only, as a bearer token
    api_calls = [r for r in requests if "/calibration" in r["url"]]
    assert api_calls and all(
        r["headers"].get("Authorization") == f"Bearer {KEY}" for r in api_calls
    )
    console = [e["message"] for e in driver.get_log("browser")]
    assert not [m for m in console if "Content Security Policy" in m], console


def test_screenshot(driver: WebDriver, server: ServerProcess, tmp_path: Path) -> None:
    """The whole page after a question, as a palette PNG; kept only with UFCAL_WEB_SCREENSHOT
    (the README's image comes from ``python -m tests.web_bench --screenshot``)."""
    open_page(driver, server.base_url)
    score_in_page(
        driver,
        "Which gas do plants take from the air for photosynthesis? p=0.78",
        ["Carbon dioxide", "Oxygen", "Nitrogen", "Helium"],
    )
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 120, 2400))
    try:
        image = small_png(driver.get_screenshot_as_png())
    finally:
        driver.set_window_size(1280, 1500)
    keep = os.environ.get("UFCAL_WEB_SCREENSHOT")
    path = Path(keep) if keep else tmp_path / "web-page.png"
    path.write_bytes(image)
    print(f"\nscreenshot: {path} ({len(image)} bytes)")
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(image) < MAX_SCREENSHOT_BYTES


@pytest.mark.integration
def test_page_scores_on_the_real_vllm_engine(
    driver: WebDriver, ufcal_remote: ServerProcess
) -> None:
    """The page against ``ufcal serve`` on a real vLLM server (no keys there)."""
    driver.get(ufcal_remote.base_url + "/")
    wait(driver, lambda d: "engine ready" in text(d, "engine"), "the engine", timeout=60)
    assert "SmolLM2" in text(driver, "engine")
    submit(driver, timeout=600)  # the form's default question; the CPU engine may be slow
    assert shown(driver, "result")
    assert text(driver, "form-error") == ""
    assert text(driver, "answer-label") in {"A", "B", "C", "D"}
    confidence = float(text(driver, "confidence"))
    assert 0.0 <= confidence <= 1.0
    assert driver.find_elements(By.CSS_SELECTOR, "#chains li.chain")
    stored = httpx.get(ufcal_remote.base_url + "/scores?limit=1", timeout=10).json()["scores"][0]
    assert text(driver, "answer-label") == stored["answer_label"]
    assert f"{stored['confidence']:.3f}" == text(driver, "confidence")
