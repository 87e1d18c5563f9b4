// chat.py --serve's page: the chat and the comparison stream through /v1/chat/completions (server-sent events); the
// run comes from /web/run. The server renders every conversation with the training template: the page only sends
// messages. No library, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "sft-api-key"; // sessionStorage: the key lives as long as this tab
const RUN_REFRESH_MS = 3000; // the Run tab re-reads metrics.jsonl this often while it is shown
const SVG = "http://www.w3.org/2000/svg";

let info = null; // GET /web/info: ids, template, defaults
let history = []; // the chat: {role, content, element}, oldest first
let conversation = 0; // New conversation counts up: an answer still streaming for an older one is dropped
let chatAbort = null;
let compareAborts = [];
let lastComparison = null; // {messages, base, tuned} of the last comparison that can be rated
let runTimer = null;

class KeyNeeded extends Error {}

// ---------------------------------------------------------------- the server

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers);
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    const body = await response.json().catch(() => null);
    askForKey(key ? `The server refused this key (${errorText(body)}). Enter the right key.`
                  : "This server needs its API key.", Boolean(key));
    throw new KeyNeeded("the API key is needed");
  }
  return response;
}

function errorText(body) {
  return (body && body.error && body.error.message) || "no reason given";
}

async function failure(response) {
  const body = await response.json().catch(() => null);
  const error = new Error(body ? errorText(body) : `HTTP ${response.status}`);
  error.code = body && body.error ? body.error.code : null;
  return error;
}

function sampling() {
  const fields = { temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens" };
  const chosen = {};
  for (const [name, id] of Object.entries(fields)) {
    const value = $(id).value.trim();
    if (value !== "") chosen[name] = name === "max_tokens" ? parseInt(value, 10) : parseFloat(value);
  }
  return chosen;
}

// One streamed answer: onText gets each piece of text; resolves to the finish_reason.
async function stream(model, messages, onText, signal) {
  const body = Object.assign({ model, messages, stream: true }, sampling());
  const response = await api("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buffer += decoder.decode(value, { stream: true }); // stream: a character split across reads stays whole
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw Object.assign(new Error(chunk.error.message), { code: chunk.error.code });
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) onText(choice.delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
}

function systemMessages() {
  return [{ role: "system", content: $("system").value }]; // sent even when empty: empty means none
}

// ---------------------------------------------------------------- key and errors

function askForKey(text, wrong) {
  $("key-message").textContent = text;
  $("key-message").classList.toggle("error", wrong);
  $("key-form").hidden = false;
  $("key").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  $("key-form").hidden = true;
  start();
});

function showError(error) {
  if (error instanceof KeyNeeded) return; // the key form says it
  $("error").textContent = error.message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

// ---------------------------------------------------------------- start

async function start() {
  clearError();
  try {
    const response = await api("/web/info");
    if (!response.ok) throw await failure(response);
    info = await response.json();
  } catch (error) {
    showError(error);
    return;
  }
  $("model-id").textContent = info.model;
  document.title = `${info.model} · chat.py --serve`;
  $("model-facts").textContent = `template ${info.template} · context ${info.context} tokens`;
  $("system").value = info.system || "";
  $("system-note").hidden = info.has_system;
  $("system-note").textContent = `The template ${info.template} has no system slot: the system prompt is not used.`;
  $("temperature").value = info.sampling.temperature;
  $("top-p").value = info.sampling.top_p;
  $("max-tokens").value = info.sampling.max_tokens;
  if (info.base) {
    $("compare-note").textContent = `base: ${info.base} (the same model with its adapter switched off) · tuned: ` +
      `${info.model}. Rate an answer and the pair is appended to ${info.ratings}, in the preference-pair ` +
      "format train.py reads (train.method: dpo, orpo or kto).";
  } else {
    $("compare-note").textContent = `${info.model} has no adapter (a merged or full model), so there is no base ` +
      "to switch back to. Serve the run's adapter to compare: python chat.py RUN/final --serve";
  }
  $("compare-send").disabled = !info.base;
  document.body.dataset.ready = "1";
  if (!$("run").hidden) showRun();
}

// ---------------------------------------------------------------- tabs

for (const button of document.querySelectorAll(".tab-button")) {
  button.addEventListener("click", () => showTab(button.dataset.tab));
}

function showTab(name) {
  for (const button of document.querySelectorAll(".tab-button")) {
    button.classList.toggle("active", button.dataset.tab === name);
  }
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== name;
  $("settings").hidden = name === "run";
  clearInterval(runTimer);
  runTimer = null;
  if (name === "run" && info) showRun();
}

// ---------------------------------------------------------------- chat

function addMessage(role, text) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  const label = document.createElement("span");
  label.textContent = role === "user" ? "you" : info.model;
  who.append(label);
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  if (role === "assistant") {
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "copy";
    copy.addEventListener("click", () => copyText(body.textContent, copy));
    who.append(copy);
  }
  element.append(who, body);
  $("messages").append(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

// Thumbs up / down on an answer: one rating per answer, appended to the run's ratings file as a rated answer (the
// conversation it answered, the answer, good or not), which train.method kto reads beside Compare's pairs.
function addThumbs(bubble, prompt, answerText) {
  const who = bubble.querySelector(".who");
  // Words, not emoji: the page uses the system's fonts, and many have no emoji.
  const buttons = [["up", "good", true], ["down", "bad", false]].map(
    ([name, word, good]) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = `thumb ${name}`;
      button.textContent = word;
      button.title = `Thumbs ${name}: rate this answer ${word} (kept in the run's ratings for train.method kto)`;
      button.addEventListener("click", () => thumb(good, button));
      return button;
    });
  who.append(...buttons);

  async function thumb(good, button) {
    for (const b of buttons) b.disabled = true;
    try {
      const response = await api("/web/thumbs", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt, answer: answerText, good }),
      });
      if (!response.ok) throw await failure(response);
      const saved = await response.json();
      button.classList.add("chosen");
      button.setAttribute("aria-pressed", "true");
      bubble.dataset.rated = good ? "up" : "down";
      chatNote(`Saved as ${good ? "good" : "bad"}: ${saved.ratings} rating(s) in ${saved.saved}.`);
    } catch (error) {
      for (const b of buttons) b.disabled = false;
      showError(error);
    }
  }
}

