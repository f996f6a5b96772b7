// The voice-chat page: microphone -> 16 kHz 16-bit PCM over the WebSocket; text deltas into the
// transcript; the answer's 24 kHz float32 chunks scheduled back to back so playback has no gaps.
// The server detects the end of each turn (voice activity detection) and cancels an answer when
// the user speaks over it; the page then drops the audio it had scheduled. The state pill says
// what is happening (listening, hearing you, thinking, speaking), a meter shows the microphone's
// level, and a problem is shown once, in one place, until things work again.
"use strict";

const $ = (id) => document.getElementById(id);
// What the page did, for people debugging and for the browser test.
const stats = (window.voiceStats = { connected: false, turnsDone: 0, chunksScheduled: 0, secondsScheduled: 0,
                                     transcript: "", errors: [], states: [], maxLevel: 0 });
let ws = null, mic = null, player = null, nextStart = 0, playing = [], answer = null, heardSince = 0;
let speakingTimer = null;

function status(text) { $("status").textContent = text; }

function setState(name, label = name) {
  const pill = $("state");
  pill.className = `state ${name}`;
  pill.textContent = label;
  if (stats.states[stats.states.length - 1] !== name) stats.states.push(name);
}

// After the last scheduled chunk has played, the assistant has stopped speaking.
function listenAfterPlayback() {
  clearTimeout(speakingTimer);
  const left = player ? Math.max(0, nextStart - player.currentTime) : 0;
  speakingTimer = setTimeout(() => { if (ws && !answer) setState("listening"); }, left * 1000);
}

function problem(text) {
  const box = $("problem");
  if (text === null) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = text;  // replaces the previous one: a repeated error is shown once
  box.hidden = false;
}

function addTurn(kind, text) {
  const div = document.createElement("div");
  div.className = `turn ${kind}`;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function stopPlayback() {
  for (const source of playing) { try { source.stop(); } catch (e) { /* already ended */ } }
  playing = [];
  nextStart = 0;
}

function play(buffer) {
  const samples = new Float32Array(buffer);
  const chunk = player.createBuffer(1, samples.length, 24000);
  chunk.copyToChannel(samples, 0);
  const source = player.createBufferSource();
  source.buffer = chunk;
  source.connect(player.destination);
  const at = Math.max(player.currentTime + 0.05, nextStart);  // right after the previous chunk
  source.start(at);
  nextStart = at + chunk.duration;
  setState("speaking");
  playing.push(source);
  source.onended = () => { playing = playing.filter((s) => s !== source); };
  stats.chunksScheduled += 1;
  stats.secondsScheduled += chunk.duration;
}

function onEvent(event) {
  switch (event.type) {
    case "ready":
      stats.connected = true;
      $("speaker").replaceChildren(...event.speakers.map((name) => new Option(name, name)));
      setState("listening");
      status("Speak, then pause.");
      break;
    case "speech_started":
      stopPlayback();  // the user talks over the answer: the server cancels it
      heardSince = performance.now();
      setState("hearing", "hearing you");
      status("");
      break;
    case "speech_stopped":
      addTurn("user", `🎤 ${((performance.now() - heardSince) / 1000).toFixed(1)} s of speech`);
      setState("thinking");
      break;
    case "queued":
      setState("thinking");
      status(`Waiting for the model (${event.position} ahead)…`);
      break;
    case "response.start":
      answer = addTurn("assistant", "");
      $("stop").disabled = false;
      setState("thinking");
      status("");
      break;
    case "text":
      if (answer) answer.textContent += event.delta;
      stats.transcript += event.delta;
      break;
    case "response.done":
      stats.turnsDone += 1;
      $("stop").disabled = true;
      answer = null;
      problem(null);  // it works again
      listenAfterPlayback();
      break;
    case "response.cancelled":
      if (answer) answer.classList.add("cancelled");
      $("stop").disabled = true;
      answer = null;
      listenAfterPlayback();
      break;
    case "error":
      stats.errors.push(event);
      problem(event.message);
      if (!answer) setState("listening");
      break;
  }
}

async function start() {
  const url = new URL("/v1/voice", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if ($("key").value) url.searchParams.set("api_key", $("key").value);
  ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (m) => (typeof m.data === "string" ? onEvent(JSON.parse(m.data)) : play(m.data));
  ws.onclose = (e) => { status(`Disconnected${e.reason ? `: ${e.reason}` : ""}.`); hangUp(); };
  await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = () => reject(new Error("cannot connect")); });

  player = new AudioContext({ sampleRate: 24000 });
  const capture = new AudioContext({ sampleRate: 16000 });  // the browser resamples the microphone
  await capture.audioWorklet.addModule("/static/capture-worklet.js");
  const stream = await navigator.mediaDevices.getUserMedia(
    { audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
  const node = new AudioWorkletNode(capture, "capture");
  node.port.onmessage = (m) => {
    let energy = 0;
    for (let i = 0; i < m.data.length; i++) energy += m.data[i] * m.data[i];
    const level = Math.min(1, 4 * Math.sqrt(energy / m.data.length));  // speech RMS ~0.05-0.25
    $("level").value = level;
    stats.maxLevel = Math.max(stats.maxLevel, level);
    if (ws.readyState !== WebSocket.OPEN) return;
    const pcm = new Int16Array(m.data.length);
    for (let i = 0; i < pcm.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(m.data[i] * 32768)));
    ws.send(pcm.buffer);
  };
  capture.createMediaStreamSource(stream).connect(node);
  node.connect(capture.destination);  // keeps the node pulled; it outputs silence
  mic = { capture, stream };
  $("start").textContent = "Hang up";
  $("start").classList.add("live");
  $("text").disabled = $("send").disabled = false;
}

function hangUp() {
  if (mic) {
    mic.stream.getTracks().forEach((t) => t.stop());
    mic.capture.close();
    mic = null;
  }
  stopPlayback();
  if (ws && ws.readyState === WebSocket.OPEN) ws.close();
  ws = null;
  $("level").value = 0;
  setState("idle");
  $("start").textContent = "Start talking";
  $("start").classList.remove("live");
  $("stop").disabled = $("text").disabled = $("send").disabled = true;
}

$("start").onclick = () => {
  if (ws) { hangUp(); status("Press “Start talking” to talk again."); return; }
  start().catch((e) => { stats.errors.push({ code: "page", message: String(e) }); hangUp(); problem(`Cannot start: ${e.message}`); });
};
$("stop").onclick = () => {
  stopPlayback();
  if (ws) ws.send(JSON.stringify({ type: "cancel" }));
};
$("speaker").onchange = () => ws && ws.send(JSON.stringify({ type: "config", speaker: $("speaker").value }));
$("ask").onsubmit = (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (!text || !ws) return;
  stopPlayback();
  addTurn("user", text);
  setState("thinking");
  ws.send(JSON.stringify({ type: "text", text }));
  $("text").value = "";
};
