"""The web page's server side (service/web) and ``GET /scores``, in process over the fake
engine. The page itself is driven in a real browser in test_web_browser.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.store import ScoreRecord, Store
from service.web.serving import CONTENT_SECURITY_POLICY, PATHS
from tests.test_feedback import score, serve

STATIC = Path(__file__).resolve().parent.parent / "service" / "web" / "static"
KEY = "web-key-0123456789"


def _settings(db: Path, **kwargs: Any) -> Settings:
    return Settings(_env_file=None, db_path=db, **kwargs)  # type: ignore[call-arg]


class _Markup(HTMLParser):
    """Every tag with its attributes, and whether any script has inline code."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline_script = False
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_script = True


async def test_page_and_assets_carry_the_csp(tmp_path: Path) -> None:
    async with serve(_settings(tmp_path / "db")) as client:
        total = 0
        for path in sorted(PATHS):
            r = await client.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
            total += len(r.content)
            again = await client.get(path, headers={"If-None-Match": r.headers["etag"]})
            assert again.status_code == 304 and not again.content
        page = await client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    assert total < 100_000  # the page's own files; the browser test measures all transfers
    policy = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert policy["default-src"] == "'self'"
    for directive in ("script-src", "style-src", "connect-src", "img-src"):
        assert policy[directive] == "'self'"  # no 'unsafe-inline', no other origin


def test_markup_has_no_inline_code_and_no_other_origin() -> None:
    markup = _Markup()
    markup.feed((STATIC / "index.html").read_text())
    assert not markup.inline_script
    for tag, attrs in markup.tags:
        assert not [a for a in attrs if a.startswith("on") or a == "style"], (tag, attrs)
        for attr in ("src", "href"):
            url = attrs.get(attr)
            # relative to the page: this origin only (no scheme, no //host)
            assert url is None or re.fullmatch(r"[a-z][a-z0-9./_-]*", url), (tag, url)
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert re.findall(r"https?://[^\"' ]+", script) == ["http://www.w3.org/2000/svg"]
    assert "http" not in (STATIC / "app.css").read_text()


def _ids(markup: _Markup) -> dict[str, tuple[str, dict[str, str | None]]]:
    return {str(attrs["id"]): (tag, attrs) for tag, attrs in markup.tags if attrs.get("id")}


async def test_every_element_the_script_names_is_served(tmp_path: Path) -> None:
    """app.js finds its elements by id: each one, and each field's error line, is in the
    served page (a renamed id would fail silently in the browser)."""
    async with serve(_settings(tmp_path / "db")) as client:
        page = (await client.get("/")).text
        script = (await client.get("/ui/app.js")).text
    markup = _Markup()
    markup.feed(page)
    ids = _ids(markup)
    named = set(re.findall(r'\$\("([a-z][a-z0-9-]*)"\)', script))
    fields = re.search(r"const FIELDS = \[([^\]]*)\]", script)
    assert fields is not None
    field_names = re.findall(r'"([a-z_]+)"', fields.group(1))
    assert field_names == ["question", "options", "answer", "method", "mode"]
    named |= {f"{field}-error" for field in field_names}
    assert len(named) > 40 and named - set(ids) == set()
    for field in field_names:  # the API's 422 message lands next to the field, announced
        assert ids[f"{field}-error"][1].get("role") == "alert", field


def test_try_form_offers_free_form_and_an_answer_to_score() -> None:
    """The form's free-form switch and answer field, and the result's groups table, with
    labels and headers a screen reader can name."""
    markup = _Markup()
    markup.feed((STATIC / "index.html").read_text())
    ids = _ids(markup)
    radios = [a for t, a in markup.tags if t == "input" and a.get("name") == "task"]
    assert [(r["type"], r["value"]) for r in radios] == [
        ("radio", "multiple_choice"),
        ("radio", "free_form"),
    ]
    assert "checked" in radios[0]  # multiple choice unless asked
    labelled = {a.get("for") for t, a in markup.tags if t == "label"}
    assert "answer" in labelled and ids["answer"][0] == "input"
    assert "answer-error" in str(ids["answer"][1]["aria-describedby"]).split()
    headers = []
    in_groups = False
    for tag, attrs in markup.tags:
        in_groups = in_groups or attrs.get("id") == "groups"
        if in_groups and tag == "th":
            assert attrs.get("scope") == "col"
            headers.append(tag)
        if attrs.get("id") == "groups-body":
            break
    assert len(headers) == 7  # label, representative, members, count, confidence, raw, answer
    for part in ("given", "free-form", "groups-body", "ff-samples", "ff-judge", "ff-budget"):
        assert part in ids, part
    assert "hidden" in ids["given"][1] and "hidden" in ids["free-form"][1]


