// The invariant suite: what `--batch-invariant` (ADR 0027) costs on this machine's CPU backend,
// against the peer that sets the bar: the default kernels, measured in the same process and
// the same rounds, the two alternating (AB, then BA).
//
// - The mini V3 model, `generate`'s engine at batch 1 (every expert in process): prefill of a
//   512- and a 2048-token prompt (the invariant backend keeps MLA absorbed where the default
//   takes the multi-head form from 86 query tokens), then 32 tokens decoded greedily.
// - One V3-shaped GEMM (x [M, 7168] times a [2048, 7168] weight, bf16 and fp8) through the
//   addon at M = 1, 4, 32 and 256 rows: the invariant kernel sums k in panels of 2048 for
//   every row count (the default streams whole rows under 16 rows), and fp8 keeps its dot
//   kernel where the default packs weights from 16 rows.
import type { Weight } from "../src/engine/backend.ts";
import { LocalExperts } from "../src/engine/experts.ts";
import { generate } from "../src/engine/generate.ts";
import { heldExperts, loadWeights } from "../src/engine/loader.ts";
import { DeepSeekForward } from "../src/engine/model.ts";
import { convertWeight, loadAddon, nativeBackend } from "../src/engine/native.ts";
import { Checkpoint } from "../src/model/checkpoint.ts";
import { medianRange, type Stats, stats } from "./lib.ts";
import { ensureMiniModel } from "./serve.ts";

const MODES = ["default", "invariant"] as const;
type Mode = (typeof MODES)[number];
const PROMPTS = [512, 2048] as const;
const NEW_TOKENS = 32;
const GEMM_ROWS = [1, 4, 32, 256] as const;
const GEMM_DTYPES = ["bf16", "fp8"] as const;
const N = 2048;
const K = 7168;

export interface InvariantModelRow {
  promptTokens: number;
  mode: Mode;
  prefillTps: Stats;
  decodeTps: Stats;
  /** Per round, invariant / default (1 for the default rows). */
  prefillRatio: Stats;
  decodeRatio: Stats;
}

export interface InvariantGemmRow {
  dtype: (typeof GEMM_DTYPES)[number];
  rows: number;
  mode: Mode;
  /** Microseconds per call, the median of each round's calls. */
  us: Stats;
  /** Per round, invariant time / default time (1 for the default rows). */
  ratio: Stats;
}

export interface InvariantResults {
  runs: number;
  threads: number;
  model: string;
  modelRows: InvariantModelRow[];
  gemmRows: InvariantGemmRow[];
}

const orderOf = (round: number): readonly Mode[] =>
  round % 2 === 0 ? MODES : [...MODES].reverse();

function configure(mode: Mode, threads: number): void {
  loadAddon().configure({
    batchInvariant: mode === "invariant",
    ...(threads > 0 ? { threads } : {}),
  });
}