function copyText(text, button) {
  const done = () => { button.textContent = "copied"; setTimeout(() => { button.textContent = "copy"; }, 1500); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => copyByHand(text, done));
  } else {
    copyByHand(text, done); // plain http from another machine is not a secure context: no clipboard API
  }
}

function copyByHand(text, done) {
  const area = document.createElement("textarea");
  area.value = text;
  document.body.append(area);
  area.select();
  if (document.execCommand("copy")) done();
  area.remove();
}

function setChatBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("new").disabled = false;
  const last = history[history.length - 1];
  $("regenerate").disabled = busy || !last || last.role !== "assistant";
  document.body.dataset.chat = busy ? "busy" : "idle";
}

function chatNote(text) {
  $("chat-note").textContent = text;
  $("chat-note").hidden = !text;
}

// Answer the history (its last message is the user's). A conversation too long for the context loses its oldest
// turns, as the chat REPL's does, and the page says so.
async function answer() {
  const mine = conversation;
  const bubble = addMessage("assistant", "");
  const text = bubble.querySelector(".text");
  bubble.classList.add("pending");
  setChatBusy(true);
  chatAbort = new AbortController();
  let answerText = "";
  let chunks = 0;
  let dropped = 0;
  let note = "";
  let asked = [];
  try {
    for (;;) {
      try {
        const messages = systemMessages().concat(history.map(({ role, content }) => ({ role, content })));
        asked = messages;
        const finish = await stream(info.model, messages, (piece) => {
          answerText += piece;
          chunks += 1;
          text.textContent = answerText;
          bubble.scrollIntoView({ block: "end" });
        }, chatAbort.signal);
        if (finish === "length") note = "cut at max tokens";
        break;
      } catch (error) {
        if (error.code !== "context_length_exceeded" || history.length < 3 || answerText) throw error;
        for (const turn of history.splice(0, 2)) turn.element.classList.add("dropped");
        dropped += 1;
      }
    }
  } catch (error) {
    if (mine !== conversation) return;
    if (error.name !== "AbortError") {
      const question = history.pop(); // the question goes back to the box, to send again
      question.element.remove();
      bubble.remove();
      $("question").value = question.content;
      showError(error);
      setChatBusy(false);
      return;
    }
    note = "stopped";
  }
  if (mine !== conversation) return;
  bubble.classList.remove("pending");
  bubble.dataset.chunks = String(chunks);
  history.push({ role: "assistant", content: answerText, element: bubble });
  if (info.ratings && answerText) addThumbs(bubble, asked, answerText);
  chatNote([dropped ? `the conversation no longer fit the context: dropped the ${dropped} oldest turn(s)` : "", note]
    .filter(Boolean).join(" · "));
  chatAbort = null;
  setChatBusy(false);
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("question").value;
  if (!info || !question.trim() || chatAbort) return;
  clearError();
  $("question").value = "";
  history.push({ role: "user", content: question, element: addMessage("user", question) });
  answer();
});

