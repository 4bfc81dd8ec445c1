// The sampling suite: what picking the next token costs the gateway per step at DeepSeek's
// vocabulary (129,280), ours (the native sampler, one call for a step's rows on its
// threads, as ServingEngine does) against PyTorch running vLLM's sampler (see
// bench/torch_worker.py: sort-based top-p, topk for top-k alone, exponential-race pick)
// with the same thread count, the two alternating in the same run; and the logprobs of a
// token with its 5 most likely alternatives (native, against log_softmax + gather + topk).
// Every sampled token is checked to be one the settings keep.
//
// Logits: per row, Gaussian-like noise (std 1) over the vocabulary plus 16 tokens raised by
// 12-15, so that at temperature 0.7 a handful of tokens hold most of the mass, as in a
// language model's next-token distribution (the table gives the top-p 0.9 nucleus size).
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadAddon, nativeBackend } from "../src/engine/native.ts";
import { type SampleRows, uniform32 } from "../src/engine/sampling.ts";
import { Prng } from "../src/model/prng.ts";
import {
  goldenPython,
  LineClient,
  medianRange,
  peerEnv,
  REPO_ROOT,
  type Stats,
  stats,
} from "./lib.ts";

export const VOCAB = 129_280;

export interface Setting {
  name: string;
  temperature: number;
  topK: number;
  topP: number;
  /** vLLM's min_p (0: off). */
  minP?: number;
  /** Logprobs with this many alternatives instead of sampling. */
  logprobs?: number;
}

const SETTINGS: Setting[] = [
  { name: "greedy", temperature: 0, topK: 0, topP: 1 },
  { name: "temperature 0.7", temperature: 0.7, topK: 0, topP: 1 },
  { name: "top_k 50", temperature: 0.7, topK: 50, topP: 1 },
  { name: "top_p 0.9", temperature: 0.7, topK: 0, topP: 0.9 },
  { name: "top_k 50 + top_p 0.9", temperature: 0.7, topK: 50, topP: 0.9 },
  { name: "min_p 0.05", temperature: 0.7, topK: 0, topP: 1, minP: 0.05 },
  { name: "min_p 0.05 + top_p 0.9", temperature: 0.7, topK: 0, topP: 0.9, minP: 0.05 },
  // Not a pick: the logprobs of a token and the 5 most likely (completions' maximum); the
  // check takes the most likely one, the argmax.
  { name: "logprobs, top 5", temperature: 0, topK: 0, topP: 1, logprobs: 5 },
];
const ROWS = [1, 8, 32];
const QUICK_ROWS = [8];

export interface SamplingRow {
  setting: Setting;
  rows: number;
  /** Median over rows of the top-p 0.9 nucleus at temperature 0.7 (tokens). */
  nucleus: number;
  /** Milliseconds per call (all rows). */
  oursMs: Stats;
  torchMs: Stats;
}

export interface SamplingResults {
  runs: number;
  threads: number;
  vocab: number;
  torch: string;
  rows: SamplingRow[];
}

/** Logits [rows, VOCAB] as described at the top. */
function makeLogits(rows: number, seed: number): Float32Array {
  const rng = new Prng(seed);
  const x = new Float32Array(rows * VOCAB);
  for (let r = 0; r < rows; r++) {
    const row = x.subarray(r * VOCAB, (r + 1) * VOCAB);
    for (let i = 0; i < VOCAB; i++)
      row[i] = (rng.uniform() + rng.uniform() + rng.uniform() - 1.5) * 2;
    for (let j = 0; j < 16; j++) row[Math.floor(rng.uniform() * VOCAB)]! += 12 + 3 * rng.uniform();
  }
  return x;
}

/** The ids the setting keeps in `row` (sorted by logit; all when nothing cuts). */
function kept(row: Float32Array, s: Setting): Set<number> | null {
  if (s.temperature <= 0) {
    let best = 0;
    for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
    return new Set([best]);
  }
  if (s.topK <= 0 && s.topP >= 1 && !s.minP) return null;
  let ids = Array.from({ length: row.length }, (_, i) => i).sort(
    (a, b) => row[b]! - row[a]! || a - b,
  );
  if (s.minP) {
    // Rounding on either side may keep one more.
    const top = row[ids[0]!]! / s.temperature;
    const n = ids.filter((i) => Math.exp(row[i]! / s.temperature - top) >= s.minP!).length;
    ids = ids.slice(0, n + 1);
  }
  if (s.topK > 0) ids = ids.slice(0, s.topK);
  // Rounding on either side may keep one more.
  if (s.topP < 1) ids = ids.slice(0, nucleus(row, ids, s.temperature, s.topP) + 1);
  return new Set(ids);
}

/** How many of `ids` (most likely first) the top-p cut keeps. */
function nucleus(row: Float32Array, ids: readonly number[], temperature: number, topP: number) {
  const max = row[ids[0]!]! / temperature;
  const w = ids.map((i) => Math.exp(row[i]! / temperature - max));
  const total = w.reduce((a, b) => a + b, 0);
  let cum = 0;
  let n = 0;
  while (n < ids.length && cum < topP * total) cum += w[n++]!;
  return n;
}

function checkTokens(side: string, s: Setting, logits: Float32Array, tokens: ArrayLike<number>) {
  for (let r = 0; r < tokens.length; r++) {
    const keep = kept(logits.subarray(r * VOCAB, (r + 1) * VOCAB), s);
    const t = tokens[r]!;
    if (!(t >= 0 && t < VOCAB) || (keep && !keep.has(t)))
      throw new Error(`${side} sampled token ${t} in row ${r} under ${s.name}: not a kept token`);
  }
}