export async function runInvariant(o: {
  threads: number;
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<InvariantResults> {
  const runs = o.quick ? 1 : o.runs;
  const dir = await ensureMiniModel(o.log);
  const backend = nativeBackend();
  const weights = await loadWeights(await Checkpoint.open(dir), "all");
  const model = new DeepSeekForward(
    weights,
    backend,
    new LocalExperts(backend, heldExperts(weights)),
  );
  const prompts = o.quick ? [PROMPTS[0]] : PROMPTS;

  // "prompt/mode" -> per-round figures
  const key = (p: number, m: Mode) => `${p}/${m}`;
  const perRound = () =>
    new Map(prompts.flatMap((p) => MODES.map((m): [string, number[]] => [key(p, m), []])));
  const prefill = perRound();
  const decode = perRound();
  for (let round = 0; round < runs; round++) {
    for (const p of prompts) {
      const prompt = Array.from({ length: p }, (_, i) => (i * 37 + 11) % 300);
      for (const mode of orderOf(round)) {
        configure(mode, o.threads);
        const r = await generate(model, prompt, { maxTokens: NEW_TOKENS });
        const pre = p / (r.stats.prefillMs / 1000);
        const dec = (r.stats.generatedTokens - 1) / (r.stats.decodeMs / 1000);
        prefill.get(key(p, mode))!.push(pre);
        decode.get(key(p, mode))!.push(dec);
        o.log(
          `[bench] invariant round ${round + 1}/${runs} ${mode} ${p}-token prompt: prefill ${pre.toFixed(1)} tok/s, decode ${dec.toFixed(1)} tok/s`,
        );
      }
    }
  }
  const modelRows: InvariantModelRow[] = prompts.flatMap((p) =>
    MODES.map((mode) => {
      const pre = prefill.get(key(p, mode))!;
      const dec = decode.get(key(p, mode))!;
      const preBase = prefill.get(key(p, "default"))!;
      const decBase = decode.get(key(p, "default"))!;
      return {
        promptTokens: p,
        mode,
        prefillTps: stats(pre),
        decodeTps: stats(dec),
        prefillRatio: stats(pre.map((v, i) => v / preBase[i]!)),
        decodeRatio: stats(dec.map((v, i) => v / decBase[i]!)),
      };
    }),
  );

  // The GEMM: weights random in [-0.05, 0.05), bf16 by truncation; fp8 converted from them.
  const addon = loadAddon();
  const wf = new Float32Array(N * K);
  let s = 12345;
  for (let i = 0; i < wf.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    wf[i] = (s / 2 ** 32 - 0.5) * 0.1;
  }
  const bf16 = new Uint16Array(wf.length);
  const u32 = new Uint32Array(wf.buffer);
  for (let i = 0; i < wf.length; i++) bf16[i] = u32[i]! >>> 16;
  const wBf16: Weight = { dtype: "bf16", data: bf16, rows: N, cols: K };
  const weightsOf: Record<(typeof GEMM_DTYPES)[number], Weight> = {
    bf16: wBf16,
    fp8: convertWeight(wBf16, "fp8"),
  };
  const gemmRows: InvariantGemmRow[] = [];
  const rowsList = o.quick ? [1, 32] : GEMM_ROWS;
  for (const dtype of GEMM_DTYPES) {
    const w = weightsOf[dtype];
    const view = {
      dtype: w.dtype,
      shape: [N, K],
      data: w.data,
      ...(w.scaleInv ? { scale: w.scaleInv } : {}),
    };
    for (const m of rowsList) {
      const x = wf.subarray(0, m * K).map((v, i) => v * 10 + (i % 7) * 0.01);
      const out = new Float32Array(m * N);
      // About 50 ms of calls per round, at least 5.
      const calls = Math.max(5, Math.round(50_000 / Math.max(1, (m * N * K) / 5e4)));
      const times = new Map<Mode, number[]>(MODES.map((md) => [md, []]));
      for (let round = 0; round < runs; round++) {
        for (const mode of orderOf(round)) {
          configure(mode, o.threads);
          addon.matmul(x, m, view, out); // warm-up
          const each: number[] = [];
          for (let c = 0; c < calls; c++) {
            const t0 = performance.now();
            addon.matmul(x, m, view, out);
            each.push((performance.now() - t0) * 1000);
          }
          times.get(mode)!.push(stats(each).median);
        }
      }
      const base = times.get("default")!;
      for (const mode of MODES) {
        const t = times.get(mode)!;
        gemmRows.push({
          dtype,
          rows: m,
          mode,
          us: stats(t),
          ratio: stats(t.map((v, i) => v / base[i]!)),
        });
      }
      o.log(
        `[bench] invariant ${dtype} GEMM ${m} x ${K} x ${N}: default ${stats(base).median.toFixed(0)} us, invariant ${stats(times.get("invariant")!).median.toFixed(0)} us`,
      );
    }
  }
  configure("default", o.threads);
  return { runs, threads: o.threads, model: "mini-v3", modelRows, gemmRows };
}

/** The suite's tables for BENCHMARKS.md. */
export function invariantTables(
  r: InvariantResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const ratio = (x: Stats, mode: Mode) =>
    mode === "default"
      ? "1.00x (the peer)"
      : `**${x.median.toFixed(2)}x** (${x.min.toFixed(2)}-${x.max.toFixed(2)})`;
  const model = r.modelRows
    .map(
      (x) =>
        `| ${x.promptTokens} | ${x.mode} | ${medianRange(x.prefillTps)} | ${ratio(x.prefillRatio, x.mode)} | ${medianRange(x.decodeTps)} | ${ratio(x.decodeRatio, x.mode)} |`,
    )
    .join("\n");
  const gemm = r.gemmRows
    .map(
      (x) =>
        `| ${x.dtype} | ${x.rows} | ${x.mode} | ${medianRange(x.us, 0)} | ${ratio(x.ratio, x.mode)} |`,
    )
    .join("\n");
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.runs} rounds in one process, the two kernel sets alternating (AB, BA); from \`${source}\`. Median (min-max) over rounds; ratios are per round against the default kernels of the same round, then the median.

${r.model}, \`generate\`'s engine at batch 1, ${NEW_TOKENS} tokens decoded after the prompt:

| prompt tokens | kernels | prefill, tok/s | prefill / default | decode, tok/s | decode / default |
|---:|---|---:|---:|---:|---:|
${model}

One GEMM of V3's shapes, x [rows, ${K}] times a [${N}, ${K}] weight (microseconds per call; a time ratio, lower is faster):

| weight | rows | kernels | us per call | time / default |
|---|---:|---|---:|---:|
${gemm}`;
}
