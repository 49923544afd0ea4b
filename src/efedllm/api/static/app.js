// The web UI: a chat page streaming from /v1/chat/completions and a monitor polling /api/swarm.
// No framework and nothing fetched from elsewhere: the API process serves this file.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#3b7dd8", "#2f9e6e", "#8e5bd0", "#d4862a", "#1f9bb0", "#b0477a", "#5f7a1f", "#6d6d6d"];
const state = { messages: [], controller: null, model: null, monitorTimer: null };

function headers() {
  const key = $("api-key").value.trim();
  const h = { "Content-Type": "application/json" };
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  return div;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    state.model = body.data[0].id;
    $("model-name").textContent = `${state.model} — ${body.data[0].blocks_covered}/${body.data[0].blocks_total} blocks served`;
  } catch (error) {
    $("model-name").textContent = "model unknown: " + error.message;
  }
}

function settings() {
  const body = { temperature: parseFloat($("temperature").value), top_p: parseFloat($("top-p").value),
                 max_tokens: parseInt($("max-tokens").value, 10) };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);
  return body;
}

// Reads a server-sent event stream; calls onData with each event's data string.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (data && onData(data) === false) return;
    }
  }
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || state.controller) return;
  if (!state.model) await loadModel();
  state.messages.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  $("prompt").value = "";
  const bubble = addMessage("assistant", "");
  bubble.dataset.done = "false";
  state.controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false; $("chat-status").textContent = "generating…";
  const started = performance.now();
  let tokens = 0;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify({ model: state.model, messages: state.messages, stream: true,
                             stream_options: { include_usage: true }, ...settings() }),
    });
    if (!response.ok) {
      const body = await response.json();
      throw new Error(body.error ? body.error.message : response.statusText);
    }
    await readEvents(response, (data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) bubble.textContent += choice.delta.content;
        if (choice.finish_reason) bubble.dataset.finishReason = choice.finish_reason;
      }
    });
    state.messages.push({ role: "assistant", content: bubble.textContent });
    const seconds = (performance.now() - started) / 1000;
    $("chat-status").textContent = `${tokens} tokens in ${seconds.toFixed(1)} s`;
  } catch (error) {
    if (error.name !== "AbortError") {
      bubble.classList.add("error");
      bubble.textContent += (bubble.textContent ? "\n" : "") + "error: " + error.message;
    }
    $("chat-status").textContent = error.name === "AbortError" ? "stopped" : "failed";
    state.messages.pop();
  } finally {
    bubble.dataset.done = "true";
    state.controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

function short(peer) { return peer.length > 14 ? "…" + peer.slice(-12) : peer; }

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function verdictText(verdicts) {
  if (!verdicts.length) return "no verdict yet";
  return verdicts.map((v) => `${v.active ? "active" : "DEACTIVATED"} · score ${v.score.toFixed(3)} · `
    + `${v.passed}/${v.probes} probes · by ${short(v.verifier)}${v.trusted ? "" : " (untrusted)"}`).join("\n");
}

function renderSwarm(snapshot) {
  const colors = {};
  snapshot.servers.forEach((server, index) => { colors[server.peer_id] = COLORS[index % COLORS.length]; });
  const bar = $("coverage");
  bar.replaceChildren();
  snapshot.blocks.forEach((peers, block) => {
    const div = document.createElement("div");
    div.className = "block" + (peers.length ? "" : " gap");
    if (peers.length) div.style.background = colors[peers[0]];
    div.title = `block ${block}: ` + (peers.length ? peers.map(short).join(", ") : "no server");
    div.textContent = peers.length > 1 ? "×" + peers.length : "";
    div.dataset.block = block;
    bar.appendChild(div);
  });
  $("gaps").textContent = snapshot.gaps.length ? `blocks with no server: ${snapshot.gaps_text}` : "";
  const tbody = document.querySelector("#servers tbody");
  tbody.replaceChildren();
  for (const server of snapshot.servers) {
    const row = document.createElement("tr");
    row.dataset.peer = server.peer_id;
    const name = cell(row, short(server.peer_id));
    const swatch = document.createElement("span");
    swatch.className = "swatch"; swatch.style.background = colors[server.peer_id];
    name.prepend(swatch); name.title = server.peer_id;
    cell(row, `${server.span[0]}:${server.span[1]}`);
    cell(row, server.state + (server.banned_here ? " (avoided here)" : ""), "state-" + server.state);
    cell(row, server.rtt_ms === null ? "–" : `${server.rtt_ms} ms`);
    cell(row, server.step_ms === null ? "–" : `${server.step_ms} ms`);
    cell(row, server.claimed_tokens_per_s);
    cell(row, server.dtype);
    cell(row, server.free_cache_tokens);
    cell(row, verdictText(server.verdicts)).style.whiteSpace = "pre-line";
    cell(row, server.balance === null ? "–" : server.balance.toFixed(4));
    tbody.appendChild(row);
  }
  const serving = snapshot.serving;
  $("summary").innerHTML = "";
  for (const [label, value] of [["model", snapshot.model], ["servers", snapshot.servers.length],
      ["blocks served", `${snapshot.num_blocks - snapshot.gaps.length}/${snapshot.num_blocks}`],
      ["serving now", `${serving.tokens_per_s.toFixed(1)} tokens/s`], ["generating", `${serving.active_rows} rows`],
      ["waiting", `${serving.waiting_requests} requests`]]) {
    const span = document.createElement("span");
    span.innerHTML = `<span class="muted">${label}</span> <b></b>`;
    span.querySelector("b").textContent = value;
    $("summary").appendChild(span);
  }
  $("monitor").dataset.updated = String(Date.now());
}

async function refreshSwarm() {
  try {
    const response = await fetch("/api/swarm");
    if (response.ok) renderSwarm(await response.json());
  } catch (error) {
    $("gaps").textContent = "monitor unreachable: " + error.message;
  }
}

function showPanel(name) {
  document.querySelectorAll(".tab").forEach((tab) => tab.classList.toggle("active", tab.dataset.panel === name));
  document.querySelectorAll(".panel").forEach((panel) => panel.classList.toggle("hidden", panel.id !== name));
  clearInterval(state.monitorTimer);
  if (name === "monitor") { refreshSwarm(); state.monitorTimer = setInterval(refreshSwarm, 2000); }
}

document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => showPanel(tab.dataset.panel)));
$("chat-form").addEventListener("submit", send);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => { state.messages = []; $("messages").replaceChildren(); });
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
});
$("api-key").value = localStorage.getItem("efedllm-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("efedllm-api-key", $("api-key").value); loadModel(); });
if (location.hash === "#monitor") showPanel("monitor");
loadModel();
