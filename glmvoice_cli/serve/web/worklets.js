// Audio worklets of the glmvoice page: the microphone tap and the answer's player. They run on the audio
// thread; each talks to the page by messages only.

const WIRE_RATE = 24000;

// The microphone: 100 ms blocks at 24 kHz (resampled from the context's rate), and the block's level.
class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / WIRE_RATE; // input samples per output sample
    this.phase = 0; // position of the next output sample, in input samples from the start of `last`
    this.last = 0; // the previous block's final sample (interpolation across blocks)
    this.out = new Float32Array(WIRE_RATE / 10);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    // linear interpolation; the browser's capture path has already band-limited the voice
    while (this.phase < input.length) {
      const i = Math.floor(this.phase);
      const frac = this.phase - i;
      const a = i === 0 ? this.last : input[i - 1];
      const b = input[i];
      this.out[this.filled++] = a + (b - a) * frac;
      this.phase += this.step;
      if (this.filled === this.out.length) {
        let sum = 0;
        for (const x of this.out) sum += x * x;
        this.port.postMessage({ samples: this.out, level: Math.sqrt(sum / this.out.length) }, [this.out.buffer]);
        this.out = new Float32Array(WIRE_RATE / 10);
        this.filled = 0;
      }
    }
    this.phase -= input.length;
    this.last = input[input.length - 1];
    return true;
  }
}

// The player: a queue of 24 kHz blocks, resampled to the context's rate; silence when it runs dry.
// It reports, per answer, the wire samples actually played, and when the first one was.
class Player extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = []; // {samples, item}
    this.offset = 0; // wire samples of queue[0] already played (fractional)
    this.step = WIRE_RATE / sampleRate; // wire samples per output sample
    this.played = {}; // item -> wire samples played
    this.reported = 0;
    this.port.onmessage = (e) => {
      const m = e.data;
      if (m.type === "audio") this.queue.push({ samples: m.samples, item: m.item });
      else if (m.type === "clear") {
        this.queue = [];
        this.offset = 0;
        this.port.postMessage({ type: "cleared", played: this.played });
      }
    };
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let playing = null;
    for (let j = 0; j < out.length; j++) {
      const head = this.queue[0];
      if (!head) {
        out[j] = 0;
        continue;
      }
      const i = Math.floor(this.offset);
      const next = i + 1 < head.samples.length ? head.samples[i + 1] : head.samples[i];
      out[j] = head.samples[i] + (next - head.samples[i]) * (this.offset - i);
      if (!(head.item in this.played)) {
        this.played[head.item] = 0;
        this.port.postMessage({ type: "started", item: head.item, time: currentTime });
      }
      playing = head.item;
      const before = Math.floor(this.offset);
      this.offset += this.step;
      this.played[head.item] += Math.floor(this.offset) - before;
      if (this.offset >= head.samples.length) {
        this.offset -= head.samples.length;
        this.queue.shift();
      }
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (currentFrame - this.reported >= sampleRate / 20 || (playing === null && this.reported >= 0)) {
      this.reported = playing === null ? -1 : currentFrame;
      this.port.postMessage({ type: "progress", played: this.played, playing });
    }
    return true;
  }
}

registerProcessor("glmvoice-capture", Capture);
registerProcessor("glmvoice-player", Player);
