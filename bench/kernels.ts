// The kernel suite: expert matmul and expert FFN at DeepSeek-V2-Lite and V3 shapes, ours
// (the native addon through its JS API: Float32 activations, bf16 weights) against
// PyTorch CPU in the same run, interleaved, same threads; decode rows also against the
// machine's measured memory bandwidth, prefill rows against its measured FMA peak.
import { createRequire } from "node:module";
import { join } from "node:path";
import { cpuIsaFor } from "../src/engine/native.ts";
import {
  buildLimits,
  type FmaSample,
  gitCommit,
  goldenPython,
  Limits,
  LineClient,
  type MachineInfo,
  type MembwSample,
  machineInfo,
  peerEnv,
  REPO_ROOT,
  type Stats,
  stats,
} from "./lib.ts";

// ------------------------------------------------------------------ the addon

interface AddonWeight {
  dtype: "f32" | "bf16" | "fp8";
  shape: [number, number];
  data: Float32Array | Uint16Array | Uint8Array;
  /** fp8: one scale per 128 x 128 block. */
  scale?: Float32Array;
}

export interface Addon {
  backendInfo(): { backend: string; isa: string; threads: number; availableIsas: string[] };
  configure(o: { isa?: string; threads?: number }): { isa: string; threads: number };
  convert(w: AddonWeight, to: string): unknown;
  matmul(x: Float32Array, rows: number, w: AddonWeight): Float32Array;
  moeFfn(o: {
    x: Float32Array;
    dim: number;
    expertOffsets: Int32Array;
    w1: AddonWeight[];
    w2: AddonWeight[];
    w3: AddonWeight[];
  }): Float32Array;
}

export function loadAddon(): Addon {
  const path =
    process.env["EM_NATIVE_ADDON"] ?? join(REPO_ROOT, "shards", "build", "expertmesh.node");
  return createRequire(import.meta.url)(path) as Addon;
}

// ------------------------------------------------------------------ configuration

export interface ModelShape {
  name: string;
  hidden: number;
  inter: number;
}

export const MODELS: ModelShape[] = [
  { name: "V2-Lite", hidden: 2048, inter: 1408 },
  { name: "V3", hidden: 7168, inter: 2048 },
];
export const DECODE_TOKENS = [1, 4, 16];
export const PREFILL_TOKENS = [256, 1024];

/** The sides of a row. ours-bf16 is the subject; torch-bf16 / torch-f32 are the peers;
 *  ours-f32 (same kernel, fp32 weights), numpy-f32 (OpenBLAS) and, for decode rows,
 *  ours-bf16-hot (one copy of the weights, so they stay in cache) are diagnostics.
 *  ours-matmul-bf16 is ours as `--cpu-matmul bf16` runs it (x rounded to bf16: AMX tiles or
 *  AVX512_BF16 dot products), on CPUs that have one: torch bf16's like-for-like peer. */
export type Side =
  | "ours-bf16"
  | "torch-bf16"
  | "torch-f32"
  | "ours-f32"
  | "numpy-f32"
  | "ours-bf16-hot"
  | "ours-matmul-bf16";
export const SUBJECT: Side = "ours-bf16";

export interface KernelOptions {
  threads: number;
  runs: number;
  quick: boolean;
  /** Wall time one counted run should last at least (calls per run are set from it). */
  targetRunSeconds: number;
  /** Weights are rotated over copies totalling at least this many bytes (cold caches). */
  coldBytes: number;
  log: (s: string) => void;
}

export interface SideResult {
  dtype: "bf16" | "f32" | "fp8";
  /** Weight bytes one call streams. */
  weightBytes: number;
  copies: number;
  callsPerRun: number;
  /** Seconds per call, one value per counted run (in round order). */
  seconds: number[];
  time: Stats;
}

