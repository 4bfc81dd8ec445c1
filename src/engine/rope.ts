// YaRN rotary frequencies, following DeepSeek-V3 inference/model.py precompute_freqs_cis.
import type { RopeConfig } from "./backend.ts";

/** Rotation frequency of each of the ropeDim/2 pairs (radians per position). */
export function ropeFrequencies(cfg: RopeConfig): Float64Array {
  const half = cfg.ropeDim / 2;
  const freqs = new Float64Array(half);
  for (let i = 0; i < half; i++) freqs[i] = 1 / cfg.theta ** ((2 * i) / cfg.ropeDim);
  if (cfg.factor <= 1) return freqs;
  const correctionDim = (rotations: number) =>
    (cfg.ropeDim * Math.log(cfg.originalMaxPosition / (rotations * 2 * Math.PI))) /
    (2 * Math.log(cfg.theta));
  const low = Math.max(Math.floor(correctionDim(cfg.betaFast)), 0);
  let high = Math.min(Math.ceil(correctionDim(cfg.betaSlow)), cfg.ropeDim - 1);
  if (low === high) high += 0.001;
  for (let i = 0; i < half; i++) {
    const ramp = Math.min(Math.max((i - low) / (high - low), 0), 1);
    const smooth = 1 - ramp;
    freqs[i] = (freqs[i]! / cfg.factor) * (1 - smooth) + freqs[i]! * smooth;
  }
  return freqs;
}
