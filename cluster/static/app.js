// The Open-QA page: asks POST /v1/answer and shows the answer inside its evidence block and the top-k
// blocks with bars for their share of p(y|x). Text from the server is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);

function fmt(p) {
  return p === null || p === undefined ? "-" : Number(p).toPrecision(3);
}

function highlighted(text, span) {
  // the block's text with the answer's characters [start, end) in a <mark>
  const frag = document.createDocumentFragment();
  if (!span) {
    frag.append(text);
    return frag;
  }
  const mark = document.createElement("mark");
  mark.textContent = text.slice(span[0], span[1]);
  frag.append(text.slice(0, span[0]), mark, text.slice(span[1]));
  return frag;
}

function show(result) {
  $("answer").textContent = result.answer || "(no answer)";
  $("probability").textContent = fmt(result.probability);
  $("answer-version").textContent = result.index_version;
  $("version").textContent = `index version: ${result.index_version} · store version: ${result.store_version} · model: ${result.model}`;
  const ev = result.evidence;
  const evidenceBlock = ev ? result.blocks.find((b) => b.block_id === ev.block_id) : null;
  $("evidence").replaceChildren(evidenceBlock ? highlighted(evidenceBlock.text, ev.char_span) : "(none)");
  const items = result.blocks.map((b) => {
    const li = document.createElement("li");
    li.dataset.blockId = b.block_id;
    const title = document.createElement("div");
    title.className = "block-title";
    title.textContent = `${b.title} (doc ${b.doc_id}, block ${b.block_id})`;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = `${Math.max(0, Math.min(1, b.share)) * 100}%`;
    bar.append(fill);
    const nums = document.createElement("div");
    nums.className = "muted";
    nums.textContent = `share ${fmt(b.share)} · p(z|x) ${fmt(b.p_z)}`;
    const text = document.createElement("div");
    text.className = "block-text";
    text.append(highlighted(b.text, ev && ev.block_id === b.block_id ? ev.char_span : null));
    li.append(title, bar, nums, text);
    return li;
  });
  $("blocks").replaceChildren(...items);
  $("result").hidden = false;
}

async function ask(event) {
  event.preventDefault();
  $("error").hidden = true;
  const body = { question: $("question").value };
  if ($("k").value !== "") body.k = Number($("k").value);
  $("submit").disabled = true;
  try {
    const resp = await fetch("/v1/answer", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error || `HTTP ${resp.status}`);
    show(data);
  } catch (err) {
    $("error").textContent = String(err.message || err);
    $("error").hidden = false;
  } finally {
    $("submit").disabled = false;
  }
}

async function health() {
  try {
    const data = await (await fetch("/v1/health")).json();
    $("version").textContent = `index version: ${data.index_version} · store version: ${data.store_version} · model: ${data.model}`;
  } catch (err) {
    $("version").textContent = "service not reachable";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("submit", ask);
  health();
});
