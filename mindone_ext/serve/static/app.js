// The voice-chat page: microphone -> 16 kHz 16-bit PCM over the WebSocket; text deltas into the
// transcript; the answer's 24 kHz float32 chunks scheduled back to back so playback has no gaps.
// The server detects the end of each turn (voice activity detection) and cancels an answer when
// the user speaks over it; the page then drops the audio it had scheduled.
"use strict";

const $ = (id) => document.getElementById(id);
// What the page did, for people debugging and for the browser test.
const stats = (window.voiceStats = { connected: false, turnsDone: 0, chunksScheduled: 0, secondsScheduled: 0,
                                     transcript: "", errors: [] });
let ws = null, mic = null, player = null, nextStart = 0, playing = [], answer = null;

function status(text) { $("status").textContent = text; }

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
      status("Listening — speak, then pause.");
      break;
    case "speech_started":
      stopPlayback();  // the user talks over the answer: the server cancels it
      status("Hearing you…");
      break;
    case "speech_stopped":
      addTurn("user", "(spoken)");
      status("Thinking…");
      break;
    case "queued":
      status(`Waiting for the model (${event.position} ahead)…`);
      break;
    case "response.start":
      answer = addTurn("assistant", "");
      $("stop").disabled = false;
      status("Answering…");
      break;
    case "text":
      if (answer) answer.textContent += event.delta;
      stats.transcript += event.delta;
      break;
    case "response.done":
      stats.turnsDone += 1;
      $("stop").disabled = true;
      answer = null;
      status("Listening — speak, then pause.");
      break;
    case "response.cancelled":
      if (answer) answer.classList.add("cancelled");
      $("stop").disabled = true;
      answer = null;
      break;
    case "error":
      stats.errors.push(event);
      addTurn("error", `${event.code}: ${event.message}`);
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
  $("start").textContent = "Start talking";
  $("start").classList.remove("live");
  $("stop").disabled = $("text").disabled = $("send").disabled = true;
}

$("start").onclick = () => {
  if (ws) { hangUp(); status("Press “Start talking” to talk again."); return; }
  start().catch((e) => { stats.errors.push({ code: "page", message: String(e) }); status(`Cannot start: ${e.message}`); hangUp(); });
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
  ws.send(JSON.stringify({ type: "text", text }));
  $("text").value = "";
};
