// A small seeded PRNG for deterministic random checkpoints: xoshiro128** (Blackman & Vigna)
// seeded through splitmix32, normal samples by Box-Muller. Integer steps are exact 32-bit
// arithmetic and Math.log/sqrt/cos/sin are V8's fdlibm ports, so a seed gives the same
// numbers on every machine.

/** One step of splitmix32 on `state`; returns [next state, output word]. */
function splitmix32(state: number): [number, number] {
  const next = (state + 0x9e3779b9) | 0;
  let z = next;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return [next, (z ^ (z >>> 16)) >>> 0];
}

/** 32-bit FNV-1a of a string's UTF-16 code units (used to derive per-tensor seeds). */
export function fnv1a32(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h = Math.imul(h ^ text.charCodeAt(i), 0x01000193);
  }
  return h >>> 0;
}

/** xoshiro128**: 128-bit state, 32-bit outputs, period 2^128 - 1. */
export class Prng {
  /** The state words; a typed array keeps them unboxed int32 (fast in V8). */
  private readonly s = new Int32Array(4);
  /** Whether `spare` holds the second Box-Muller sample for the next `normal()` call. */
  private hasSpare = false;
  private spare = 0;

  /**
   * A generator for `seed` (any integer; taken modulo 2^32) and an optional `stream` name:
   * different names give independent sequences from the same seed.
   */
  constructor(seed: number, stream = "") {
    let st = (seed >>> 0) ^ fnv1a32(stream);
    for (let i = 0; i < 4; i++) {
      const [next, out] = splitmix32(st);
      st = next;
      this.s[i] = out;
    }
    // The all-zero state is the one state xoshiro cannot leave.
    if ((this.s[0]! | this.s[1]! | this.s[2]! | this.s[3]!) === 0) this.s[0] = 1;
  }

  /** A generator started from raw state words (not all zero), as the reference code seeds it. */
  static fromState(state: readonly [number, number, number, number]): Prng {
    const p = new Prng(0);
    p.s.set(state.map((w) => w | 0));
    return p;
  }

  /** An independent generator in this one's state: it gives the numbers this one would. */
  clone(): Prng {
    const p = new Prng(0);
    p.s.set(this.s);
    p.hasSpare = this.hasSpare;
    p.spare = this.spare;
    return p;
  }

  /** The next 32-bit output as an unsigned integer in [0, 2^32). */
  nextU32(): number {
    const s = this.s;
    const result = Math.imul(rotl(Math.imul(s[1]!, 5), 7), 9) >>> 0;
    const t = s[1]! << 9;
    s[2]! ^= s[0]!;
    s[3]! ^= s[1]!;
    s[1]! ^= s[2]!;
    s[0]! ^= s[3]!;
    s[2]! ^= t;
    s[3] = rotl(s[3]!, 11);
    return result;
  }

  /** A uniform sample in the open interval (0, 1). */
  uniform(): number {
    return (this.nextU32() + 0.5) / 4294967296;
  }

  /** A standard normal sample (mean 0, standard deviation 1), by Box-Muller. */
  normal(): number {
    if (this.hasSpare) {
      this.hasSpare = false;
      return this.spare;
    }
    const r = Math.sqrt(-2 * Math.log(this.uniform()));
    const theta = 2 * Math.PI * this.uniform();
    this.spare = r * Math.sin(theta);
    this.hasSpare = true;
    return r * Math.cos(theta);
  }

  /**
   * Fills `out` with `mean + std * normal()` samples and returns it; the same numbers as
   * calling `normal()` once per element, generated a pair at a time.
   */
  fillNormal(out: Float32Array, std = 1, mean = 0): Float32Array {
    let i = 0;
    if (this.hasSpare && out.length > 0) out[i++] = mean + std * this.normal();
    for (; i + 1 < out.length; i += 2) {
      const r = Math.sqrt(-2 * Math.log(this.uniform()));
      const theta = 2 * Math.PI * this.uniform();
      out[i] = mean + std * (r * Math.cos(theta));
      out[i + 1] = mean + std * (r * Math.sin(theta));
    }
    if (i < out.length) out[i] = mean + std * this.normal();
    return out;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