function nucleusSize(logits: Float32Array, rows: number): number {
  const sizes: number[] = [];
  for (let r = 0; r < rows; r++) {
    const row = logits.subarray(r * VOCAB, (r + 1) * VOCAB);
    const ids = Array.from({ length: VOCAB }, (_, i) => i).sort((a, b) => row[b]! - row[a]!);
    sizes.push(nucleus(row, ids, 0.7, 0.9));
  }
  return stats(sizes).median;
}

export async function runSampling(o: {
  threads: number;
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<SamplingResults> {
  loadAddon().configure({ threads: o.threads });
  const backend = nativeBackend();
  const py = goldenPython(o.log);
  const worker = new LineClient(
    "torch worker",
    py,
    [join(REPO_ROOT, "bench", "torch_worker.py"), String(o.threads)],
    peerEnv(),
  );
  const dir = mkdtempSync(join(tmpdir(), "em-bench-sample-"));
  const rows: SamplingRow[] = [];
  try {
    const hello = await worker.call<{ torch: string }>({ cmd: "hello" });
    for (const n of o.quick ? QUICK_ROWS : ROWS) {
      const logits = makeLogits(n, n);
      const file = join(dir, `logits-${n}.f32`);
      writeFileSync(file, logits);
      const nucleus = nucleusSize(logits, n);
      for (const s of SETTINGS) {
        const key = `${s.name}/${n}`;
        await worker.call({
          cmd: "setup",
          key,
          op: "sample",
          file,
          rows: n,
          vocab: VOCAB,
          temperature: s.temperature,
          top_k: s.topK,
          top_p: s.topP,
          min_p: s.minP ?? 0,
          ...(s.logprobs !== undefined ? { logprobs: s.logprobs } : {}),
        });
        const rng = new Prng(7);
        const sampleRows = (): SampleRows => ({
          temperature: new Float32Array(n).fill(s.temperature),
          topK: new Int32Array(n).fill(s.topK),
          topP: new Float32Array(n).fill(s.topP),
          minP: new Float32Array(n).fill(s.minP ?? 0),
          uniform: Float32Array.from({ length: n }, () => uniform32(rng.uniform())),
        });
        const ours = (calls: number) => {
          const inputs = Array.from({ length: calls }, sampleRows);
          const t0 = performance.now();
          let out: ArrayLike<number> = [];
          const zeros = new Int32Array(n);
          for (const r of inputs) {
            if (s.logprobs === undefined) out = backend.sample(logits, VOCAB, r);
            else {
              const k = s.logprobs;
              const lp = backend.logprobs(logits, VOCAB, zeros, k);
              out = Array.from({ length: n }, (_, row) => lp.topIds[row * k]!);
            }
          }
          return { ms: performance.now() - t0, tokens: out };
        };
        const theirs = async (calls: number) => {
          const r = await worker.call<{ seconds: number; tokens: number[] }>({
            cmd: "run",
            key,
            calls,
          });
          return { ms: r.seconds * 1000, tokens: r.tokens };
        };
        // Calls per timing so each takes about 50 ms (from one call of each, warm).
        const one = { ours: ours(1), torch: await theirs(1) };
        checkTokens("ours", s, logits, one.ours.tokens);
        checkTokens("torch", s, logits, one.torch.tokens);
        const calls = {
          ours: Math.max(1, Math.ceil(50 / Math.max(one.ours.ms, 0.01))),
          torch: Math.max(1, Math.ceil(50 / Math.max(one.torch.ms, 0.01))),
        };
        const ms = { ours: [] as number[], torch: [] as number[] };
        for (let run = -1; run < o.runs; run++) {
          const a = ours(calls.ours);
          const b = await theirs(calls.torch);
          checkTokens("ours", s, logits, a.tokens);
          checkTokens("torch", s, logits, b.tokens);
          if (run < 0) continue;
          ms.ours.push(a.ms / calls.ours);
          ms.torch.push(b.ms / calls.torch);
        }
        await worker.call({ cmd: "free", key });
        const row = {
          setting: s,
          rows: n,
          nucleus,
          oursMs: stats(ms.ours),
          torchMs: stats(ms.torch),
        };
        o.log(
          `[bench] sampling ${s.name}, ${n} rows: ours ${row.oursMs.median.toFixed(3)} ms, ` +
            `torch ${row.torchMs.median.toFixed(3)} ms (${(row.oursMs.median / row.torchMs.median).toFixed(3)}x)`,
        );
        rows.push(row);
      }
    }
    return { runs: o.runs, threads: o.threads, vocab: VOCAB, torch: hello.torch, rows };
  } finally {
    await worker.close(JSON.stringify({ cmd: "quit" }));
    rmSync(dir, { recursive: true, force: true });
  }
}

const ms = (s: Stats) => medianRange(s, 3);

/** The suite's table for BENCHMARKS.md. */
export function samplingTables(
  r: SamplingResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const rows = r.rows
    .map(
      (x) =>
        `| ${x.setting.name} | ${x.rows} | ${ms(x.oursMs)} | ${ms(x.torchMs)} | ${(x.oursMs.median / x.torchMs.median).toFixed(3)}x |`,
    )
    .join("\n");
  const nuclei = [...new Set(r.rows.map((x) => `${x.rows} rows: ${x.nucleus}`))].join(", ");
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.threads} threads each side, vocabulary ${r.vocab}, PyTorch ${r.torch}; ${r.runs} counted runs per side after a warm-up, sides alternating; from \`${source}\`. Milliseconds per call (all rows of the step), medians (min-max). Temperature 0.7 unless greedy; median top-p 0.9 nucleus (tokens): ${nuclei}.

| settings | rows | ours (native sampler) | PyTorch (vLLM's sampler) | ours / PyTorch |
|---|---:|---:|---:|---:|
${rows}`;
}
