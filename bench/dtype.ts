// The dtype suite: what serving the mini V3 model's linear layers in another dtype
// (`--dtype`, spec.model.dtype; src/engine/weight-dtype.ts) costs and saves on this
// machine's CPU backend, against the peer that sets the bar: the checkpoint's own bf16
// (`auto`), measured in the same run.
//
// Each sample is a fresh process (so that memory and caches start alike) that loads the
// weights in one dtype, then prefills a 128-token prompt and decodes 32 tokens greedily at
// batch 1 (one sequence, the engine of `generate`), and reports: load seconds (reading and
// converting), the bytes of the weights held (exact: the sum of every weight's buffers),
// the process's resident memory after loading, and prefill and decode tokens per second.
// The dtypes alternate in every order of three, so each follows each of the others equally.
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import type { Weight } from "../src/engine/backend.ts";
import { LocalExperts } from "../src/engine/experts.ts";
import { generate } from "../src/engine/generate.ts";
import { heldExperts, loadWeights, type ModelWeights } from "../src/engine/loader.ts";
import { DeepSeekForward } from "../src/engine/model.ts";
import { loadAddon, nativeBackend } from "../src/engine/native.ts";
import type { ServeDtype } from "../src/engine/weight-dtype.ts";
import { Checkpoint } from "../src/model/checkpoint.ts";
import { medianRange, ORDERS_OF_THREE, type Stats, stats } from "./lib.ts";
import { ensureMiniModel } from "./serve.ts";

/** The peer first: ratios are against it. */
const DTYPES = ["auto", "fp8", "fp32"] as const satisfies readonly ServeDtype[];
type BenchDtype = (typeof DTYPES)[number];

const PROMPT_TOKENS = 128;
const NEW_TOKENS = 32;

/** One process's measurements. */
interface Sample {
  loadS: number;
  weightBytes: number;
  rssBytes: number;
  prefillTps: number;
  decodeTps: number;
}

export interface DtypeRow {
  dtype: BenchDtype;
  loadS: Stats;
  weightBytes: number;
  rssBytes: Stats;
  prefillTps: Stats;
  decodeTps: Stats;
  /** Per round, this dtype's figure / auto's of the same round. */
  decodeRatio: Stats;
  prefillRatio: Stats;
  loadRatio: Stats;
}

export interface DtypeResults {
  runs: number;
  threads: number;
  model: string;
  rows: DtypeRow[];
}

/** Bytes of every buffer of the weights (shared ones once). */
function weightBytes(w: ModelWeights): number {
  const seen = new Set<ArrayBufferView>();
  let n = 0;
  const add = (x: Weight | Float32Array | null | undefined) => {
    if (!x) return;
    for (const b of x instanceof Float32Array ? [x] : [x.data, x.scaleInv]) {
      if (b && !seen.has(b)) {
        seen.add(b);
        n += b.byteLength;
      }
    }
  };
  const mlp = (m: { gate: Weight; up: Weight; down: Weight } | null | undefined) => {
    if (m) for (const x of [m.gate, m.up, m.down]) add(x);
  };
  add(w.embed);
  add(w.lmHead);
  add(w.norm);
  for (const l of w.layers) {
    add(l.inputNorm);
    add(l.postNorm);
    for (const x of Object.values(l.attention)) add(x as Weight);
    mlp(l.mlp);
    if (l.moe) {
      add(l.moe.router);
      add(l.moe.bias);
      mlp(l.moe.shared);
      for (const e of l.moe.experts.values()) mlp(e);
    }
  }
  return n;
}

/** In the worker process: one sample. */
async function sample(dir: string, dtype: BenchDtype, threads: number): Promise<Sample> {
  if (threads > 0) loadAddon().configure({ threads });
  const backend = nativeBackend();
  const t0 = performance.now();
  const weights = await loadWeights(await Checkpoint.open(dir), "all", undefined, { dtype });
  const loadS = (performance.now() - t0) / 1000;
  const rssBytes = process.memoryUsage().rss;
  const model = new DeepSeekForward(
    weights,
    backend,
    new LocalExperts(backend, heldExperts(weights)),
  );
  const prompt = Array.from({ length: PROMPT_TOKENS }, (_, i) => (i * 37 + 11) % 300);
  const r = await generate(model, prompt, { maxTokens: NEW_TOKENS });
  return {
    loadS,
    weightBytes: weightBytes(weights),
    rssBytes,
    prefillTps: PROMPT_TOKENS / (r.stats.prefillMs / 1000),
    // The first new token comes from the prefill; each other from one decode step.
    decodeTps: (r.stats.generatedTokens - 1) / (r.stats.decodeMs / 1000),
  };
}

