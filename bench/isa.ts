// The isa suite: our bf16-weight expert matmul and expert FFN on the CPU kernel sets an AVX-512
// machine with AMX offers (avx512: the default, fp32 products; avx512bf16: bf16 dot products;
// amx: the tile unit), against PyTorch's bf16 Linear (oneDNN) in the same run,
// interleaved, same threads, weights rotated over copies so they come from memory.
// The subject is amx: the suite refuses to run on a CPU without it.

import type { ChildProcess } from "node:child_process";
import {
  type Addon,
  gemmsOf,
  loadAddon,
  MODELS,
  oursSetup,
  paired,
  peerSetup,
  type SideSetup,
  torchWorker,
} from "./kernels.ts";
import { type machineInfo, medianRange, type Stats, stats } from "./lib.ts";
import { chat, ensureMiniModel, localGateway, PROMPTS, stop } from "./serve.ts";

const TOKENS = [1, 4, 16, 64, 256, 1024];
const OURS = ["avx512", "avx512bf16", "amx"] as const;
type IsaSide = (typeof OURS)[number] | "torch-bf16";
const SUBJECT = "amx";

export interface IsaRow {
  model: string;
  op: "matmul" | "ffn";
  /** The weights' dtype (x is f32 on every side). */
  dtype: "bf16" | "fp8";
  tokens: number;
  flops: number;
  /** Seconds per call, median (min-max) over the rounds, per side. */
  time: Partial<Record<IsaSide, Stats>>;
  /** Per side: its time / amx's, paired by round (> 1: amx is faster). */
  vsAmx: Partial<Record<IsaSide, Stats>>;
  amxGflops: Stats;
  /** amx's output against a plain f64 dot product: max |error| / sum |x w| (matmul rows). */
  maxRelError: number;
}

/** The whole model: two mini-v3 gateways, `--cpu-matmul` fp32 (default) and bf16, in turns. */
export interface IsaServe {
  rounds: number;
  promptTokens: number;
  clients: number;
  decodeTokens: number;
  /** Time to first token of one long prompt, ms per round. */
  prefillMs: { fp32: Stats; bf16: Stats };
  /** Output tokens/s of `clients` concurrent chats of `decodeTokens` tokens, per round. */
  decodeTokPerS: { fp32: Stats; bf16: Stats };
}

export interface IsaResults {
  runs: number;
  threads: number;
  torch: Record<string, unknown>;
  rows: IsaRow[];
  serve: IsaServe;
}

const SERVE_CLIENTS = 16;
const SERVE_DECODE_TOKENS = 32;

/** fp32 and bf16 gateways on mini-v3, measured in alternating turns (prefix caching off, so
 *  every prompt is computed). */
async function serveRounds(runs: number, log: (s: string) => void): Promise<IsaServe> {
  const modelDir = await ensureMiniModel(log);
  const children: ChildProcess[] = [];
  try {
    log("[isa] starting two mini-v3 gateways (--cpu-matmul fp32 and bf16)");
    const extra = ["--no-prefix-caching", "--max-running=32"];
    const bases = {
      fp32: await localGateway("gateway-fp32", modelDir, extra, children),
      bf16: await localGateway("gateway-bf16", modelDir, [...extra, "--cpu-matmul=bf16"], children),
    };
    // A long prompt: the serve prompts repeated to ~1,500 characters (mini-v3's byte-level
    // tokenizer: about as many tokens), a different first line per request.
    const long = (i: number) => `${i}: ${PROMPTS.join(" ").repeat(4).slice(0, 1500)}`;
    let promptTokens = 0;
    const acc = {
      fp32: { prefill: [] as number[], decode: [] as number[] },
      bf16: { prefill: [] as number[], decode: [] as number[] },
    };
    for (let r = -1; r < runs; r++) {
      for (const side of r % 2 === 0 ? (["fp32", "bf16"] as const) : (["bf16", "fp32"] as const)) {
        const p = await chat(bases[side], long(r + 10), 1, undefined, {});
        if (!p.ok) throw new Error(`${side}: long prompt failed: ${p.error}`);
        const t0 = performance.now();
        const all = await Promise.all(
          Array.from({ length: SERVE_CLIENTS }, (_, c) =>
            chat(bases[side], `${r}.${c} ${PROMPTS[c % PROMPTS.length]}`, SERVE_DECODE_TOKENS),
          ),
        );
        const seconds = (performance.now() - t0) / 1000;
        const bad = all.find((x) => !x.ok || x.tokens !== SERVE_DECODE_TOKENS);
        if (bad) throw new Error(`${side}: decode request failed: ${bad.error ?? bad.tokens}`);
        if (r < 0) continue; // warm-up round
        acc[side].prefill.push(p.ttftMs);
        acc[side].decode.push((SERVE_CLIENTS * SERVE_DECODE_TOKENS) / seconds);
      }
      if (r >= 0) {
        log(
          `[isa] serve round ${r + 1}/${runs}: prefill ${acc.fp32.prefill.at(-1)!.toFixed(0)} vs ${acc.bf16.prefill.at(-1)!.toFixed(0)} ms, decode ${acc.fp32.decode.at(-1)!.toFixed(1)} vs ${acc.bf16.decode.at(-1)!.toFixed(1)} tok/s (fp32 vs bf16)`,
        );
      }
    }
    const usage = await fetch(`${bases.fp32}/tokenize`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ prompt: long(0) }),
    });
    promptTokens = ((await usage.json()) as { count: number }).count;
    return {
      rounds: runs,
      promptTokens,
      clients: SERVE_CLIENTS,
      decodeTokens: SERVE_DECODE_TOKENS,
      prefillMs: { fp32: stats(acc.fp32.prefill), bf16: stats(acc.bf16.prefill) },
      decodeTokPerS: { fp32: stats(acc.fp32.decode), bf16: stats(acc.bf16.decode) },
    };
  } finally {
    await Promise.all(children.map((c) => stop(c)));
  }
}