$("question").addEventListener("keydown", (event) => {
  // isComposing: Enter that confirms an input-method candidate (Chinese, Japanese) is not a send
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});

$("stop").addEventListener("click", () => { if (chatAbort) chatAbort.abort(); });

$("regenerate").addEventListener("click", () => {
  const last = history[history.length - 1];
  if (chatAbort || !last || last.role !== "assistant") return;
  history.pop().element.remove();
  clearError();
  answer();
});

$("new").addEventListener("click", () => {
  if (chatAbort) chatAbort.abort();
  chatAbort = null;
  conversation += 1;
  history = [];
  $("messages").textContent = "";
  chatNote("");
  setChatBusy(false);
});

// ---------------------------------------------------------------- compare

async function compare(question) {
  const messages = systemMessages().concat([{ role: "user", content: question }]);
  const answers = { base: "", tuned: "" };
  lastComparison = null;
  $("rate").hidden = true;
  $("rated").textContent = "";
  $("compare-send").disabled = true;
  $("compare-stop").disabled = false;
  document.body.dataset.compare = "busy";
  compareAborts = [];
  // Both requests at once: the server answers one at a time, so the second streams when the first is done.
  const one = async (who, model) => {
    const element = $(`answer-${who}`);
    const controller = new AbortController();
    compareAborts.push(controller);
    element.textContent = "";
    element.classList.add("pending");
    try {
      await stream(model, messages, (piece) => { answers[who] += piece; element.textContent = answers[who]; },
                   controller.signal);
      return true;
    } catch (error) {
      if (error instanceof KeyNeeded) return false;
      element.textContent = error.name === "AbortError" ? `${answers[who]} [stopped]` : `error: ${error.message}`;
      return false;
    } finally {
      element.classList.remove("pending");
    }
  };
  const done = await Promise.all([one("base", info.base), one("tuned", info.model)]);
  $("compare-send").disabled = false;
  $("compare-stop").disabled = true;
  document.body.dataset.compare = "idle";
  if (!done.every(Boolean)) return;
  if (answers.base.trim() === answers.tuned.trim()) {
    $("rated").textContent = "The two answers are the same: there is nothing to rate.";
  } else if (answers.base.trim() && answers.tuned.trim()) {
    lastComparison = { messages, base: answers.base, tuned: answers.tuned };
    $("rate").hidden = false;
  }
}

$("compare-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("compare-question").value;
  if (info && info.base && question.trim()) {
    clearError();
    compare(question);
  }
});

$("compare-stop").addEventListener("click", () => { for (const controller of compareAborts) controller.abort(); });

async function rate(better) {
  if (!lastComparison) return;
  const worse = better === "base" ? "tuned" : "base";
  const pair = { prompt: lastComparison.messages, chosen: lastComparison[better], rejected: lastComparison[worse] };
  try {
    const response = await api("/web/ratings", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(pair),
    });
    if (!response.ok) throw await failure(response);
    const saved = await response.json();
    lastComparison = null;
    $("rate").hidden = true;
    $("rated").textContent = `Saved: ${better} preferred. ${saved.ratings} rating(s) in ${saved.saved}.`;
  } catch (error) {
    showError(error);
  }
}

$("prefer-base").addEventListener("click", () => rate("base"));
$("prefer-tuned").addEventListener("click", () => rate("tuned"));

// ---------------------------------------------------------------- run

function showRun() {
  loadRun();
  clearInterval(runTimer);
  runTimer = setInterval(loadRun, RUN_REFRESH_MS);
}

async function loadRun() {
  try {
    const response = await api("/web/run");
    if (!response.ok) throw await failure(response);
    renderRun(await response.json());
  } catch (error) {
    clearInterval(runTimer);
    showError(error);
  }
}

function cell(row, text, tag = "td", number = false) {
  const element = document.createElement(tag);
  element.textContent = text;
  if (number) element.className = "number";
  row.append(element);
}

