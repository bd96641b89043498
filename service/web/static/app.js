// ufcal's built-in page. Plain browser JavaScript, no library, no build step.
// It talks only to its own origin (the JSON API) and renders every piece of data as text:
// textContent and setAttribute with fixed attribute names, never parsed as markup.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const POLL_MS = 3000;
  const KEY_STORAGE = "ufcal-api-key";
  const LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
  const FIELDS = ["question", "options", "answer", "method", "mode"];
  const ANSWER_HINTS = {
    multiple_choice: "An option's letter (A, B, …), its text, or its 0-based index (a number is an index).",
    free_form: "The answer's text: it gets the confidence of the group of the model's answers it means.",
  };
  const MATCHES = {
    option: "",
    exact: "matched: it normalises like one of the model's sampled answers",
    judge: "matched by the judge: it means what this group says",
    absent: "absent: the model never said anything like it, so it was scored as an option of its own (low, 0 when no fidelity chain reaches it)",
  };

  const state = {
    key: sessionStorage.getItem(KEY_STORAGE) || "",
    needKey: false,
    polling: false,
    again: false,
    noCalibrators: 0, // polls to skip /calibrators after a 404
    lastScore: null, // {id}
  };

  const $ = (id) => document.getElementById(id);

  // -- DOM helpers: data only ever becomes text nodes or attribute values ------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, String(value));
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(value, digits = 3) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
  }

  function clock(unixSeconds) {
    return new Date(unixSeconds * 1000).toLocaleTimeString();
  }

  // -- the API ----------------------------------------------------------------------------

  function messageOf(status, body) {
    if (body && typeof body.detail === "string") return body.detail;
    if (body && Array.isArray(body.detail)) {
      return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    }
    return status ? `HTTP ${status}` : "the service is unreachable";
  }

  // Paths are resolved against the page's own URL, so the page also works behind a proxy
  // that serves the service under a path prefix (open it as /prefix/).
  async function api(path, method = "GET", payload = undefined) {
    const url = new URL(path.replace(/^\//, ""), document.baseURI);
    const headers = { Accept: "application/json" };
    if (payload !== undefined) headers["Content-Type"] = "application/json";
    if (state.key) headers.Authorization = `Bearer ${state.key}`;
    let response;
    try {
      response = await fetch(url, {
        method,
        headers,
        body: payload === undefined ? undefined : JSON.stringify(payload),
        cache: "no-store",
        credentials: "same-origin",
        redirect: "error",
      });
    } catch (err) {
      return { ok: false, status: 0, body: null, message: "the service is unreachable" };
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    const result = {
      ok: response.ok,
      status: response.status,
      body,
      message: messageOf(response.status, body),
    };
    if (response.status === 401) askForKey(state.key ? result.message : "");
    return result;
  }

  // -- API key ----------------------------------------------------------------------------

  function askForKey(message) {
    state.needKey = true;
    $("key-panel").hidden = false;
    $("key-error").textContent = message;
    $("key-change").hidden = true;
  }

  async function useKey(event) {
    event.preventDefault();
    state.key = $("key-input").value.trim();
    state.needKey = false;
    $("key-error").textContent = "";
    const check = await api("/calibration");
    if (check.status === 401) return; // api() showed the message
    sessionStorage.setItem(KEY_STORAGE, state.key);
    $("key-panel").hidden = true;
    $("key-change").hidden = false;
    $("key-input").value = "";
    refresh();
  }

  // -- try a question ---------------------------------------------------------------------

  function addOption(text = "") {
    const list = $("options");
    const input = el("input", { type: "text", class: "option-input", autocomplete: "off" });
    input.value = text;
    const remove = el("button", { type: "button", class: "quiet remove", title: "remove this option", text: "×" });
    const error = el("span", { class: "error option-error", role: "alert" });
    const item = el("li", {}, input, remove, error);
    remove.addEventListener("click", () => {
      if (list.children.length > 1) item.remove();
    });
    list.append(item);
    return input;
  }

  function freeForm() {
    return $("task-free").checked;
  }

  // Free-form: no options are sent, so their inputs are hidden; the answer hint follows.
  function showTask() {
    const task = freeForm() ? "free_form" : "multiple_choice";
    $("options-set").hidden = task === "free_form";
    $("answer-hint").textContent = ANSWER_HINTS[task];
  }

  // The answer field as /score takes it: a whole number is an option's index (a JSON
  // integer) for multiple choice; anything else, and every free-form answer, is text.
  function answerValue(text, task) {
    const trimmed = text.trim();
    if (!trimmed) return undefined;
    if (task === "multiple_choice" && /^-?[0-9]+$/.test(trimmed)) return Number(trimmed);
    return text;
  }

  function clearErrors() {
    for (const field of FIELDS) $(`${field}-error`).textContent = "";
    for (const span of document.querySelectorAll(".option-error")) span.textContent = "";
    $("form-error").textContent = "";
  }

  // Put each of the API's messages next to the field it names (loc = ["body", field, index]).
  function showErrors(result, sentInputs) {
    const issues = Array.isArray(result.body && result.body.detail) ? result.body.detail : null;
    if (!issues) {
      $("form-error").textContent = `${result.status || "error"}: ${result.message}`;
      return;
    }
    for (const issue of issues) {
      const loc = Array.isArray(issue.loc) ? issue.loc : [];
      const field = loc[0] === "body" ? loc[1] : undefined;
      const index = loc[2];
      let target = null;
      if (field === "options" && typeof index === "number" && sentInputs[index]) {
        target = sentInputs[index].parentElement.querySelector(".option-error");
      } else if (FIELDS.includes(field)) {
        target = $(`${field}-error`);
      } else {
        target = $("form-error");
      }
      const text = target === $("form-error") ? `${loc.join(".")}: ${issue.msg}` : issue.msg;
      target.textContent = target.textContent ? `${target.textContent}; ${text}` : text;
    }
  }

  async function submitQuestion(event) {
    event.preventDefault();
    clearErrors();
    const task = freeForm() ? "free_form" : "multiple_choice";
    const inputs = Array.from(document.querySelectorAll(".option-input"));
    const sentInputs = task === "free_form" ? [] : inputs.filter((input) => input.value.trim() !== "");
    const payload = { question: $("question").value, method: $("method").value };
    if (task === "multiple_choice") payload.options = sentInputs.map((input) => input.value);
    const answer = answerValue($("answer").value, task);
    if (answer !== undefined) payload.answer = answer;
    if ($("mode").value) payload.mode = $("mode").value;
    $("submit").disabled = true;
    $("busy").hidden = false;
    try {
      const result = await api("/score", "POST", payload);
      if (!result.ok) {
        showErrors(result, sentInputs);
        return;
      }
      showResult(result.body, payload.options || []);
      refresh();
    } finally {
      $("submit").disabled = false;
      $("busy").hidden = true;
    }
  }

  // The options UF ran over: the sent ones, or (free-form) the groups then the abstention.
  function optionsOf(reply, sent) {
    if (!Array.isArray(reply.groups)) return sent;
    const options = reply.groups.map((g) => g.representative);
    if (reply.free_form && reply.free_form.abstention) options.push(reply.free_form.abstention);
    return options;
  }

  function showResult(reply, sent) {
    const options = optionsOf(reply, sent);
    state.lastScore = { id: reply.id };
    $("result").hidden = false;
    $("result-task").textContent = reply.task || "multiple_choice";
    $("answer-label").textContent = reply.answer.label;
    $("answer-text").textContent = reply.answer.text;
    $("confidence").textContent = fmt(reply.confidence);
    const raw = typeof reply.raw_confidence === "number" ? reply.raw_confidence : reply.confidence;
    $("raw-confidence").textContent = fmt(raw);
    $("uncertainty").textContent = fmt(reply.uncertainty);
    $("result-calibrator").textContent = calibratorName(reply.calibrator);
    $("result-meta").textContent =
      `id ${reply.id} · ${reply.method} · ${reply.mode} · ${reply.model} · ` +
      `${reply.usage.engine_calls} engine calls · ${reply.usage.prompts} prompts · ` +
      `${fmt(reply.latency_ms, 0)} ms`;
    showGiven(reply, options);
    showFreeForm(reply);
    const labels = Object.keys(reply.distribution);
    $("distribution").replaceChildren(
      distributionChart(labels, reply.distribution, reply.fidelity, reply.answer.label, options)
    );
    $("result-options").replaceChildren(
      ...options.map((text, i) => el("li", {}, el("span", { class: "chip", text: LETTERS[i] }), " ", text))
    );
    $("chains").replaceChildren(...chainItems(reply.chains, reply.distribution));
    if (!$("chains").children.length) {
      $("chains").append(el("li", { class: "muted", text: "no chains: this method runs none" }));
    }
    // A score with a given answer is stored for it: feedback judges that answer.
    $("feedback-question").textContent = reply.given ? "Was the given answer right?" : "Was the answer right?";
    $("result-right").disabled = false;
    $("result-wrong").disabled = false;
    $("result-feedback").textContent = "";
  }

  function showGiven(reply, options) {
    const given = reply.given;
    $("given").hidden = !given;
    if (!given) return;
    const label = typeof given.index === "number" ? LETTERS[given.index] : "–";
    $("given-label").textContent = label;
    $("given-text").textContent = given.answer;
    $("given-confidence").textContent = fmt(given.confidence);
    $("given-raw-confidence").textContent = fmt(given.raw_confidence);
    $("given-vs-model").textContent = `${reply.answer.label} · ${fmt(reply.confidence)}`;
    const shownAs = options[given.index];
    const note = MATCHES[given.match] || given.match;
    const group = reply.task === "free_form" && shownAs !== undefined ? `in group ${label} (${shownAs})` : "";
    $("given-match").textContent = [group, note].filter(Boolean).join(" · ");
  }

  function showFreeForm(reply) {
    const groups = Array.isArray(reply.groups) ? reply.groups : null;
    $("free-form").hidden = !groups;
    if (!groups) return;
    const ff = reply.free_form || {};
    $("groups-body").replaceChildren(
      ...groups.map((g, i) => {
        const marks = [];
        if (i === reply.answer.index) marks.push("model's");
        if (g.given) marks.push("given");
        const classes = [g.given ? "given" : "", i === reply.answer.index ? "answer" : ""].filter(Boolean);
        return el(
          "tr",
          { class: classes.join(" ") },
          el("th", { scope: "row" }, el("span", { class: "chip", text: g.label })),
          el("td", { class: "representative", text: g.representative }),
          el("td", {}, el("ul", { class: "members" }, ...g.members.map((m) => el("li", { text: m })))),
          el("td", { class: "number", text: String(g.count) }),
          el("td", { class: "number", text: fmt(g.confidence) }),
          el("td", { class: "number", text: fmt(g.raw_confidence) }),
          el("td", { class: "marks", text: marks.join(", ") })
        );
      })
    );
    const abstention = ff.abstention;
    $("abstention").hidden = !abstention;
    $("abstention").textContent = abstention
      ? `All samples agreed, so UF also offered option ${LETTERS[groups.length]}, "${abstention}" ` +
        `(it needs two options; not a group)` +
        (reply.answer.index === groups.length ? ": the model chose it." : ".")
      : "";
    $("ff-samples").textContent = `${ff.samples_taken} · ${ff.samples_usable}`;
    $("ff-judge").textContent = `${ff.judge_prompts} · ${ff.judge_rounds} · ${ff.judge_skipped}`;
    const usage = reply.usage;
    $("ff-budget").textContent = usage.max_prompts
      ? `${usage.prompts} / ${usage.max_prompts}`
      : `${usage.prompts} / no limit`;
    $("ff-entropy").textContent = `${fmt(ff.semantic_entropy)} (${fmt(ff.semantic_entropy_normalized)})`;
    const notes = [`largest group ${fmt(100 * (ff.largest_group_share || 0), 0)}% of the usable samples`];
    if (usage.budget_hit) notes.push("the budget bound this question");
    if (usage.budget_fitted) notes.push("budget fitted to the deadline");
    if (ff.judge_skipped) notes.push(`${ff.judge_skipped} judge pairs skipped: their groups stay apart`);
    if (ff.dropped_groups) {
      notes.push(`${ff.dropped_groups} groups (${ff.dropped_samples} samples) past the 26 options left out`);
    }
    $("ff-notes").textContent = notes.join(" · ");
  }

  function calibratorName(calibrator) {
    if (!calibrator) return "no calibrator";
    const labels = calibrator.labels === undefined ? "" : ` (${calibrator.labels} labels)`;
    return `${calibrator.kind} v${calibrator.version}${labels}`;
  }

  function chainItems(chains, distribution) {
    const starts = Object.keys(chains || {});
    const mass = starts.reduce((sum, s) => sum + (distribution[s] || 0), 0);
    return starts.map((start) => {
      const path = chains[start];
      const item = el("li", { class: "chain" });
      path.forEach((label, i) => {
        if (i) item.append(el("span", { class: "arrow", text: "→" }));
        item.append(el("span", { class: i ? "chip" : "chip start", text: label }));
      });
      const weight = mass > 0 ? (distribution[start] || 0) / mass : 0;
      item.append(el("span", { class: "weight", text: `weight ${fmt(weight)}` }));
      return item;
    });
  }

  function distributionChart(labels, distribution, fidelity, answer, options) {
    const rowH = 26;
    const left = 30;
    const barW = 300;
    const width = left + barW + 120;
    const height = labels.length * rowH + 22;
    const root = svg("svg", {
      viewBox: `0 0 ${width} ${height}`,
      width,
      height,
      class: "bars",
      role: "img",
      "aria-label": "answer distribution and fidelity by option",
    });
    labels.forEach((label, i) => {
      const y = 4 + i * rowH;
      const p = distribution[label] || 0;
      const f = (fidelity || {})[label] || 0;
      const group = svg("g", { class: label === answer ? "row answer" : "row" });
      group.append(svg("title", {}, `${label}. ${options[i] === undefined ? "" : options[i]}`));
      group.append(svg("text", { x: 4, y: y + 14, class: "label" }, label));
      group.append(svg("rect", { x: left, y, width: barW, height: 10, class: "track" }));
      group.append(svg("rect", { x: left, y, width: Math.max(0, p * barW), height: 10, class: "p" }));
      group.append(svg("rect", { x: left, y: y + 12, width: Math.max(0, f * barW), height: 6, class: "f" }));
      group.append(svg("text", { x: left + barW + 8, y: y + 14, class: "value" }, `P ${fmt(p)} · F ${fmt(f)}`));
      root.append(group);
    });
    const legendY = height - 6;
    root.append(svg("rect", { x: left, y: legendY - 8, width: 10, height: 8, class: "p" }));
    root.append(svg("text", { x: left + 14, y: legendY, class: "legend" }, "P(option)"));
    root.append(svg("rect", { x: left + 90, y: legendY - 8, width: 10, height: 6, class: "f" }));
    root.append(svg("text", { x: left + 104, y: legendY, class: "legend" }, "fidelity F"));
    return root;
  }

  // -- feedback ---------------------------------------------------------------------------

  async function sendFeedback(id, correct, statusNode) {
    const result = await api("/feedback", "POST", { id, correct });
    if (statusNode) {
      statusNode.textContent = result.ok
        ? `recorded (${result.body.window_size} labels in the window)`
        : `${result.status || "error"}: ${result.message}`;
      statusNode.classList.toggle("error", !result.ok);
    }
    refresh();
    return result;
  }

  async function feedbackForResult(correct) {
    if (!state.lastScore) return;
    $("result-right").disabled = true;
    $("result-wrong").disabled = true;
    const result = await sendFeedback(state.lastScore.id, correct, $("result-feedback"));
    if (!result.ok && result.status !== 409) {
      $("result-right").disabled = false;
      $("result-wrong").disabled = false;
    }
  }

  // -- live calibration -------------------------------------------------------------------

  function reliabilityDiagram(raw, returned) {
    const W = 460;
    const H = 320;
    const m = { l: 46, r: 12, t: 28, b: 64 };
    const pw = W - m.l - m.r;
    const ph = H - m.t - m.b;
    const x = (v) => m.l + v * pw;
    const y = (v) => m.t + (1 - v) * ph;
    const root = svg("svg", {
      viewBox: `0 0 ${W} ${H}`,
      class: "diagram",
      role: "img",
      "aria-label": "reliability diagram: accuracy by confidence bin, raw and returned",
    });
    for (const t of [0, 0.2, 0.4, 0.6, 0.8, 1]) {
      root.append(svg("line", { x1: x(0), y1: y(t), x2: x(1), y2: y(t), class: "grid" }));
      root.append(svg("text", { x: m.l - 6, y: y(t) + 4, class: "tick end" }, t.toFixed(1)));
      root.append(svg("text", { x: x(t), y: y(0) + 14, class: "tick middle" }, t.toFixed(1)));
    }
    root.append(svg("line", { x1: x(0), y1: y(0), x2: x(1), y2: y(1), class: "diag" }));
    const bins = returned.bins || [];
    const rawBins = raw.bins || [];
    const showCounts = bins.length <= 20;
    bins.forEach((bin, i) => {
      const rawBin = rawBins[i] || { count: 0, accuracy: null, confidence: null };
      const bw = (bin.upper - bin.lower) * pw;
      const gap = bw * 0.08;
      const half = (bw - 2 * gap) / 2;
      const x0 = x(bin.lower) + gap;
      [
        [rawBin, "raw", x0],
        [bin, "returned", x0 + half],
      ].forEach(([b, kind, bx]) => {
        if (!b.count || typeof b.accuracy !== "number") return;
        const bar = svg("rect", {
          x: bx,
          y: y(b.accuracy),
          width: Math.max(half, 0.5),
          height: y(0) - y(b.accuracy),
          class: `bar ${kind}`,
        });
        bar.append(svg("title", {}, `${kind} (${fmt(bin.lower, 2)}, ${fmt(bin.upper, 2)}]: ` +
          `${b.count} scores, accuracy ${fmt(b.accuracy)}, mean confidence ${fmt(b.confidence)}`));
        root.append(bar);
      });
      if (showCounts) {
        const cx = x((bin.lower + bin.upper) / 2);
        root.append(svg("text", { x: cx, y: y(0) + 34, class: "count raw middle" }, String(rawBin.count)));
        root.append(svg("text", { x: cx, y: y(0) + 48, class: "count returned middle" }, String(bin.count)));
      }
    });
    if (showCounts) {
      root.append(svg("text", { x: m.l - 6, y: y(0) + 34, class: "count raw end" }, "n raw"));
      root.append(svg("text", { x: m.l - 6, y: y(0) + 48, class: "count returned end" }, "n ret."));
    }
    root.append(svg("text", { x: x(0.5), y: H - 2, class: "axis middle" }, "confidence"));
    root.append(svg("text", { x: 12, y: y(0.5), class: "axis middle", transform: `rotate(-90 12 ${y(0.5)})` }, "accuracy"));
    root.append(svg("rect", { x: m.l, y: 8, width: 10, height: 10, class: "bar raw" }));
    root.append(svg("text", { x: m.l + 14, y: 17, class: "legend" }, "raw"));
    root.append(svg("rect", { x: m.l + 54, y: 8, width: 10, height: 10, class: "bar returned" }));
    root.append(svg("text", { x: m.l + 68, y: 17, class: "legend" }, "returned"));
    root.append(svg("line", { x1: m.l + 140, y1: 13, x2: m.l + 160, y2: 13, class: "diag" }));
    root.append(svg("text", { x: m.l + 164, y: 17, class: "legend" }, "perfect calibration"));
    return root;
  }

  function renderCalibration(report) {
    // Issue 10's reply adds raw/returned; before it, the top level is both.
    const returned = report.returned || report;
    const raw = report.raw || report;
    $("label-count").textContent = String(report.n);
    $("window-size").textContent = String(report.window);
    $("diagram").replaceChildren(reliabilityDiagram(raw, returned));
    const rows = [
      ["accuracy", "accuracy"],
      ["ECE", "ece"],
      ["Brier", "brier"],
      ["AUROC", "auroc"],
      ["IPR", "ipr"],
      ["CE", "ce"],
    ];
    $("metrics-body").replaceChildren(
      ...rows.map(([name, key]) =>
        el("tr", {}, el("th", { text: name }), el("td", { text: fmt(raw[key]) }), el("td", { text: fmt(returned[key]) }))
      )
    );
  }

  /** The task whose live window and calibrators the page shows. */
  function liveTask() {
    return $("live-task").value;
  }

  /** A calibrator's task (a service from before tasks: multiple_choice). */
  function taskOf(c) {
    return c.task || "multiple_choice";
  }

  function renderCalibrators(result) {
    const box = $("calibrator");
    const list = result.ok && result.body && Array.isArray(result.body.calibrators) ? result.body.calibrators : [];
    const active = list.filter((c) => c.status === "active" && taskOf(c) === liveTask());
    if (!active.length) {
      box.replaceChildren(el("span", { text: "no calibrator: returned confidence = raw confidence" }));
    } else {
      box.replaceChildren(
        ...active.map((c) => {
          const before = c.metrics && c.metrics.before ? c.metrics.before.ece : null;
          const after = c.metrics && c.metrics.after ? c.metrics.after.ece : null;
          return el(
            "p",
            { class: "active-calibrator" },
            el("strong", { text: `${c.kind} v${c.version}` }),
            ` for ${c.model} · ${c.method} · ${c.mode} · ${taskOf(c)}: ${c.labels} labels ` +
              `(${c.positives} right, ${c.negatives} wrong), ECE ${fmt(before)} → ${fmt(after)}`
          );
        })
      );
    }
    $("calibrator-history").hidden = list.length === 0;
    $("history-body").replaceChildren(
      ...list.map((c) =>
        el(
          "tr",
          { class: c.status === "active" ? "active" : "" },
          el("td", { text: `${c.model} · ${c.method} · ${c.mode} · ${taskOf(c)}` }),
          el("td", { text: String(c.version) }),
          el("td", { text: String(c.kind) }),
          el("td", { text: String(c.status) }),
          el("td", { text: String(c.labels) }),
          el("td", {
            text: `${fmt(c.metrics && c.metrics.before && c.metrics.before.ece)} → ` +
              `${fmt(c.metrics && c.metrics.after && c.metrics.after.ece)}`,
          }),
          el("td", { text: typeof c.fitted_at === "number" ? clock(c.fitted_at) : String(c.fitted_at || "–") })
        )
      )
    );
  }

  // -- recent scores ----------------------------------------------------------------------

  function renderScores(reply) {
    const withText = Boolean(reply.text_logged);
    for (const cell of document.querySelectorAll(".question-col")) cell.hidden = !withText;
    $("text-note").textContent = withText
      ? ""
      : "questions are not kept (UFCAL_LOG_TEXT is off)";
    $("scores-empty").hidden = reply.scores.length > 0;
    $("scores-body").replaceChildren(
      ...reply.scores.map((s) => {
        const feedback = el("td", { class: "feedback" });
        if (s.feedback) {
          feedback.append(
            el("span", { class: s.feedback.correct ? "good-text" : "bad-text", text: s.feedback.correct ? "right" : "wrong" })
          );
        } else {
          const status = el("span", { class: "muted" });
          const right = el("button", { type: "button", class: "good small", text: "Right" });
          const wrong = el("button", { type: "button", class: "bad small", text: "Wrong" });
          right.addEventListener("click", () => sendFeedback(s.id, true, status));
          wrong.addEventListener("click", () => sendFeedback(s.id, false, status));
          feedback.append(right, wrong, status);
        }
        const row = el(
          "tr",
          { "data-id": s.id },
          el("td", { text: clock(s.created_at) }),
          el("td", { class: "id", text: s.id, title: s.id }),
          el("td", { text: s.answer_label }),
          el("td", { text: fmt(s.confidence) }),
          el("td", { text: `${s.method} · ${s.mode}` }),
          feedback
        );
        if (withText) {
          const cell = el("td", { class: "question", text: s.question || "" });
          if (Array.isArray(s.options)) {
            cell.setAttribute("title", s.options.map((o, i) => `${LETTERS[i]}. ${o}`).join("\n"));
          }
          row.append(cell);
        }
        return row;
      })
    );
  }

  // -- refresh loop -----------------------------------------------------------------------

  async function refreshEngine() {
    const result = await api("/readyz");
    const pill = $("engine");
    if (result.ok) {
      pill.textContent = `engine ready · ${result.body.model || ""}`;
      pill.className = "pill ok";
    } else {
      const detail = result.body && result.body.detail ? result.body.detail : result.message;
      pill.textContent = `engine unavailable: ${detail}`;
      pill.className = "pill down";
    }
  }

  // Re-render a part only when its data changed: the DOM (and a button under the pointer)
  // stays put between polls.
  const rendered = {};
  function changed(part, data) {
    const json = JSON.stringify(data);
    if (rendered[part] === json) return false;
    rendered[part] = json;
    return true;
  }

  async function refresh() {
    if (state.polling) {
      state.again = true; // e.g. feedback during a poll: poll once more right after it
      return;
    }
    state.polling = true;
    state.again = false;
    try {
      refreshEngine();
      if (state.needKey) return;
      const limit = $("limit").value;
      // A service without /calibrators (404) is asked again only every 20th poll.
      const askCalibrators = state.noCalibrators <= 0;
      const [calibration, calibrators, scores] = await Promise.all([
        api(`/calibration?task=${encodeURIComponent(liveTask())}`),
        askCalibrators ? api("/calibrators") : Promise.resolve(null),
        api(`/scores?limit=${encodeURIComponent(limit)}`),
      ]);
      state.noCalibrators = calibrators && calibrators.status === 404 ? 20 : state.noCalibrators - 1;
      if (calibration.ok) {
        if (changed("calibration", calibration.body)) renderCalibration(calibration.body);
        $("live-error").textContent = "";
      } else if (calibration.status !== 401) {
        $("live-error").textContent = `${calibration.status || "error"}: ${calibration.message}`;
      }
      if (calibrators && calibrators.status !== 401) {
        if (changed("calibrators", [calibrators.status, calibrators.body])) {
          renderCalibrators(calibrators);
        }
      }
      if (scores.ok) {
        if (changed("scores", scores.body)) renderScores(scores.body);
        $("scores-error").textContent = "";
      } else if (scores.status !== 401) {
        $("scores-error").textContent = `${scores.status || "error"}: ${scores.message}`;
      }
    } finally {
      state.polling = false;
      if (state.again) refresh();
    }
  }

  function start() {
    ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"].forEach((text) => addOption(text));
    $("question").value = "Which gas do plants take from the air for photosynthesis?";
    $("add-option").addEventListener("click", () => addOption().focus());
    $("score-form").addEventListener("submit", submitQuestion);
    for (const radio of document.querySelectorAll('input[name="task"]')) radio.addEventListener("change", showTask);
    showTask(); // the browser may have kept a choice across a reload
    $("key-form").addEventListener("submit", useKey);
    $("key-change").addEventListener("click", () => askForKey(""));
    $("result-right").addEventListener("click", () => feedbackForResult(true));
    $("result-wrong").addEventListener("click", () => feedbackForResult(false));
    $("limit").addEventListener("change", refresh);
    $("live-task").addEventListener("change", () => {
      delete rendered.calibrators; // show the chosen task's calibrators (its window differs)
      refresh();
    });
    if (state.key) $("key-change").hidden = false;
    renderCalibration({ n: 0, window: 0, bins: [] });
    refresh();
    setInterval(() => {
      if (!document.hidden) refresh();
    }, POLL_MS);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