export interface RowResult {
  op: "matmul" | "ffn";
  model: string;
  hidden: number;
  inter: number;
  tokens: number;
  phase: "decode" | "prefill";
  /** Shapes of the matmuls, [M, N, K] each: y[M, N] = x[M, K] W[N, K]^T. */
  gemms: [number, number, number][];
  flops: number;
  sides: Partial<Record<Side, SideResult>>;
  /** Per round: this side's time / ours (paired, same round): > 1 means ours is faster. */
  speedup: Partial<Record<Side, Stats & { values: number[] }>>;
  /** Limits sampled once per round, in the same rounds. */
  limitSamples: { readGBs: number[]; copyGBs: number[]; fmaGFlops: number[] };
  /** Per side: weight bytes / time, and as a fraction of the same round's read / copy bandwidth. */
  bandwidth: Partial<Record<Side, { gbs: Stats; ofRead: Stats; ofCopy: Stats }>>;
  /** Per side: FLOP/s, and as a fraction of the same round's FMA peak. */
  compute: Partial<Record<Side, { gflops: Stats; ofPeak: Stats }>>;
  /** Roofline: the best fraction of the read bandwidth a kernel could reach at this
   *  arithmetic intensity if it ran at the FMA peak (medians of the row's samples). */
  ceilingOfRead: number;
  noisy: boolean;
  check?: { maxRelError: number; samples: number };
}

export interface KernelResults {
  schema: 1;
  suite: "kernels";
  date: string;
  quick: boolean;
  commit: string;
  dirty: boolean;
  machine: MachineInfo;
  software: {
    node: string;
    addon: { isa: string; threads: number; availableIsas: string[] };
    torch: Record<string, unknown>;
    torchKernels: Record<string, string[]>;
  };
  method: {
    threads: number;
    runs: number;
    warmupRuns: number;
    targetRunSeconds: number;
    coldBytes: number;
    limitsArrayMiB: number;
    sides: Side[];
    /** The CPU ISA of the ours-matmul-bf16 side (absent: the CPU has none). */
    matmulBf16Isa?: string;
  };
  limits: {
    /** Large-array passes before and after the rows (1 GiB arrays; --quick: 256 MiB). */
    membw: { arrayMiB: number; read: Stats; copy: Stats; samples: MembwSample[] };
    fma: { vector: string; gflops: Stats; samples: FmaSample[] };
    /** All per-round samples of the rows together. */
    rounds: { read: Stats; copy: Stats; fma: Stats };
  };
  rows: RowResult[];
  seconds: number;
}

// ------------------------------------------------------------------ data

/** Deterministic uniform floats in [-scale, scale) (xorshift32). */
function fillUniform(out: Float32Array, seed: number, scale: number): Float32Array {
  let s = seed >>> 0 || 1;
  for (let i = 0; i < out.length; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    out[i] = (s / 4294967296 - 0.5) * 2 * scale;
  }
  return out;
}

/** f32 -> bf16 bits, round to nearest even (finite inputs). */
function toBf16(src: Float32Array): Uint16Array {
  const u = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint16Array(src.length);
  for (let i = 0; i < u.length; i++) {
    const v = u[i]!;
    out[i] = (v + 0x7fff + ((v >>> 16) & 1)) >>> 16;
  }
  return out;
}

function bf16ToF32(src: Uint16Array): Float32Array {
  const out = new Uint32Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = src[i]! << 16;
  return new Float32Array(out.buffer);
}

// ------------------------------------------------------------------ one side's runner

/** Runs `calls` calls and returns the wall seconds they took. */
type Runner = (calls: number) => Promise<number>;

export interface SideSetup {
  run: Runner;
  weightBytes: number;
  copies: number;
  dtype: "bf16" | "f32" | "fp8";
  free: () => Promise<void>;
}

function copiesFor(setBytes: number, coldBytes: number): number {
  return Math.max(1, Math.min(256, Math.ceil(coldBytes / setBytes)));
}