function fillTable(table, head, rows) {
  table.textContent = "";
  if (head) {
    const row = table.insertRow();
    for (const text of head) cell(row, text, "th");
  }
  for (const values of rows) {
    const row = table.insertRow();
    values.forEach((value, i) => {
      const number = typeof value === "number";
      const text = number ? (Number.isInteger(value) ? String(value) : value.toFixed(4)) : value;
      cell(row, text, !head && i === 0 ? "th" : "td", number);
    });
  }
}

function renderRun(run) {
  if (!run.run) {
    $("run-note").textContent = run.note;
    $("run-body").hidden = true;
    clearInterval(runTimer);
    return;
  }
  $("run-note").textContent = `run directory: ${run.run}`;
  $("run-body").hidden = false;
  fillTable($("recipe"), null, run.recipe);
  const losses = run.metrics.loss;
  const last = losses.length ? ` · last loss ${losses[losses.length - 1][1].toFixed(4)}` : "";
  $("run-state").textContent = (run.finished ? "finished" : "training: refreshed every few seconds") + last;
  drawChart($("chart"), run.metrics);
  renderReport(run.report, run.report_error, run.run);
}

function renderReport(report, problem, runDir) {
  $("report").hidden = !report;
  $("report-missing").hidden = Boolean(report);
  if (!report) {
    $("report-missing").textContent = problem ||
      `No evaluation yet: python eval.py ${runDir} writes eval/report.json (held-out loss, answers side by side).`;
    return;
  }
  const { base, tuned } = report;
  $("report-facts").textContent = `${report.tuned_name} vs ${report.base_name} on ${report.conversations} held-out ` +
    `conversations (${report.data.join(", ")}); the tuned model's loss is lower on ${report.tuned_better} of ` +
    `${report.conversations}.`;
  const rows = [["loss (answer tokens)", base.loss, tuned.loss], ["perplexity", base.ppl, tuned.ppl],
                ["answer tokens scored", base.tokens, tuned.tokens]];
  const pairs = report.preference; // held-out preference pairs (a DPO/ORPO run): common/preference.compare
  if (pairs) {
    for (const name of ["accuracy", "mean_margin", "accuracy_per_token", "mean_margin_per_token"]) {
      rows.push([`preference ${name.replace(/_/g, " ")}`, pairs.base[name], pairs.tuned[name]]);
    }
  }
  fillTable($("held-out"), ["held-out", "base", "tuned"], rows);
  renderJudged(report.judged);
  renderBenchmarks(report.benchmarks);
  const answers = $("report-answers");
  answers.textContent = "";
  for (const a of report.answers) {
    const pair = document.createElement("div");
    pair.className = "pair";
    const prompt = document.createElement("div");
    prompt.className = "prompt";
    prompt.textContent = `${a.prompt} (${a.source})`;
    const columns = document.createElement("div");
    columns.className = "columns";
    for (const who of ["base", "tuned"]) {
      const column = document.createElement("div");
      column.className = "column";
      const title = document.createElement("h2");
      title.className = `${who}-label`;
      title.textContent = who;
      const text = document.createElement("div");
      text.className = "answer";
      text.textContent = a[who];
      column.append(title, text);
      columns.append(column);
    }
    pair.append(prompt, columns);
    answers.append(pair);
  }
}

// A mean with its 95% bootstrap interval (common/judging.summarise), e.g. "3.25 [2.80, 3.70]".
function interval(s) {
  return s.mean === null ? "—" : `${s.mean.toFixed(2)} [${s.low.toFixed(2)}, ${s.high.toFixed(2)}]`;
}

// eval.py --judge: the rubric's dimensions, base vs tuned, and the pairwise verdict with the judge's position bias.
function renderJudged(judged) {
  $("judged").hidden = !judged;
  if (!judged) return;
  const j = judged.judge;
  $("judged-facts").textContent = `${j.model} at ${j.url}, rubric ${j.rubric} (scores ${j.scale[0]}-${j.scale[1]}); ` +
    `${judged.points} counsellor turns answered by both models; judged ${judged.judged.base} base and ` +
    `${judged.judged.tuned} tuned replies, lost ${judged.lost.base} and ${judged.lost.tuned}. ` +
    "Means with 95% bootstrap intervals.";
  fillTable($("judged-table"), ["dimension", "base", "tuned"],
    Object.entries(judged.rubric).map(([name, s]) => [name, interval(s.base), interval(s.tuned)]));
  const pw = judged.pairwise;
  $("win-rate").textContent = pw.n
    ? `Pairwise, both orders, ${pw.n} turns: tuned wins ${pw.win}, ties ${pw.tie}, loses ${pw.loss}; win rate ` +
      `${pw.win_rate.toFixed(2)} [${pw.low.toFixed(2)}, ${pw.high.toFixed(2)}] (a tie counts half). The verdict ` +
      `flipped with the order on ${Math.round(100 * pw.flip_rate)}% of the turns` +
      (pw.flip_rate >= 0.25 ? " (the judge's position bias: weigh the win rate accordingly)." : ".")
    : `Pairwise: no turn got a verdict in both orders (${pw.lost} lost).`;
}