export async function runDtype(o: {
  threads: number;
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<DtypeResults> {
  const dir = await ensureMiniModel(o.log);
  const runs = o.quick ? 1 : o.runs;
  const samples = new Map<BenchDtype, Sample[]>(DTYPES.map((d) => [d, []]));
  const ratios = new Map<BenchDtype, { decode: number[]; prefill: number[]; load: number[] }>(
    DTYPES.map((d) => [d, { decode: [], prefill: [], load: [] }]),
  );
  const me = fileURLToPath(import.meta.url);
  for (let round = 0; round < runs; round++) {
    const order = ORDERS_OF_THREE[round % ORDERS_OF_THREE.length]!.map((i) => DTYPES[i]!);
    const got = new Map<BenchDtype, Sample>();
    for (const d of order) {
      const env = { ...process.env, ...(o.threads > 0 ? { EM_THREADS: String(o.threads) } : {}) };
      const p = spawnSync(process.execPath, [me, "--worker", dir, d], { encoding: "utf8", env });
      if (p.status !== 0) throw new Error(`dtype worker ${d} failed:\n${p.stderr}`);
      const s = JSON.parse(p.stdout.trim().split("\n").pop()!) as Sample;
      got.set(d, s);
      samples.get(d)!.push(s);
      o.log(
        `[bench] dtype ${d} round ${round + 1}/${runs}: load ${s.loadS.toFixed(2)} s, ` +
          `${(s.weightBytes / 2 ** 20).toFixed(0)} MiB of weights, prefill ${s.prefillTps.toFixed(1)} tok/s, ` +
          `decode ${s.decodeTps.toFixed(1)} tok/s`,
      );
    }
    const peer = got.get("auto")!;
    for (const d of DTYPES) {
      const s = got.get(d)!;
      const r = ratios.get(d)!;
      r.decode.push(s.decodeTps / peer.decodeTps);
      r.prefill.push(s.prefillTps / peer.prefillTps);
      r.load.push(s.loadS / peer.loadS);
    }
  }
  const rows = DTYPES.map((dtype): DtypeRow => {
    const s = samples.get(dtype)!;
    const r = ratios.get(dtype)!;
    return {
      dtype,
      loadS: stats(s.map((x) => x.loadS)),
      weightBytes: s[0]!.weightBytes,
      rssBytes: stats(s.map((x) => x.rssBytes)),
      prefillTps: stats(s.map((x) => x.prefillTps)),
      decodeTps: stats(s.map((x) => x.decodeTps)),
      decodeRatio: stats(r.decode),
      prefillRatio: stats(r.prefill),
      loadRatio: stats(r.load),
    };
  });
  return { runs, threads: o.threads, model: "mini-v3", rows };
}

/** The suite's table for BENCHMARKS.md. */
export function dtypeTables(
  r: DtypeResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const mib = (n: number) => (n / 2 ** 20).toFixed(0);
  const auto = r.rows.find((x) => x.dtype === "auto")!;
  const rows = r.rows
    .map(
      (x) =>
        `| ${x.dtype === "auto" ? "auto (bf16, the peer)" : x.dtype} | ${mib(x.weightBytes)} (${(x.weightBytes / auto.weightBytes).toFixed(2)}x) | ${mib(x.rssBytes.median)} | ${medianRange(x.loadS, 2)} | ${x.loadRatio.median.toFixed(2)}x | ${medianRange(x.prefillTps)} | ${x.prefillRatio.median.toFixed(2)}x | ${medianRange(x.decodeTps)} | **${x.decodeRatio.median.toFixed(2)}x** (${x.decodeRatio.min.toFixed(2)}-${x.decodeRatio.max.toFixed(2)}) |`,
    )
    .join("\n");
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.model}, ${r.runs} rounds of one fresh process per dtype, dtypes alternating in every order; from \`${source}\`. Median (min-max) over rounds; ratios are per round against auto's process of the same round, then the median.

| --dtype | weights held, MiB | resident after load, MiB | load s | load / auto | prefill ${PROMPT_TOKENS} tokens, tok/s | prefill / auto | decode ${NEW_TOKENS} tokens, tok/s | decode / auto |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
${rows}`;
}

// The worker: `node bench/dtype.ts --worker DIR DTYPE` prints one Sample as JSON.
if (process.argv[2] === "--worker") {
  const [dir, dtype] = process.argv.slice(3) as [string, BenchDtype];
  const threads = Number(process.env["EM_THREADS"] ?? 0);
  sample(dir, dtype, threads).then(
    (s) => console.log(JSON.stringify(s)),
    (e) => {
      console.error(e);
      process.exit(1);
    },
  );
}