export function oursSetup(
  addon: Addon,
  op: "matmul" | "ffn",
  m: ModelShape,
  tokens: number,
  dtype: "bf16" | "f32" | "fp8",
  coldBytes: number,
  seed: number,
): SideSetup & { check: () => { maxRelError: number; samples: number } } {
  const { hidden, inter } = m;
  const x = fillUniform(new Float32Array(tokens * hidden), seed, 1);
  // Weight values: uniform +-0.04 (about a trained layer's scale), stored as bf16, and the
  // f32 side gets the same values widened; fp8: those bf16 values quantized (DeepSeek-V3's
  // e4m3 with 128 x 128 block scales, by the addon's converter).
  const shapes: [number, number][] =
    op === "matmul"
      ? [[inter, hidden]]
      : [
          [inter, hidden],
          [inter, hidden],
          [hidden, inter],
        ];
  const base: AddonWeight[] = shapes.map(([r, c], i) => {
    const bits = toBf16(fillUniform(new Float32Array(r * c), seed + 17 * (i + 1), 0.04));
    if (dtype === "bf16") return { dtype, shape: [r, c], data: bits };
    if (dtype === "f32") return { dtype, shape: [r, c], data: bf16ToF32(bits) };
    const q = addon.convert({ dtype: "bf16", shape: [r, c], data: bits }, "fp8") as {
      data: Uint8Array;
      scaleInv: Float32Array;
    };
    return { dtype, shape: [r, c], data: q.data, scale: q.scaleInv };
  });
  const setBytes = base.reduce((a, w) => a + w.data.byteLength, 0);
  const copies = copiesFor(setBytes, coldBytes);
  const sets: AddonWeight[][] = [];
  for (let k = 0; k < copies; k++) {
    sets.push(base.map((w) => (k === 0 ? w : { ...w, data: w.data.slice() })));
  }
  const offsets = new Int32Array([0, tokens]);
  let next = 0;
  const call = (ws: AddonWeight[]): Float32Array =>
    op === "matmul"
      ? addon.matmul(x, tokens, ws[0]!)
      : addon.moeFfn({
          x,
          dim: hidden,
          expertOffsets: offsets,
          w1: [ws[0]!],
          w3: [ws[1]!],
          w2: [ws[2]!],
        });
  const run: Runner = async (calls) => {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < calls; i++) call(sets[(next + i) % copies]!);
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    next = (next + calls) % copies;
    return s;
  };
  // A sanity check that the call computes what it should: a few outputs of the matmul
  // against a plain dot product (the FFN's numerics are the engine tests' business).
  const check = () => {
    const y = call(sets[0]!);
    if (op !== "matmul") {
      const finite = y.every((v) => Number.isFinite(v));
      return { maxRelError: finite ? 0 : Number.POSITIVE_INFINITY, samples: 0 };
    }
    const w0 = sets[0]![0]!;
    const wf =
      w0.dtype === "fp8"
        ? (addon.convert(w0, "f32") as Float32Array)
        : w0.data instanceof Uint16Array
          ? bf16ToF32(w0.data)
          : (w0.data as Float32Array);
    let worst = 0;
    let samples = 0;
    for (const t of [0, tokens - 1]) {
      for (const n of [0, inter >> 1, inter - 1]) {
        let ref = 0;
        let mag = 0;
        for (let k = 0; k < hidden; k++) {
          ref += x[t * hidden + k]! * wf[n * hidden + k]!;
          mag += Math.abs(x[t * hidden + k]! * wf[n * hidden + k]!);
        }
        worst = Math.max(worst, Math.abs(y[t * inter + n]! - ref) / Math.max(mag, 1e-30));
        samples++;
      }
    }
    return { maxRelError: worst, samples };
  };
  return {
    run,
    weightBytes: setBytes,
    copies,
    dtype,
    check,
    free: async () => {
      sets.length = 0;
    },
  };
}

export async function peerSetup(
  worker: LineClient,
  key: string,
  lib: "torch" | "numpy",
  op: "matmul" | "ffn",
  m: ModelShape,
  tokens: number,
  dtype: "bf16" | "f32",
  coldBytes: number,
): Promise<SideSetup> {
  const esize = dtype === "bf16" ? 2 : 4;
  const setBytes = (op === "matmul" ? 1 : 3) * m.hidden * m.inter * esize;
  const copies = copiesFor(setBytes, coldBytes);
  await worker.call({
    cmd: "setup",
    key,
    lib,
    op,
    tokens,
    dim: m.hidden,
    inter: m.inter,
    dtype,
    copies,
  });
  return {
    run: async (calls) =>
      (await worker.call<{ seconds: number }>({ cmd: "run", key, calls })).seconds,
    weightBytes: setBytes,
    copies,
    dtype,
    free: async () => {
      await worker.call({ cmd: "free", key });
    },
  };
}

// ------------------------------------------------------------------ the suite

/** The PyTorch peer (bench/torch_worker.py in the golden venv), on `threads` threads. */
export function torchWorker(threads: number, log: (s: string) => void): LineClient {
  return new LineClient(
    "torch worker",
    goldenPython(log),
    [join(REPO_ROOT, "bench", "torch_worker.py"), String(threads)],
    peerEnv(),
  );
}