async def test_the_fake_app_scores_free_form_questions_for_the_browser_tests(
    tmp_path: Path,
) -> None:
    """The fake model test_web_browser.py drives the page with: answers=[...] are the
    samples, the judge joins an answer containing another's words."""
    question = "Capital? answers=[Canberra|canberra|the city of Canberra|Melbourne] p=0.7"
    async with serve(_settings(tmp_path / "db")) as client:
        plain = await client.post("/score", json={"question": question})
        exact = await client.post("/score", json={"question": question, "answer": "Canberra!"})
        judged = await client.post("/score", json={"question": question, "answer": "Canberra, AU"})
        bad = await client.post("/score", json={"question": question, "answer": "the"})
        sampling = await client.post(
            "/score", json={"question": "q", "options": ["a", "b"], "mode": "sampling"}
        )
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["task"] == "free_form" and body["given"] is None
    assert [(g["representative"], g["members"], g["count"]) for g in body["groups"]] == [
        ("Canberra", ["Canberra", "canberra", "the city of Canberra"], 8),
        ("Melbourne", ["Melbourne"], 2),
    ]
    assert body["distribution"] == pytest.approx({"A": 0.7, "B": 0.3})
    given = exact.json()["given"]
    assert (given["index"], given["match"]) == (0, "exact")
    given = judged.json()["given"]
    assert (given["index"], given["match"]) == (0, "judge")
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "answer"]
    assert sampling.status_code == 400  # no other generation: as before free-form samples


async def test_ui_off_removes_the_page(tmp_path: Path) -> None:
    assert Settings(_env_file=None, ui="off").ui is False  # type: ignore[call-arg]
    async with serve(_settings(tmp_path / "db", ui=False)) as client:
        for path in PATHS:
            assert (await client.get(path)).status_code == 404, path
        assert (await client.get("/scores")).status_code == 200  # the API stays


async def test_with_keys_the_page_is_open_and_the_data_is_not(tmp_path: Path) -> None:
    async with serve(_settings(tmp_path / "db", api_keys=KEY)) as client:
        for path in PATHS:
            assert (await client.get(path)).status_code == 200, path
        for path in ("/scores", "/calibration", "/feedback"):
            r = await client.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        bad = await client.get("/scores", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json() == {"detail": "invalid API key"}
        good = await client.get("/scores", headers={"Authorization": f"Bearer {KEY}"})
        assert good.status_code == 200


async def test_recent_scores_newest_first_with_feedback(tmp_path: Path) -> None:
    async with serve(_settings(tmp_path / "db")) as client:
        assert (await client.get("/scores")).json() == {
            "scores": [],
            "limit": 20,
            "text_logged": False,
        }
        replies = [await score(client, f"q{i}", p) for i, p in enumerate((0.9, 0.3, 0.7))]
        r = await client.post("/feedback", json={"id": "q1", "correct": False})
        assert r.status_code == 201
        body = (await client.get("/scores", params={"limit": 2})).json()
    assert body["limit"] == 2
    assert [s["id"] for s in body["scores"]] == ["q2", "q1"]
    newest, judged = body["scores"]
    assert newest["feedback"] is None
    assert newest["confidence"] == replies[2]["confidence"]
    assert newest["answer_index"] == 0 and newest["answer_label"] == "A"
    assert judged["answer_label"] == replies[1]["answer"]["label"] == "B"
    assert judged["feedback"]["correct"] is False and judged["feedback"]["gold_index"] is None
    assert newest["question"] is None and newest["options"] is None  # UFCAL_LOG_TEXT off
    assert newest["created_at"] >= judged["created_at"] > 0
    assert {"model", "method", "mode", "uncertainty", "n_options"} <= set(newest)


async def test_recent_scores_show_text_only_with_log_text(tmp_path: Path) -> None:
    async with serve(_settings(tmp_path / "db", log_text=True)) as client:
        await score(client, "t", 0.9, n=3)
        body = (await client.get("/scores")).json()
    assert body["text_logged"] is True
    assert body["scores"][0]["question"] == "Which one? p=0.9"
    assert body["scores"][0]["options"] == ["alpha", "beta", "gamma"]


@pytest.mark.parametrize("limit", ["0", "-1", "501", "ten"])
async def test_bad_limit_is_422_naming_it(tmp_path: Path, limit: str) -> None:
    async with serve(_settings(tmp_path / "db")) as client:
        r = await client.get("/scores", params={"limit": limit})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "limit"]


async def test_openapi_documents_scores(tmp_path: Path) -> None:
    async with serve(_settings(tmp_path / "db")) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert "get" in paths["/scores"]
    assert not set(PATHS) & set(paths)  # the page is not part of the API


async def test_store_recent_scores_after_replacement(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db", keep_text=True)
    try:
        for i, at in enumerate((10.0, 20.0, 30.0)):
            record = ScoreRecord(f"s{i}", "m", "uf", "logprobs", 1, 0.5, 0.2, 3, at, "q", ["a"])
            await store.save_score(record)
        # re-scoring s0 (no feedback yet) makes it the newest
        await store.save_score(ScoreRecord("s0", "m", "uf", "logprobs", 2, 0.9, 0.1, 3, 40.0))
        await store.add_feedback("s1", gold_index=1)
        recent = await store.recent_scores(10)
    finally:
        await store.close()
    assert [r.score.id for r in recent] == ["s0", "s2", "s1"]
    assert recent[0].score.answer_index == 2 and recent[0].correct is None
    assert recent[2].correct is True and recent[2].gold_index == 1
    assert recent[1].score.options == ("a",)