// eval.py --tasks: each task's metrics, base vs tuned.
function renderBenchmarks(benchmarks) {
  $("benchmarks").hidden = !benchmarks;
  if (!benchmarks) return;
  const rows = [];
  for (const [task, metrics] of Object.entries(benchmarks.tasks)) {
    for (const [metric, v] of Object.entries(metrics)) rows.push([`${task} ${metric}`, v.base, v.tuned]);
  }
  fillTable($("benchmarks-table"), [`lm-eval ${benchmarks.lm_eval}`, "base", "tuned"], rows);
}

function svg(name, attributes, parent) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (parent) parent.append(element);
  return element;
}

// The loss per logged step as a line, the eval loss as dots, on one pair of axes.
function drawChart(box, metrics) {
  const points = metrics.loss.concat(metrics.eval_loss);
  box.textContent = "";
  if (!points.length) {
    box.textContent = "No loss logged yet (metrics.jsonl).";
    return;
  }
  // Drawn at the box's own width (redrawn at each refresh), so that its text is the page's size, not scaled.
  const W = Math.max(320, box.clientWidth - 14), H = 260, left = 52, right = 16, top = 14, bottom = 40;
  const steps = points.map((p) => p[0]);
  const values = points.map((p) => p[1]);
  const s0 = Math.min(...steps), s1 = Math.max(...steps);
  let v0 = Math.min(...values), v1 = Math.max(...values);
  const pad = (v1 - v0) * 0.08 || 0.1;
  v0 -= pad;
  v1 += pad;
  const x = (s) => left + (s1 === s0 ? 0.5 : (s - s0) / (s1 - s0)) * (W - left - right);
  const y = (v) => top + ((v1 - v) / (v1 - v0)) * (H - top - bottom);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "training loss per step" }, box);
  for (let i = 0; i <= 4; i++) {
    const v = v0 + ((v1 - v0) * i) / 4;
    svg("line", { class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }, chart);
    svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, chart).textContent = v.toFixed(2);
  }
  svg("line", { class: "axis", x1: left, x2: W - right, y1: H - bottom, y2: H - bottom }, chart);
  svg("line", { class: "axis", x1: left, x2: left, y1: top, y2: H - bottom }, chart);
  const ticks = s1 === s0 ? [s0] : [s0, Math.round((s0 + s1) / 2), s1];
  for (const s of ticks) {
    svg("text", { x: x(s), y: H - bottom + 16, "text-anchor": "middle" }, chart).textContent = String(s);
  }
  svg("text", { x: (left + W - right) / 2, y: H - 6, "text-anchor": "middle" }, chart).textContent = "step";
  const line = svg("polyline", {
    class: "loss", "data-points": metrics.loss.length,
    points: metrics.loss.map(([s, v]) => `${x(s).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
  }, chart);
  svg("title", {}, line).textContent = "training loss";
  for (const [s, v] of metrics.eval_loss) {
    const dot = svg("circle", { class: "eval-loss", cx: x(s), cy: y(v), r: 4.5 }, chart);
    svg("title", {}, dot).textContent = `eval loss ${v.toFixed(4)} at step ${s}`;
  }
  const legend = svg("g", {}, chart);
  svg("rect", { class: "legend-loss", x: W - right - 190, y: top + 2, width: 14, height: 3 }, legend);
  svg("text", { x: W - right - 170, y: top + 7 }, legend).textContent = `loss (${metrics.loss.length} steps)`;
  if (metrics.eval_loss.length) {
    svg("circle", { class: "eval-loss", cx: W - right - 183, cy: top + 20, r: 4.5 }, legend);
    svg("text", { x: W - right - 170, y: top + 24 }, legend).textContent = "eval loss";
  }
}

start();
