// <parley-voice>: a voice conversation with a Parley server from any web page.
//
//   <script src="https://parley.example.com/widget/parley-voice.js"></script>
//   <parley-voice client-secret-url="/parley-secret"></parley-voice>
//
// The element asks the embedding site's `client-secret-url` for an ephemeral client
// secret (the site mints it with POST /v1/realtime/client_secrets and its own key, so no
// long-lived key reaches the page), opens the Realtime WebSocket with that secret in the
// subprotocol list, sends the microphone as Opus (WebCodecs) or 24 kHz PCM16, and plays
// the answer through a jitter buffer that stops the moment the user talks over it.
//
// Plain modern JavaScript with no dependencies and no build step: this file is what the
// server sends. Its two AudioWorklet processors are in WORKLETS below and load from a Blob
// URL, so the widget is one file wherever it is served from.
(() => {
  "use strict";

  if (typeof customElements === "undefined" || customElements.get("parley-voice")) return;

  const PCM_RATE = 24000;      // the realtime API's PCM16 rate, both ways
  const OPUS_RATE = 48000;     // Opus's native rate: no resampling inside the encoder
  const CHUNK_MS = 20;         // one append per 20 ms: one Opus packet, or 480 PCM samples
  const PREBUFFER_MS = 80;     // answer audio queued before playback starts (jitter)
  const FLUSH_WAIT_MS = 500;   // how long stop() waits for the player's count of played audio

  // Runs in the AudioWorkletGlobalScope (sampleRate, currentTime, registerProcessor).
  const WORKLETS = String.raw`
    // Microphone → mono chunks at the wire rate, with the level the widget needs to time
    // turns (when speech began and when it last sounded).
    class ParleyCapture extends AudioWorkletProcessor {
      constructor(options) {
        super();
        const { outputRate, chunkSamples, loudLevel } = options.processorOptions;
        this.step = sampleRate / outputRate;    // input samples per output sample
        this.chunk = new Float32Array(chunkSamples);
        this.fill = 0;
        this.loudLevel = loudLevel;
        this.acc = 0;                           // downsampling: the sum over one output
        this.covered = 0;                       // how much of that output's span is summed
        this.prev = 0;                          // upsampling: the last input sample
        this.pos = 0;                           // upsampling: position between prev and next
        this.lastLoud = null;                   // context time the last loud quantum ended
        this.onset = null;                      // when loud followed a quiet stretch
        this.running = true;
        this.port.onmessage = (event) => { if (event.data.type === "stop") this.running = false; };
      }

      emit(value) {
        this.chunk[this.fill++] = value;
        if (this.fill === this.chunk.length) {
          const samples = this.chunk;
          const size = samples.length;             // before the transfer empties it
          this.port.postMessage({ type: "chunk", samples, lastLoud: this.lastLoud,
                                  onset: this.onset }, [samples.buffer]);
          this.onset = null;
          this.chunk = new Float32Array(size);
          this.fill = 0;
        }
      }

      process(inputs) {
        const channel = inputs[0] && inputs[0][0];
        if (!this.running) return false;
        if (!channel) return true;
        let energy = 0;
        for (let i = 0; i < channel.length; i++) energy += channel[i] * channel[i];
        if (Math.sqrt(energy / channel.length) >= this.loudLevel) {
          // Speech begins where sound follows a quarter second of quiet.
          const quiet = this.lastLoud === null || currentTime - this.lastLoud >= 0.25;
          if (quiet) this.onset = currentTime;
          this.lastLoud = currentTime + channel.length / sampleRate;
        }
        if (this.step >= 1) {
          // Area averaging: each output sample is the mean of the input span it covers,
          // which keeps what lies above the new Nyquist rate from folding back down.
          for (let i = 0; i < channel.length; i++) {
            const x = channel[i];
            const room = this.step - this.covered;
            if (room > 1) {
              this.acc += x;
              this.covered += 1;
            } else {
              this.emit((this.acc + x * room) / this.step);
              this.acc = x * (1 - room);
              this.covered = 1 - room;
            }
          }
        } else {
          for (let i = 0; i < channel.length; i++) {
            const x = channel[i];
            while (this.pos < 1) {
              this.emit(this.prev + (x - this.prev) * this.pos);
              this.pos += this.step;
            }
            this.pos -= 1;
            this.prev = x;
          }
        }
        return true;
      }
    }

    // Answer audio → the speakers: a queue of chunks at the wire rate, played once enough
    // is queued to ride out network jitter, silenced within one render quantum on "pause"
    // or "flush", and counted per item so the widget knows what the user actually heard.
    class ParleyPlayer extends AudioWorkletProcessor {
      constructor(options) {
        super();
        const { inputRate, prebufferMs } = options.processorOptions;
        this.step = inputRate / sampleRate;     // input samples per output sample
        this.prebuffer = Math.round(inputRate * prebufferMs / 1000);
        this.queue = [];                        // [{ item, samples }]
        this.pos = 0;                           // fractional read position in queue[0]
        this.buffered = 0;                      // input samples queued, from pos on
        this.playing = false;                   // past the prebuffer and not starved
        this.paused = false;
        this.ending = false;                    // the response sent all its audio
        this.played = new Map();                // item → input samples played
        this.started = new Set();
        this.lastReport = 0;
        this.port.onmessage = (event) => this.command(event.data);
      }

      command(message) {
        switch (message.type) {
          case "audio":
            this.queue.push({ item: message.item, samples: message.samples });
            this.buffered += message.samples.length;
            this.ending = false;
            break;
          case "end":
            this.ending = true;
            if (!this.queue.length) this.port.postMessage({ type: "drained" });
            break;
          case "pause":
            this.paused = true;
            this.port.postMessage({ type: "paused", time: currentTime, played: this.counts() });
            break;
          case "resume":
            this.paused = false;
            break;
          case "flush":
            this.port.postMessage({ type: "flushed", time: currentTime, played: this.counts() });
            this.queue = [];
            this.pos = 0;
            this.buffered = 0;
            this.playing = false;
            this.paused = false;
            this.ending = false;
            break;
        }
      }

      counts() {
        return Object.fromEntries(this.played);
      }

      credit(item, samples) {
        this.played.set(item, (this.played.get(item) || 0) + samples);
      }

      process(inputs, outputs) {
        const out = outputs[0][0];
        out.fill(0);
        if (this.paused || !this.queue.length) {
          if (this.playing && !this.queue.length) {
            this.playing = false;                // starved: wait for the prebuffer again
            if (this.ending) { this.ending = false; this.port.postMessage({ type: "drained" }); }
          }
          return true;
        }
        if (!this.playing && this.buffered < this.prebuffer && !this.ending) return true;
        this.playing = true;
        for (let i = 0; i < out.length && this.queue.length; i++) {
          const head = this.queue[0];
          if (!this.started.has(head.item)) {
            this.started.add(head.item);
            this.port.postMessage({ type: "started", item: head.item,
                                    time: currentTime + i / sampleRate });
          }
          const at = Math.floor(this.pos);
          const frac = this.pos - at;
          const a = head.samples[at];
          const next = at + 1 < head.samples.length ? head.samples[at + 1]
            : (this.queue[1] ? this.queue[1].samples[0] : a);
          out[i] = a + (next - a) * frac;
          this.pos += this.step;
          const whole = Math.floor(this.pos);
          const used = Math.min(whole, head.samples.length) - at;
          this.credit(head.item, used);
          this.buffered -= used;
          if (this.pos >= head.samples.length) {
            this.pos -= head.samples.length;
            this.queue.shift();
          }
        }
        if (currentTime - this.lastReport >= 0.05) {
          this.lastReport = currentTime;
          this.port.postMessage({ type: "progress", played: this.counts() });
        }
        return true;
      }
    }

    registerProcessor("parley-capture", ParleyCapture);
    registerProcessor("parley-player", ParleyPlayer);
  `;

  const STATES = ["idle", "connecting", "listening", "user-speaking", "thinking", "speaking",
    "error"];
  const LABELS = {
    idle: "Ready", connecting: "Connecting…", listening: "Listening", "user-speaking":
      "Hearing you", thinking: "Thinking…", speaking: "Speaking", error: "Error",
  };

  const STYLE = `
    :host {
      --parley-accent: #2f6fed;
      --parley-accent-text: #ffffff;
      --parley-background: #ffffff;
      --parley-foreground: #1d2330;
      --parley-muted: #6a7284;
      --parley-user: #1d2330;
      --parley-assistant: #2f6fed;
      --parley-error: #b3261e;
      --parley-radius: 12px;
      --parley-font: system-ui, -apple-system, "Segoe UI", sans-serif;
      --parley-width: 22rem;
      display: block;
      max-width: var(--parley-width);
      font-family: var(--parley-font);
      color: var(--parley-foreground);
    }
    .panel {
      background: var(--parley-background);
      border: 1px solid color-mix(in srgb, var(--parley-foreground) 15%, transparent);
      border-radius: var(--parley-radius);
      padding: 0.9rem;
      display: grid;
      gap: 0.7rem;
    }
    .bar { display: flex; align-items: center; gap: 0.7rem; }
    button {
      font: inherit;
      font-weight: 600;
      border: 0;
      border-radius: 999px;
      padding: 0.55rem 1.1rem;
      background: var(--parley-accent);
      color: var(--parley-accent-text);
      cursor: pointer;
      min-width: 6.5rem;
    }
    button:focus-visible { outline: 3px solid var(--parley-accent); outline-offset: 3px; }
    button[aria-pressed="true"] {
      background: var(--parley-background);
      color: var(--parley-accent);
      box-shadow: inset 0 0 0 2px var(--parley-accent);
    }
    button:disabled { opacity: 0.6; cursor: progress; }
    .status { display: flex; align-items: center; gap: 0.45rem; color: var(--parley-muted); }
    .dot {
      width: 0.7rem; height: 0.7rem; border-radius: 50%;
      background: var(--parley-muted);
    }
    :host([data-state="listening"]) .dot { background: #1e8e3e; }
    :host([data-state="user-speaking"]) .dot {
      background: #1e8e3e; animation: pulse 0.8s infinite;
    }
    :host([data-state="thinking"]) .dot { background: #e8a317; animation: pulse 1.2s infinite; }
    :host([data-state="speaking"]) .dot {
      background: var(--parley-assistant); animation: pulse 0.6s infinite;
    }
    :host([data-state="connecting"]) .dot { background: #e8a317; }
    :host([data-state="error"]) .dot { background: var(--parley-error); }
    @keyframes pulse { 50% { transform: scale(1.45); opacity: 0.6; } }
    @media (prefers-reduced-motion: reduce) { .dot { animation: none !important; } }
    .log {
      max-height: 14rem; overflow-y: auto; margin: 0; padding: 0; list-style: none;
      display: grid; gap: 0.35rem;
    }
    .log:empty { display: none; }
    .log li { line-height: 1.35; }
    .log li.user { color: var(--parley-user); }
    .log li.assistant { color: var(--parley-assistant); }
    .log li.partial { opacity: 0.65; }
    .log li .who { font-weight: 600; margin-right: 0.3rem; }
    .error { color: var(--parley-error); margin: 0; }
    .error:empty { display: none; }
  `;

  function base64FromBytes(bytes) {
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(text);
  }

  function bytesFromBase64(text) {
    const raw = atob(text);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes;
  }

  function pcm16FromFloat(samples) {
    const out = new Int16Array(samples.length);
    for (let i = 0; i < samples.length; i++) {
      const x = Math.max(-1, Math.min(1, samples[i]));
      out[i] = x < 0 ? x * 0x8000 : x * 0x7fff;
    }
    return new Uint8Array(out.buffer);
  }

  function floatFromPcm16(bytes) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const out = new Float32Array(bytes.byteLength >> 1);
    for (let i = 0; i < out.length; i++) out[i] = view.getInt16(i * 2, true) / 0x8000;
    return out;
  }

  // What a failed getUserMedia means to the person in front of the page.
  function microphoneProblem(error) {
    switch (error && error.name) {
      case "NotAllowedError":
      case "SecurityError":
        return "Microphone access was refused. Allow the microphone for this page, " +
          "then press Start again.";
      case "NotFoundError":
      case "OverconstrainedError":
        return "No microphone was found.";
      case "NotReadableError":
        return "The microphone is in use by another program.";
      default:
        return `The microphone could not be opened (${(error && error.message) || error}).`;
    }
  }

  async function opusEncoderConfig() {
    if (typeof AudioEncoder === "undefined" || typeof AudioData === "undefined") return null;
    const config = { codec: "opus", sampleRate: OPUS_RATE, numberOfChannels: 1, bitrate: 32000,
      opus: { frameDuration: CHUNK_MS * 1000, application: "voip" } };
    try {
      const support = await AudioEncoder.isConfigSupported(config);
      return support.supported ? support.config : null;
    } catch {
      return null;
    }
  }

  class ParleyVoice extends HTMLElement {
    static get observedAttributes() { return ["voice", "instructions"]; }

    constructor() {
      super();
      const root = this.attachShadow({ mode: "open" });
      root.innerHTML = `
        <style>${STYLE}</style>
        <div class="panel" part="panel">
          <div class="bar">
            <button type="button" part="button" aria-pressed="false">Start</button>
            <span class="status" part="status" role="status" aria-live="polite">
              <span class="dot" aria-hidden="true"></span><span class="label">Ready</span>
            </span>
          </div>
          <ol class="log" part="transcript" role="log" aria-live="polite"
              aria-label="Conversation"></ol>
          <p class="error" part="error" role="alert"></p>
        </div>`;
      this._button = root.querySelector("button");
      this._label = root.querySelector(".label");
      this._log = root.querySelector(".log");
      this._error = root.querySelector(".error");
      this._button.addEventListener("click", () => (this._active ? this.stop() : this.start()));
      this._lines = new Map();           // item id → transcript line
      this._state = "idle";
      this._active = false;              // between start() and stop()
      this._run = 0;                     // bumps on every start/stop: stale callbacks see it
      this.stats = this._freshStats();
    }

    connectedCallback() {
      this.setAttribute("data-state", this._state);
      this._button.setAttribute("aria-label", "Start voice conversation");
    }

    disconnectedCallback() {
      if (this._active) this.stop();
    }

    attributeChangedCallback(name, before, after) {
      // A live session takes new instructions or a new voice (the server refuses a voice
      // change once the session has spoken, and says so in the error line).
      if ((name === "instructions" || name === "voice") && before !== after
          && this._state !== "connecting" && this._socketOpen()) {
        this._sendSessionUpdate();
      }
    }

    get state() { return this._state; }

    _freshStats() {
      // turns: per answered turn, on the audio clock (s): the user's voice ended, the
      // server said so, the first answer audio arrived, its first sample played.
      return { codec: null, chunksSent: 0, bytesSent: 0, playedMs: {}, voiceToVoiceMs: [],
        turns: [], bargeInStopMs: [] };
    }

    // -- the page's API ----------------------------------------------------------------

    async start() {
      if (this._active) return;
      this._active = true;
      const run = ++this._run;
      const stale = () => run !== this._run;   // stop() (or a failure) came in between
      this._showError("");
      this.stats = this._freshStats();
      this._received = new Map();          // item → answer samples received
      this._dropped = new Set();           // items whose audio was stopped
      this._setState("connecting");
      this._button.setAttribute("aria-pressed", "true");
      this._button.textContent = "Stop";
      this._button.setAttribute("aria-label", "Stop voice conversation");
      try {
        // The context comes first, inside the click, so the browser lets it play sound.
        this._context = new AudioContext({ latencyHint: "interactive" });
        const resumed = this._context.resume();
        let stream;
        try {
          stream = await navigator.mediaDevices.getUserMedia({
            audio: { echoCancellation: true, autoGainControl: true, channelCount: 1,
              noiseSuppression: this.getAttribute("noise-suppression") !== "off" },
          });
        } catch (error) {
          throw new Error(microphoneProblem(error));
        }
        if (stale()) {
          for (const track of stream.getTracks()) track.stop();
          return;
        }
        this._stream = stream;
        await resumed;
        const [secret, opus] = await Promise.all([this._clientSecret(), this._chooseOpus()]);
        if (stale()) return;
        this._opusConfig = opus;
        await this._loadWorklets();
        if (stale()) return;
        await this._connect(secret, run);
        if (stale()) return;
        this._startPlayer();
        this._startCapture(opus);
        this._setState("listening");
      } catch (error) {
        if (!stale()) this._fail(error.message || String(error));
      }
    }

    async stop() {
      if (!this._active) return;
      this._active = false;
      const run = ++this._run;
      await this._stopPlayback("stop");
      if (this._responseActive && this._socketOpen()) this._send({ type: "response.cancel" });
      this._teardown();
      if (run === this._run) this._setState("idle");
    }

    // -- setting up ----------------------------------------------------------------------

    _serverBase() {
      const server = this.getAttribute("server") || location.origin;
      return new URL(server, location.href);
    }

    async _clientSecret() {
      const url = this.getAttribute("client-secret-url");
      if (!url) throw new Error("The widget has no client-secret-url to get a session from.");
      const session = { type: "realtime" };
      const instructions = this.getAttribute("instructions");
      const voice = this.getAttribute("voice");
      if (instructions) session.instructions = instructions;
      if (voice) session.audio = { output: { voice } };
      let response;
      try {
        response = await fetch(new URL(url, location.href), {
          method: "POST", headers: { "content-type": "application/json" },
          body: JSON.stringify({ session }), credentials: "same-origin",
        });
      } catch (error) {
        throw new Error(`Cannot reach ${url} for a session (${error.message}).`);
      }
      let body = null;
      try { body = await response.json(); } catch { /* reported below */ }
      if (!response.ok) {
        const reason = body && body.error && body.error.message;
        throw new Error(`No session from ${url}: ${response.status}${reason ? ` ${reason}` : ""}`);
      }
      const value = body && (body.value || (body.client_secret && body.client_secret.value));
      if (typeof value !== "string") throw new Error(`${url} answered without a client secret.`);
      return value;
    }

    async _chooseOpus() {
      const wanted = (this.getAttribute("codec") || "auto").toLowerCase();
      if (wanted === "pcm16") return null;
      const config = await opusEncoderConfig();
      if (!config && wanted === "opus") throw new Error("This browser cannot encode Opus.");
      return config;
    }

    async _loadWorklets() {
      const url = URL.createObjectURL(new Blob([WORKLETS], { type: "text/javascript" }));
      try {
        await this._context.audioWorklet.addModule(url);
      } finally {
        URL.revokeObjectURL(url);
      }
    }

    _connect(secret, run) {
      const base = this._serverBase();
      const ws = new URL("/v1/realtime", base);
      ws.protocol = base.protocol === "https:" ? "wss:" : "ws:";
      return new Promise((resolve, reject) => {
        let socket;
        try {
          socket = new WebSocket(ws, ["realtime", `openai-insecure-api-key.${secret}`]);
        } catch (error) {
          reject(new Error(`Cannot open ${ws}: ${error.message}`));
          return;
        }
        this._socket = socket;
        let opened = false;
        socket.onopen = () => { opened = true; };
        socket.onmessage = (message) => {
          if (run !== this._run) return;
          let event;
          try { event = JSON.parse(message.data); } catch { return; }
          if (event.type === "session.created") {
            this._sendSessionUpdate();
            resolve();
          }
          this._onServerEvent(event);
        };
        socket.onclose = (close) => {
          // Settles the promise only while it is pending: before session.created.
          reject(new Error(`Cannot reach the Parley server at ${base.origin}.`));
          if (run !== this._run) return;
          if (opened && this._active) {
            const reason = close.reason ? `: ${close.reason}` : "";
            this._fail(`The connection to the server closed (${close.code}${reason}).`);
          }
        };
      });
    }

    _sendSessionUpdate() {
      const input = { transcription: { model: "gpt-4o-mini-transcribe" } };
      input.format = this._opusConfig ? { type: "audio/opus" }
        : { type: "audio/pcm", rate: PCM_RATE };
      const session = { type: "realtime", audio: { input,
        output: { format: { type: "audio/pcm", rate: PCM_RATE } } } };
      const voice = this.getAttribute("voice");
      if (voice) session.audio.output.voice = voice;
      const instructions = this.getAttribute("instructions");
      if (instructions) session.instructions = instructions;
      this._send({ type: "session.update", session });
    }

    _startPlayer() {
      this._player = new AudioWorkletNode(this._context, "parley-player", {
        numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
        processorOptions: { inputRate: PCM_RATE, prebufferMs: PREBUFFER_MS },
      });
      this._player.port.onmessage = (message) => this._onPlayer(message.data);
      this._player.connect(this._context.destination);
    }

    _startCapture(opusConfig) {
      const rate = opusConfig ? OPUS_RATE : PCM_RATE;
      this.stats.codec = opusConfig ? "opus" : "pcm16";
      this._source = this._context.createMediaStreamSource(this._stream);
      this._capture = new AudioWorkletNode(this._context, "parley-capture", {
        numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
        processorOptions: { outputRate: rate, chunkSamples: rate * CHUNK_MS / 1000,
          loudLevel: 0.01 },
      });
      // A node whose output reaches the destination is always rendered; the zero gain
      // keeps the microphone out of the speakers.
      this._mute = new GainNode(this._context, { gain: 0 });
      this._source.connect(this._capture).connect(this._mute).connect(this._context.destination);
      if (opusConfig) {
        let timestamp = 0;
        this._encoder = new AudioEncoder({
          output: (chunk) => {
            const packet = new Uint8Array(chunk.byteLength);
            chunk.copyTo(packet);
            this._append(packet);
          },
          error: (error) => this._fail(`The Opus encoder failed: ${error.message}`),
        });
        this._encoder.configure(opusConfig);
        this._encode = (samples) => {
          const data = new AudioData({ format: "f32", sampleRate: OPUS_RATE, numberOfChannels: 1,
            numberOfFrames: samples.length, timestamp, data: samples });
          timestamp += samples.length * 1e6 / OPUS_RATE;
          this._encoder.encode(data);
          data.close();
        };
      } else {
        this._encode = (samples) => this._append(pcm16FromFloat(samples));
      }
      this._capture.port.onmessage = (message) => this._onCapture(message.data);
    }

    // -- the conversation ----------------------------------------------------------------

    _onCapture(message) {
      if (message.type !== "chunk" || !this._socketOpen()) return;
      this._lastLoud = message.lastLoud;
      if (message.onset !== null) this._lastOnset = message.onset;
      this._encode(message.samples);
    }

    _append(bytes) {
      if (!this._socketOpen()) return;
      this.stats.chunksSent += 1;
      this.stats.bytesSent += bytes.length;
      this._send({ type: "input_audio_buffer.append", audio: base64FromBytes(bytes) });
    }

    _onServerEvent(event) {
      switch (event.type) {
        case "input_audio_buffer.speech_started":
          this._userSpeaking = true;
          this._silencedAt = null;
          this._speechOnset = this._lastOnset;   // later pauses in this speech move _lastOnset
          if (this._playingItem && this._responseActive) {
            // Silence at once, and let the server decide: a barge-in cancels the response
            // (response.done "cancelled"), an "uh-huh" ends with the answer going on.
            this._player.port.postMessage({ type: "pause" });
          } else if (this._playingItem) {
            // The server has sent the whole answer, so this speech is the next turn: what
            // is still queued will never be wanted.
            this._stopPlayback("barge-in");
          }
          this._setState("user-speaking");
          break;
        case "input_audio_buffer.speech_stopped":
          this._userSpeaking = false;
          this._turnEnd = this._lastLoud;
          this._turn = { voiceEnded: this._lastLoud, speechStopped: this._context.currentTime };
          if (this._playingItem) {
            this._silencedAt = null;
            this._player.port.postMessage({ type: "resume" });
            this._setState("speaking");
          } else {
            this._setState("thinking");
          }
          break;
        case "conversation.item.input_audio_transcription.delta":
          this._userLine(event.item_id, event.delta, false);
          break;
        case "conversation.item.input_audio_transcription.completed":
          this._userLine(event.item_id, event.transcript, true, true);
          if (!event.transcript && !this._responseActive && !this._userSpeaking) {
            this._setState("listening");   // nothing was said: no answer comes
          }
          break;
        case "response.created":
          this._responseActive = true;
          if (!this._userSpeaking) this._setState("thinking");
          break;
        case "response.output_audio.delta": {
          if (this._dropped.has(event.item_id)) break;   // sent before the cancel reached it
          const samples = floatFromPcm16(bytesFromBase64(event.delta));
          this._received.set(event.item_id, (this._received.get(event.item_id) || 0)
            + samples.length);
          if (this._turn && this._turn.firstAudio == null) {
            this._turn.firstAudio = this._context.currentTime;
          }
          this._playingItem = event.item_id;
          if (this._userSpeaking) this._player.port.postMessage({ type: "pause" });
          this._player.port.postMessage({ type: "audio", item: event.item_id, samples },
            [samples.buffer]);
          break;
        }
        case "response.output_audio_transcript.delta":
          this._assistantLine(event.item_id, event.delta, false);
          break;
        case "response.output_audio_transcript.done":
        case "response.output_text.done":
          this._assistantLine(event.item_id, event.transcript ?? event.text, true, true);
          break;
        case "response.output_text.delta":
          this._assistantLine(event.item_id, event.delta, false);
          break;
        case "response.done":
          this._responseActive = false;
          if (event.response && event.response.status === "cancelled") {
            this._stopPlayback("barge-in");
          } else if (this._playingItem) {
            this._player.port.postMessage({ type: "end" });
          } else if (!this._userSpeaking) {
            this._setState("listening");
          }
          break;
        case "conversation.item.truncated":
          // What the item keeps is what was heard; show that, not what was generated.
          this._send({ type: "conversation.item.retrieve", item_id: event.item_id });
          break;
        case "conversation.item.retrieved": {
          const content = (event.item && event.item.content) || [];
          const part = content.find((c) => typeof c.transcript === "string");
          if (part && this._lines.has(event.item.id)) {
            this._assistantLine(event.item.id, part.transcript, true, true, true);
          }
          break;
        }
        case "error":
          this._reportError((event.error && event.error.message)
            || "The server reported an error.");
          break;
      }
    }

    _onPlayer(message) {
      switch (message.type) {
        case "started":
          if (this._turnEnd != null) {
            const heardAt = message.time + (this._context.outputLatency || 0);
            const latency = (heardAt - this._turnEnd) * 1000;
            this.stats.voiceToVoiceMs.push(Math.round(latency));
            if (this._turn) {
              this.stats.turns.push({ ...this._turn, played: message.time,
                outputLatency: this._context.outputLatency || 0 });
              this._turn = null;
            }
            this._emit("parley-timing", { name: "voice-to-voice", ms: Math.round(latency) });
            this._turnEnd = null;
          }
          if (!this._userSpeaking) this._setState("speaking");
          break;
        case "progress":
          this._notePlayed(message.played);
          break;
        case "paused":
          this._notePlayed(message.played);
          if (this._silencedAt == null) this._silencedAt = message.time;
          break;
        case "drained":
          this._playingItem = null;
          if (!this._userSpeaking && !this._responseActive) this._setState("listening");
          break;
        case "flushed":
          this._notePlayed(message.played);
          if (this._silencedAt == null) this._silencedAt = message.time;
          if (this._flushed) this._flushed(message);
          break;
      }
    }

    _notePlayed(counts) {
      for (const [item, samples] of Object.entries(counts)) {
        this.stats.playedMs[item] = Math.floor(samples * 1000 / PCM_RATE);
      }
    }

    // Drops the answer's queued audio and tells the server how much of it was heard.
    async _stopPlayback(why) {
      const item = this._playingItem;
      if (!item || !this._player) return;
      this._playingItem = null;
      this._dropped.add(item);
      const flushed = await new Promise((resolve) => {
        this._flushed = resolve;
        this._player.port.postMessage({ type: "flush" });
        setTimeout(() => resolve(null), FLUSH_WAIT_MS);
      });
      this._flushed = null;
      if (why === "barge-in" && this._silencedAt != null && this._speechOnset != null) {
        // From the moment the microphone heard the user begin to the last sound played.
        const ms = Math.round((this._silencedAt - this._speechOnset) * 1000);
        this.stats.bargeInStopMs.push(ms);
        this._emit("parley-timing", { name: "barge-in", ms });
      }
      this._silencedAt = null;
      const played = flushed ? Math.floor((flushed.played[item] || 0) * 1000 / PCM_RATE)
        : this.stats.playedMs[item] || 0;
      const received = Math.floor((this._received.get(item) || 0) * 1000 / PCM_RATE);
      if (played < received && this._socketOpen()) {
        this._send({ type: "conversation.item.truncate", item_id: item, content_index: 0,
          audio_end_ms: played });
      }
      if (!this._userSpeaking && this._active) this._setState("listening");
    }

    // -- the page ------------------------------------------------------------------------

    _line(item, role) {
      let line = this._lines.get(item);
      if (!line) {
        line = document.createElement("li");
        line.className = `${role} partial`;
        const who = document.createElement("span");
        who.className = "who";
        who.textContent = role === "user" ? "You:" : "Assistant:";
        line.append(who, document.createElement("span"));
        line.dataset.text = "";
        this._log.append(line);
        this._lines.set(item, line);
      }
      return line;
    }

    _writeLine(line, text, final) {
      line.dataset.text = text;
      line.lastChild.textContent = text;
      line.classList.toggle("partial", !final);
      this._log.scrollTop = this._log.scrollHeight;
    }

    _userLine(item, text, final, whole = false) {
      const line = this._line(item, "user");
      const full = whole ? (text || "") : line.dataset.text + (text || "");
      this._writeLine(line, full, final);
      this._emit("parley-user-transcript", { text: full, final, itemId: item });
    }

    _assistantLine(item, text, final, whole = false, truncated = false) {
      const line = this._line(item, "assistant");
      const full = whole ? (text || "") : line.dataset.text + (text || "");
      this._writeLine(line, full, final);
      this._emit("parley-assistant-transcript", { text: full, final, itemId: item, truncated });
    }

    _setState(state) {
      if (!STATES.includes(state) || state === this._state) return;
      this._state = state;
      this.setAttribute("data-state", state);
      this._label.textContent = LABELS[state];
      this._emit("parley-state", { state });
    }

    _showError(message) {
      this._error.textContent = message;
    }

    _reportError(message) {
      this._showError(message);
      this._emit("parley-error", { message });
    }

    _fail(message) {
      this._active = false;
      this._run += 1;
      this._teardown();
      this._reportError(message);
      this._setState("error");
    }

    _emit(name, detail) {
      this.dispatchEvent(new CustomEvent(name, { detail, bubbles: true, composed: true }));
    }

    _send(event) {
      if (this._socketOpen()) this._socket.send(JSON.stringify(event));
    }

    _socketOpen() {
      return this._socket && this._socket.readyState === WebSocket.OPEN;
    }

    _teardown() {
      if (this._capture) this._capture.port.postMessage({ type: "stop" });
      for (const node of [this._source, this._capture, this._mute, this._player]) {
        if (node) node.disconnect();
      }
      if (this._encoder && this._encoder.state !== "closed") this._encoder.close();
      if (this._stream) for (const track of this._stream.getTracks()) track.stop();
      if (this._socket && this._socket.readyState <= WebSocket.OPEN) this._socket.close(1000);
      if (this._context && this._context.state !== "closed") this._context.close();
      this._source = this._capture = this._mute = this._player = this._encoder = null;
      this._stream = this._socket = this._context = null;
      this._playingItem = null;
      this._responseActive = this._userSpeaking = false;
      this._turnEnd = this._turn = this._lastOnset = this._speechOnset = this._silencedAt = null;
      this._button.setAttribute("aria-pressed", "false");
      this._button.textContent = "Start";
      this._button.setAttribute("aria-label", "Start voice conversation");
    }
  }

  customElements.define("parley-voice", ParleyVoice);
})();
