// The glmvoice page: a Realtime API client in plain JavaScript, on the same events any client uses.
// Microphone -> capture worklet (24 kHz PCM16) -> input_audio_buffer.append; response.output_audio.delta ->
// player worklet. Barge-in: on speech_started while an answer plays, playback stops at once and
// conversation.item.truncate tells the server how much was played.

const WIRE_RATE = 24000;
const RECONNECT_S = [1, 2, 5, 10];
const $ = (id) => document.getElementById(id);

// What the tests (and a curious user in the console) can read.
const stats = { playedSamples: 0, played: {}, truncations: [], latencies: [], errors: [], events: 0 };
window.glmvoice = { stats };

const state = {
  ws: null, opened: false, key: null, needsKey: false, attempts: 0, timer: null, fullServer: false,
  ctx: null, player: null, capture: null, stream: null, talking: false,
  responses: {}, // response id -> {li, item}
  items: {}, // assistant item id -> li
  cut: new Set(), // items cut by a barge-in: their late audio is dropped
  playing: null, // the item the speaker is playing now
  voiceEndAt: null, // performance.now() at the last speech_stopped
  userLi: null, // the spoken turn being heard
  started: {}, // item -> true once its first sample played
};

// ------------------------------------------------------------------ connection

function setConnection(text, kind) {
  const el = $("connection");
  el.textContent = text;
  el.dataset.state = kind;
}

function showMessage(text) {
  const el = $("message");
  el.textContent = text;
  el.hidden = !text;
}

async function boot() {
  const match = location.hash.match(/key=([^&]+)/);
  if (match) state.key = decodeURIComponent(match[1]);
  try {
    const health = await (await fetch("health", { cache: "no-store" })).json();
    state.needsKey = !!health.auth;
  } catch {
    setConnection("Server unreachable", "error");
    showMessage("Cannot reach the glmvoice server. Reload the page once it is running.");
    return;
  }
  if (state.needsKey && !state.key) {
    $("key-form").hidden = false;
    setConnection("API key needed", "idle");
    return;
  }
  connect();
}