export function gemmsOf(
  op: "matmul" | "ffn",
  m: ModelShape,
  t: number,
): [number, number, number][] {
  return op === "matmul"
    ? [[t, m.inter, m.hidden]]
    : [
        [t, m.inter, m.hidden],
        [t, m.inter, m.hidden],
        [t, m.hidden, m.inter],
      ];
}

export function paired(a: number[], b: number[], f: (x: number, y: number) => number): number[] {
  const n = Math.min(a.length, b.length);
  const out: number[] = [];
  for (let i = 0; i < n; i++) out.push(f(a[i]!, b[i]!));
  return out;
}

export async function runKernels(opts: KernelOptions): Promise<KernelResults> {
  const { log } = opts;
  const started = Date.now();
  const machine = machineInfo();
  const { commit, dirty } = gitCommit();

  const addon = loadAddon();
  const info = addon.configure({ threads: opts.threads });
  const backend = addon.backendInfo();
  log(`[bench] ours: addon isa=${info.isa} threads=${info.threads}`);

  const limitsBin = buildLimits(log);
  const worker = torchWorker(opts.threads, log);
  const torchInfo = await worker.call<Record<string, unknown>>({ cmd: "hello" });
  const torchKernels = await worker.call<Record<string, string[]>>({ cmd: "probe" });
  log(
    `[bench] peer: torch ${torchInfo["torch"]} threads=${torchInfo["threads"]} capability=${torchInfo["cpu_capability"]}`,
  );

  // Limits: large arrays before and after the rows; a persistent helper samples one pass
  // per round inside every row.
  const bigMiB = opts.quick ? 256 : 1024;
  const roundMiB = 256;
  const startSamples = await limitPasses(limitsBin, opts.threads, bigMiB, opts.quick ? 3 : 5);
  log(
    `[bench] memory bandwidth (${bigMiB} MiB arrays): read ${fmt(stats(startSamples.membw.map((s) => s.read_gbs)).median)} GB/s, copy ${fmt(stats(startSamples.membw.map((s) => s.copy_gbs)).median)} GB/s; FMA peak ${fmt(stats(startSamples.fma.map((s) => s.gflops)).median)} GFLOP/s`,
  );
  const limits = await Limits.start(limitsBin, opts.threads, roundMiB);

  const matmulBf16Isa = cpuIsaFor("bf16", backend.availableIsas);
  const sides: Side[] = opts.quick
    ? ["ours-bf16", "torch-bf16", "torch-f32"]
    : ["ours-bf16", "torch-bf16", "torch-f32", "ours-f32", "numpy-f32"];
  // Beside the subject, so that in both orders of a round it follows one of ours, as the
  // subject does: a side run right after a peer's can share the cores with the peer's threads
  // still spinning (decode rows measured 0.6-0.8x of their time when it followed numpy's).
  if (matmulBf16Isa && !opts.quick) sides.splice(1, 0, "ours-matmul-bf16");
  const models = opts.quick ? MODELS.slice(0, 1) : MODELS;
  const tokensList = opts.quick ? [1, 16, 256] : [...DECODE_TOKENS, ...PREFILL_TOKENS];
  const rows: RowResult[] = [];
  let keySeq = 0;

  for (const m of models) {
    for (const op of ["matmul", "ffn"] as const) {
      for (const tokens of tokensList) {
        const phase = tokens <= 16 ? "decode" : "prefill";
        const gemms = gemmsOf(op, m, tokens);
        const flops = gemms.reduce((a, [M, N, K]) => a + 2 * M * N * K, 0);
        const label = `${m.name} ${op} T=${tokens}`;
        const rowSides: Side[] =
          phase === "decode" && !opts.quick ? [...sides, "ours-bf16-hot"] : sides;
        log(`[bench] ${label}: setting up ${rowSides.join(", ")}`);
        const setups = new Map<Side, SideSetup>();
        let check: RowResult["check"];
        for (const side of rowSides) {
          const dtype = side.includes("bf16") ? "bf16" : "f32";
          if (side.startsWith("ours")) {
            const cold = side.endsWith("-hot") ? 0 : opts.coldBytes;
            const s = oursSetup(addon, op, m, tokens, dtype, cold, 1234 + tokens);
            if (side === SUBJECT) check = s.check();
            if (side === "ours-matmul-bf16") {
              // The addon's CPU kernels switched for this side's runs only (not timed), with a
              // call before each timed run. Its
              // output is checked as the isa suite checks it: x in bf16 is ~1e-3 off.
              addon.configure({ isa: matmulBf16Isa!, threads: opts.threads });
              const { maxRelError } = s.check();
              addon.configure({ isa: info.isa, threads: opts.threads });
              if (!(maxRelError < 1e-2))
                throw new Error(
                  `${label}: ${side} disagrees with a plain dot product (${maxRelError})`,
                );
              const run = s.run;
              s.run = async (calls) => {
                addon.configure({ isa: matmulBf16Isa!, threads: opts.threads });
                try {
                  await run(1); // a new backend's first call (its threads, its scratch) untimed
                  return await run(calls);
                } finally {
                  addon.configure({ isa: info.isa, threads: opts.threads });
                }
              };
            }
            setups.set(side, s);
          } else {
            const lib = side.startsWith("numpy") ? "numpy" : "torch";
            setups.set(
              side,
              await peerSetup(worker, `k${keySeq++}`, lib, op, m, tokens, dtype, opts.coldBytes),
            );
          }
        }
        if (check && !(check.maxRelError < 1e-3)) {
          throw new Error(
            `${label}: ours disagrees with a plain dot product (rel. error ${check.maxRelError})`,
          );
        }

        // Warm-up: one call per side (also the estimate of a call's time), then one run
        // with the calls per run that reach the target time.
        const calls = new Map<Side, number>();
        for (const side of rowSides) {
          const s = await setups.get(side)!.run(1);
          calls.set(side, Math.max(1, Math.min(2000, Math.ceil(opts.targetRunSeconds / s))));
        }
        for (const side of rowSides) await setups.get(side)!.run(calls.get(side)!);

        // Counted rounds: every side once per round, the order reversed every other round
        // (A B C, C B A, ...), plus one sample of each limit.
        const seconds = new Map<Side, number[]>(rowSides.map((s) => [s, []]));
        const limitSamples = {
          readGBs: [] as number[],
          copyGBs: [] as number[],
          fmaGFlops: [] as number[],
        };
        for (let r = 0; r < opts.runs; r++) {
          const order = r % 2 === 0 ? rowSides : [...rowSides].reverse();
          for (const side of order) {
            const n = calls.get(side)!;
            seconds.get(side)!.push((await setups.get(side)!.run(n)) / n);
          }
          const bw = await limits.membw();
          limitSamples.readGBs.push(bw.read_gbs);
          limitSamples.copyGBs.push(bw.copy_gbs);
          limitSamples.fmaGFlops.push((await limits.fma()).gflops);
        }
        for (const s of setups.values()) await s.free();

        const row: RowResult = {
          op,
          model: m.name,
          hidden: m.hidden,
          inter: m.inter,
          tokens,
          phase,
          gemms,
          flops,
          sides: {},
          speedup: {},
          limitSamples,
          bandwidth: {},
          compute: {},
          ceilingOfRead: 0,
          noisy: false,
          ...(check ? { check } : {}),
        };
        const ours = seconds.get(SUBJECT)!;
        for (const side of rowSides) {
          const st = setups.get(side)!;
          const secs = seconds.get(side)!;
          row.sides[side] = {
            dtype: st.dtype,
            weightBytes: st.weightBytes,
            copies: st.copies,
            callsPerRun: calls.get(side)!,
            seconds: secs,
            time: stats(secs),
          };
          if (side !== SUBJECT) {
            const values = paired(secs, ours, (p, o) => p / o);
            row.speedup[side] = { ...stats(values), values };
          }
          const gbs = secs.map((s) => st.weightBytes / s / 1e9);
          row.bandwidth[side] = {
            gbs: stats(gbs),
            ofRead: stats(paired(gbs, limitSamples.readGBs, (a, b) => a / b)),
            ofCopy: stats(paired(gbs, limitSamples.copyGBs, (a, b) => a / b)),
          };
          const gflops = secs.map((s) => flops / s / 1e9);
          row.compute[side] = {
            gflops: stats(gflops),
            ofPeak: stats(paired(gflops, limitSamples.fmaGFlops, (a, b) => a / b)),
          };
        }
        const subjectBytes = setups.get(SUBJECT)!.weightBytes;
        row.ceilingOfRead = Math.min(
          1,
          (stats(limitSamples.fmaGFlops).median * 1e9) /
            (flops / subjectBytes) /
            (stats(limitSamples.readGBs).median * 1e9),
        );
        row.noisy = sides.some((s) => {
          const t = row.sides[s]!.time;
          return (t.max - t.min) / t.median > 0.25;
        });
        rows.push(row);
        const ratio = (s: Side) => row.speedup[s]?.median;
        log(
          `[bench] ${label}: ours ${fmtMs(row.sides[SUBJECT]!.time.median)}, torch-f32 x${fmt(ratio("torch-f32"))}, torch-bf16 x${fmt(ratio("torch-bf16"))}` +
            (phase === "decode"
              ? `, ${fmt(row.bandwidth[SUBJECT]!.gbs.median)} GB/s = ${fmt(row.bandwidth[SUBJECT]!.ofRead.median)} of read bandwidth`
              : `, ${fmt(row.compute[SUBJECT]!.gflops.median)} GFLOP/s = ${fmt(row.compute[SUBJECT]!.ofPeak.median)} of FMA peak`) +
            (row.noisy ? " (noisy)" : ""),
        );
      }
    }
  }

  await limits.close();
  const endSamples = await limitPasses(limitsBin, opts.threads, bigMiB, opts.quick ? 3 : 5);
  await worker.close(JSON.stringify({ cmd: "quit" }));
  machine.loadavgEnd = (await import("node:os")).loadavg().map((v) => Math.round(v * 100) / 100);

  const membw = [...startSamples.membw, ...endSamples.membw];
  const fma = [...startSamples.fma, ...endSamples.fma];
  const all = (f: (r: RowResult) => number[]) => rows.flatMap(f);
  return {
    schema: 1,
    suite: "kernels",
    date: new Date().toISOString(),
    quick: opts.quick,
    commit,
    dirty,
    machine,
    software: {
      node: process.version,
      addon: { isa: backend.isa, threads: backend.threads, availableIsas: backend.availableIsas },
      torch: torchInfo,
      torchKernels,
    },
    method: {
      threads: opts.threads,
      runs: opts.runs,
      warmupRuns: 2,
      targetRunSeconds: opts.targetRunSeconds,
      coldBytes: opts.coldBytes,
      limitsArrayMiB: roundMiB,
      sides,
      ...(matmulBf16Isa && !opts.quick ? { matmulBf16Isa } : {}),
    },
    limits: {
      membw: {
        arrayMiB: bigMiB,
        read: stats(membw.map((s) => s.read_gbs)),
        copy: stats(membw.map((s) => s.copy_gbs)),
        samples: membw,
      },
      fma: { vector: fma[0]?.vector ?? "?", gflops: stats(fma.map((s) => s.gflops)), samples: fma },
      rounds: {
        read: stats(all((r) => r.limitSamples.readGBs)),
        copy: stats(all((r) => r.limitSamples.copyGBs)),
        fma: stats(all((r) => r.limitSamples.fmaGFlops)),
      },
    },
    rows,
    seconds: (Date.now() - started) / 1000,
  };
}

async function limitPasses(
  bin: string,
  threads: number,
  mib: number,
  passes: number,
): Promise<{ membw: MembwSample[]; fma: FmaSample[] }> {
  const l = await Limits.start(bin, threads, mib);
  const membw: MembwSample[] = [];
  const fma: FmaSample[] = [];
  await l.membw(); // warm-up pass
  for (let i = 0; i < passes; i++) {
    membw.push(await l.membw());
    fma.push(await l.fma());
  }
  await l.close();
  return { membw, fma };
}

export function fmt(v: number | undefined, digits = 2): string {
  if (v === undefined || !Number.isFinite(v)) return "-";
  return v.toFixed(digits);
}

export function fmtMs(seconds: number): string {
  const ms = seconds * 1e3;
  return ms >= 100
    ? `${ms.toFixed(0)} ms`
    : ms >= 10
      ? `${ms.toFixed(1)} ms`
      : `${ms.toFixed(3)} ms`;
}