function withIsa(addon: Addon, isa: string, threads: number, s: SideSetup): SideSetup {
  return {
    ...s,
    run: async (calls) => {
      addon.configure({ isa, threads });
      return s.run(calls);
    },
  };
}

export async function runIsa(o: {
  threads: number;
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<IsaResults> {
  const addon = loadAddon();
  const have = addon.backendInfo().availableIsas;
  if (!have.includes(SUBJECT)) {
    throw new Error(
      `the isa suite measures the AMX kernels, and this CPU offers ${have.join(", ")} (no amx)`,
    );
  }
  const worker = torchWorker(o.threads, o.log);
  const torch = await worker.call<Record<string, unknown>>({ cmd: "hello" });
  const coldBytes = 512 * 2 ** 20;
  const targetRunSeconds = o.quick ? 0.1 : 0.25;
  const rows: IsaRow[] = [];
  let key = 0;

  /** One row: every side set up, warmed, then `runs` rounds in alternating order. */
  const measure = async (
    m: (typeof MODELS)[number],
    op: "matmul" | "ffn",
    tokens: number,
    dtype: "bf16" | "fp8",
    sides: IsaSide[],
  ): Promise<IsaRow> => {
    const flops = gemmsOf(op, m, tokens).reduce((a, [M, N, K]) => a + 2 * M * N * K, 0);
    const setups = new Map<IsaSide, SideSetup>();
    let maxRelError = 0;
    for (const side of sides) {
      if (side === "torch-bf16") {
        setups.set(
          side,
          await peerSetup(worker, `i${key++}`, "torch", op, m, tokens, "bf16", coldBytes),
        );
        continue;
      }
      const s = oursSetup(addon, op, m, tokens, dtype, coldBytes, 99 + tokens);
      if (side === SUBJECT) {
        addon.configure({ isa: side, threads: o.threads });
        maxRelError = s.check().maxRelError;
        if (!(maxRelError < 1e-2)) {
          throw new Error(
            `${m.name} ${op} ${dtype} T=${tokens}: amx disagrees with a plain dot product (${maxRelError})`,
          );
        }
      }
      setups.set(side, withIsa(addon, side, o.threads, s));
    }
    const calls = new Map<IsaSide, number>();
    for (const side of sides) {
      const t = await setups.get(side)!.run(1);
      calls.set(side, Math.max(1, Math.min(2000, Math.ceil(targetRunSeconds / t))));
      await setups.get(side)!.run(calls.get(side)!);
    }
    const secs = new Map<IsaSide, number[]>(sides.map((s) => [s, []]));
    for (let r = 0; r < o.runs; r++) {
      for (const side of r % 2 === 0 ? sides : [...sides].reverse()) {
        const n = calls.get(side)!;
        secs.get(side)!.push((await setups.get(side)!.run(n)) / n);
      }
    }
    for (const s of setups.values()) await s.free();
    const amx = secs.get(SUBJECT)!;
    const row: IsaRow = {
      model: m.name,
      op,
      dtype,
      tokens,
      flops,
      time: Object.fromEntries(sides.map((s) => [s, stats(secs.get(s)!)])),
      vsAmx: Object.fromEntries(
        sides
          .filter((s) => s !== SUBJECT)
          .map((s) => [s, stats(paired(secs.get(s)!, amx, (p, a) => p / a))]),
      ),
      amxGflops: stats(amx.map((s) => flops / s / 1e9)),
      maxRelError,
    };
    const vs = Object.entries(row.vsAmx).map(([s, v]) => `${s} x${v.median.toFixed(2)}`);
    o.log(
      `[isa] ${m.name} ${op} ${dtype} T=${tokens}: amx ${(row.time.amx!.median * 1e3).toFixed(3)} ms (${row.amxGflops.median.toFixed(0)} GFLOP/s); ${vs.join(", ")}`,
    );
    return row;
  };

  try {
    const models = o.quick ? MODELS.slice(0, 1) : MODELS;
    const tokensList = o.quick ? [1, 16, 256] : TOKENS;
    for (const m of models)
      for (const op of ["matmul", "ffn"] as const)
        for (const tokens of tokensList)
          rows.push(await measure(m, op, tokens, "bf16", [...OURS, "torch-bf16"]));
    // fp8 weights (DeepSeek-V3's format), at the last model's shapes: amx dequantizes them to
    // bf16 tiles; the default ISA's fp8 kernel is the peer (PyTorch has no fp8 CPU matmul).
    const m = models[models.length - 1]!;
    for (const op of ["matmul", "ffn"] as const)
      for (const tokens of tokensList)
        rows.push(await measure(m, op, tokens, "fp8", ["avx512", "amx"]));
  } finally {
    addon.configure({ isa: "auto", threads: o.threads });
    await worker.close(JSON.stringify({ cmd: "quit" }));
  }
  const serve = await serveRounds(o.quick ? 1 : o.runs, o.log);
  return { runs: o.runs, threads: o.threads, torch, rows, serve };
}

const ratio = (s: Stats | undefined) => (s ? medianRange(s, 2) : "");

/** The suite's table for BENCHMARKS.md. */
export function isaTables(
  r: IsaResults & { date: string; commit: string; machine: ReturnType<typeof machineInfo> },
  source: string,
): string {
  const ms = (t: Stats) =>
    medianRange({ ...t, median: t.median * 1e3, min: t.min * 1e3, max: t.max * 1e3 }, 3);
  const fp8 = r.rows.filter((row) => row.dtype === "fp8");
  const lines = r.rows
    .filter((row) => row.dtype !== "fp8")
    .map(
      (row) =>
        `| ${row.model} | ${row.op} | ${row.tokens} | ${ms(row.time.amx!)} | ${row.amxGflops.median.toFixed(0)} | ${ratio(row.vsAmx.avx512)} | ${ratio(row.vsAmx.avx512bf16)} | ${ratio(row.vsAmx["torch-bf16"])} |`,
    );
  const fp8Table = fp8.length
    ? `fp8 weights (e4m3 with 128 x 128 block scales, DeepSeek-V3's format), same method: amx dequantizes each weight slice to bf16 tiles; the peer is the default ISA's fp8 kernel (fp32 products).

| model | op | tokens | amx ms | amx GFLOP/s | avx512 ms | avx512 / amx |
|---|---|---:|---:|---:|---:|---:|
${fp8.map((row) => `| ${row.model} | ${row.op} | ${row.tokens} | ${ms(row.time.amx!)} | ${row.amxGflops.median.toFixed(0)} | ${ms(row.time.avx512!)} | ${ratio(row.vsAmx.avx512)} |`).join("\n")}

`
    : "";
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.threads} threads, torch ${String(r.torch["torch"])} (bf16 Linear, \`cpu_capability\` ${String(r.torch["cpu_capability"])}), ${r.runs} interleaved rounds; from \`${source}\`. Weights bf16, rotated over copies of at least 512 MiB (cold caches); x f32. Ratios are the other side's time over amx's, paired by round, median (min-max): above 1, amx is faster.

| model | op | tokens | amx ms | amx GFLOP/s | avx512 (default ISA) / amx | avx512bf16 / amx | torch bf16 / amx |
|---|---|---:|---:|---:|---:|---:|---:|
${lines.join("\n")}

${fp8Table}The whole model: two \`gateway --local\` processes on mini-v3 (bf16 weights, hidden 1024, 64 experts top-6, 8 layers), the default and \`--cpu-matmul bf16\`, \`--no-prefix-caching\`, measured in alternating turns (${r.serve.rounds} rounds after a warm-up): the time to first token of one ${r.serve.promptTokens}-token prompt, then ${r.serve.clients} concurrent chats of ${r.serve.decodeTokens} tokens. Median (min-max).

| measure | fp32 (default) | bf16 | bf16 / fp32 |
|---|---:|---:|---:|
| prefill: time to first token, ms | ${medianRange(r.serve.prefillMs.fp32, 0)} | ${medianRange(r.serve.prefillMs.bf16, 0)} | ${(r.serve.prefillMs.bf16.median / r.serve.prefillMs.fp32.median).toFixed(3)}x |
| decode, ${r.serve.clients} clients: output tok/s | ${medianRange(r.serve.decodeTokPerS.fp32, 1)} | ${medianRange(r.serve.decodeTokPerS.bf16, 1)} | ${(r.serve.decodeTokPerS.bf16.median / r.serve.decodeTokPerS.fp32.median).toFixed(3)}x |`;
}