function connect() {
  clearTimeout(state.timer);
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`;
  const protocols = ["realtime"];
  if (state.key) protocols.push(`openai-insecure-api-key.${state.key}`);
  setConnection("Connecting…", "idle");
  state.opened = false;
  state.fullServer = false;
  const ws = new WebSocket(url, protocols);
  state.ws = ws;
  ws.onopen = () => {
    state.opened = true;
    state.attempts = 0;
  };
  ws.onmessage = (e) => {
    stats.events += 1;
    onEvent(JSON.parse(e.data));
  };
  ws.onclose = async () => {
    if (state.ws !== ws) return;
    state.ws = null;
    stopTalking();
    if (state.opened) state.everConnected = true;
    // refused before it opened, by a server that is up and wants a key: the key is wrong
    if (!state.opened && state.needsKey && (await serverUp())) {
      setConnection("Key refused", "error");
      showMessage("The server refused this API key. Enter the right one.");
      $("key-form").hidden = false;
      return;
    }
    const wait = RECONNECT_S[Math.min(state.attempts, RECONNECT_S.length - 1)];
    state.attempts += 1;
    if (state.fullServer) {
      showMessage(`The server is full: it serves as many conversations as it can. Trying again in ${wait} s…`);
    } else if (state.everConnected) {
      showMessage(`Connection lost. Reconnecting in ${wait} s…`);
    } else {
      showMessage(`Cannot reach the glmvoice server. Trying again in ${wait} s…`);
    }
    setConnection("Disconnected", "error");
    state.timer = setTimeout(connect, wait * 1000);
  };
}

async function serverUp() {
  try {
    return (await fetch("health", { cache: "no-store" })).ok;
  } catch {
    return false;
  }
}

function send(event) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(event));
    return true;
  }
  showMessage("Not connected: wait for the connection to come back.");
  return false;
}

// ------------------------------------------------------------------ server events

function onEvent(event) {
  switch (event.type) {
    case "session.created":
      setConnection("Connected", "connected");
      showMessage("");
      break;
    case "input_audio_buffer.speech_started":
      state.userStartMs = event.audio_start_ms;
      bargeIn();
      state.userLi = addTurn("user", "Spoken turn…");
      break;
    case "input_audio_buffer.speech_stopped": {
      state.voiceEndAt = performance.now();
      if (state.userLi) {
        state.userLi.dataset.endMs = event.audio_end_ms;
        setText(state.userLi, "Spoken turn");
      }
      break;
    }
    case "input_audio_buffer.committed":
      if (state.userLi) {
        const seconds = (Number(state.userLi.dataset.endMs) - Number(state.userLi.dataset.startMs || 0)) / 1000;
        setText(state.userLi, Number.isFinite(seconds) && seconds > 0 ? `Spoken turn (${seconds.toFixed(1)} s)` : "Spoken turn");
        state.userLi = null;
      }
      break;
    case "response.created":
      state.responses[event.response.id] = { li: addTurn("assistant", ""), item: null };
      break;
    case "response.output_item.added": {
      const r = state.responses[event.response_id];
      if (r) {
        r.item = event.item.id;
        state.items[event.item.id] = r.li;
        r.li.dataset.item = event.item.id;
      }
      break;
    }
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta": {
      const r = state.responses[event.response_id];
      if (r) appendText(r.li, event.delta);
      break;
    }
    case "response.output_audio.delta":
      if (!state.cut.has(event.item_id)) play(event.item_id, event.delta);
      break;
    case "response.done": {
      const r = state.responses[event.response.id];
      if (r) {
        r.li.dataset.status = event.response.status;
        if (event.response.status === "cancelled") r.li.classList.add("interrupted");
        if (event.response.status === "failed") showMessage("The answer failed on the server: see its log.");
      }
      break;
    }
    case "error": {
      const code = event.error && event.error.code;
      stats.errors.push(code);
      if (code === "session_limit_reached") state.fullServer = true;
      else showMessage(event.error.message);
      break;
    }
    default:
      break;
  }
}

function addTurn(role, text) {
  const li = document.createElement("li");
  li.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "glmvoice";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  if (role === "user" && state.userStartMs !== undefined) li.dataset.startMs = state.userStartMs;
  $("transcript").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function setText(li, text) {
  li.querySelector(".text").textContent = text;
}

function appendText(li, text) {
  li.querySelector(".text").textContent += text;
}

// ------------------------------------------------------------------ audio

async function ensureAudio() {
  if (state.ctx) {
    if (state.ctx.state === "suspended") await state.ctx.resume();
    return;
  }
  const ctx = new AudioContext({ latencyHint: "interactive" });
  await ctx.audioWorklet.addModule("static/worklets.js");
  const player = new AudioWorkletNode(ctx, "glmvoice-player", { outputChannelCount: [1] });
  player.connect(ctx.destination);
  player.port.onmessage = (e) => onPlayer(e.data);
  state.ctx = ctx;
  state.player = player;
  if (ctx.state === "suspended") await ctx.resume();
}

function onPlayer(m) {
  if (m.type === "started") {
    if (state.voiceEndAt !== null && !state.started[m.item]) {
      const seconds = (performance.now() - state.voiceEndAt) / 1000;
      stats.latencies.push(seconds);
      $("latency").textContent = `end of voice → first sound: ${seconds.toFixed(2)} s`;
      state.voiceEndAt = null;
    }
    state.started[m.item] = true;
  } else if (m.type === "progress" || m.type === "cleared") {
    stats.played = m.played;
    stats.playedSamples = Object.values(m.played).reduce((a, b) => a + b, 0);
    document.body.dataset.played = String(stats.playedSamples);
    if (m.type === "progress") state.playing = m.playing;
    if (m.type === "cleared" && state.pendingCut) {
      const item = state.pendingCut;
      state.pendingCut = null;
      const ms = Math.floor(((m.played[item] || 0) * 1000) / WIRE_RATE);
      stats.truncations.push({ item, audio_end_ms: ms });
      send({ type: "conversation.item.truncate", item_id: item, content_index: 0, audio_end_ms: ms });
    }
  }
}

function play(item, b64) {
  if (!state.player) return;
  const raw = atob(b64);
  const samples = new Float32Array(raw.length >> 1);
  for (let i = 0; i < samples.length; i++) {
    let v = raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8);
    if (v >= 0x8000) v -= 0x10000;
    samples[i] = v / 32768;
  }
  state.player.port.postMessage({ type: "audio", samples, item }, [samples.buffer]);
}

// The user speaks over the answer: silence it now, then say how much of it was played.
function bargeIn() {
  const item = state.playing;
  if (!item || !state.player || !$("interrupt").checked) return;
  state.cut.add(item);
  state.pendingCut = item;
  state.player.port.postMessage({ type: "clear" });
  if (state.items[item]) state.items[item].classList.add("interrupted");
}

async function startTalking() {
  await ensureAudio();
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
  } catch (err) {
    const denied = err && (err.name === "NotAllowedError" || err.name === "SecurityError");
    showMessage(denied
      ? "Microphone access was denied. Allow it in the browser's site settings and press Start again; you can still type."
      : `No microphone could be opened (${err && err.name}). You can still type.`);
    document.body.dataset.mic = denied ? "denied" : "missing";
    return;
  }
  const ctx = state.ctx;
  const source = ctx.createMediaStreamSource(stream);
  const capture = new AudioWorkletNode(ctx, "glmvoice-capture");
  const mute = ctx.createGain();
  mute.gain.value = 0;
  source.connect(capture).connect(mute).connect(ctx.destination);
  capture.port.onmessage = (e) => {
    const { samples, level } = e.data;
    $("level").style.width = `${Math.min(100, level * 400)}%`;
    $("level-value").value = Math.min(1, level * 4);
    if (state.talking) send({ type: "input_audio_buffer.append", audio: pcm16(samples) });
  };
  Object.assign(state, { stream, capture, talking: true });
  document.body.dataset.mic = "on";
  const button = $("start");
  button.textContent = "Stop";
  button.setAttribute("aria-pressed", "true");
  showMessage("");
}

function stopTalking() {
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  if (state.capture) state.capture.disconnect();
  Object.assign(state, { stream: null, capture: null, talking: false });
  $("level").style.width = "0";
  const button = $("start");
  button.textContent = "Start talking";
  button.setAttribute("aria-pressed", "false");
}

function pcm16(samples) {
  const bytes = new Uint8Array(samples.length * 2);
  for (let i = 0; i < samples.length; i++) {
    const v = Math.max(-32768, Math.min(32767, Math.round(samples[i] * 32768)));
    bytes[2 * i] = v & 0xff;
    bytes[2 * i + 1] = (v >> 8) & 0xff;
  }
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

// ------------------------------------------------------------------ the controls

$("start").addEventListener("click", () => (state.talking ? stopTalking() : startTalking()));

$("type-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = $("typed");
  const text = input.value.trim();
  if (!text) return;
  await ensureAudio();
  const item = { type: "message", role: "user", content: [{ type: "input_text", text }] };
  if (send({ type: "conversation.item.create", item }) && send({ type: "response.create" })) {
    addTurn("user", text);
    input.value = "";
  }
});

$("settings-form").addEventListener("submit", (e) => {
  e.preventDefault();
  send({
    type: "session.update",
    session: {
      type: "realtime",
      audio: { input: { turn_detection: {
        type: "server_vad",
        silence_duration_ms: Number($("silence").value),
        prefix_padding_ms: Number($("padding").value),
        threshold: Number($("threshold").value),
        interrupt_response: $("interrupt").checked,
      } } },
    },
  });
});

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("key").value.trim();
  $("key-form").hidden = true;
  showMessage("");
  connect();
});

boot();
