// Audible cues with the Web Audio API, after the user turned sound on (browsers need a gesture).
// Patterns follow the spirit of IEC 60601-1-8 bursts: high = 5 quick tones twice,
// medium = 3 tones, low = 1 tone.
import type { Priority } from './types';

let ctx: AudioContext | null = null;

export function enableAudio(): Promise<void> {
  if (!ctx) ctx = new AudioContext();
  return ctx.resume();
}

export function disableAudio(): void {
  void ctx?.suspend();
}

function tone(at: number, freq: number, dur: number, gain = 0.18) {
  if (!ctx) return;
  const osc = ctx.createOscillator();
  const g = ctx.createGain();
  osc.type = 'triangle';
  osc.frequency.value = freq;
  // Short attack and release so tones do not click.
  g.gain.setValueAtTime(0, at);
  g.gain.linearRampToValueAtTime(gain, at + 0.015);
  g.gain.setValueAtTime(gain, at + dur - 0.03);
  g.gain.linearRampToValueAtTime(0, at + dur);
  osc.connect(g).connect(ctx.destination);
  osc.start(at);
  osc.stop(at + dur + 0.01);
}

export function cue(priority: Priority): void {
  if (!ctx || ctx.state !== 'running') return;
  const t0 = ctx.currentTime + 0.05;
  if (priority === 'high') {
    // Two bursts of five quick tones (C5 A5 F5 A6 F6 style melody), 0.5 s apart.
    const f = [523, 880, 698, 1760, 1397];
    for (let b = 0; b < 2; b++) {
      const start = t0 + b * 1.35;
      f.forEach((hz, i) => tone(start + i * 0.17, hz, 0.12));
    }
  } else if (priority === 'medium') {
    [523, 659, 784].forEach((hz, i) => tone(t0 + i * 0.25, hz, 0.18, 0.14));
  } else {
    tone(t0, 523, 0.25, 0.1);
  }
}
