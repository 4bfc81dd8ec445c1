// The isa suite: our bf16-weight expert matmul and expert FFN on the CPU kernel sets an AVX-512
// machine with AMX offers (avx512: the default, fp32 products; avx512bf16: bf16 dot products;
// amx: the tile unit), against PyTorch's bf16 Linear (oneDNN) in the same run,
// interleaved, same threads, weights rotated over copies so they come from memory.
// The subject is amx: the suite refuses to run on a CPU without it.
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

const TOKENS = [1, 4, 16, 64, 256, 1024];
const OURS = ["avx512", "avx512bf16", "amx"] as const;
type IsaSide = (typeof OURS)[number] | "torch-bf16";
const SUBJECT = "amx";

export interface IsaRow {
  model: string;
  op: "matmul" | "ffn";
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

export interface IsaResults {
  runs: number;
  threads: number;
  torch: Record<string, unknown>;
  rows: IsaRow[];
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
  const sides: IsaSide[] = [...OURS, "torch-bf16"];
  const rows: IsaRow[] = [];
  let key = 0;
  try {
    for (const m of o.quick ? MODELS.slice(0, 1) : MODELS) {
      for (const op of ["matmul", "ffn"] as const) {
        for (const tokens of o.quick ? [1, 16, 256] : TOKENS) {
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
            const s = oursSetup(addon, op, m, tokens, "bf16", coldBytes, 99 + tokens);
            if (side === SUBJECT) {
              addon.configure({ isa: side, threads: o.threads });
              maxRelError = s.check().maxRelError;
              if (!(maxRelError < 1e-2)) {
                throw new Error(
                  `${m.name} ${op} T=${tokens}: amx disagrees with a plain dot product (${maxRelError})`,
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
          rows.push(row);
          o.log(
            `[isa] ${m.name} ${op} T=${tokens}: amx ${(row.time.amx!.median * 1e3).toFixed(3)} ms (${row.amxGflops.median.toFixed(0)} GFLOP/s); avx512 x${row.vsAmx.avx512!.median.toFixed(2)}, avx512bf16 x${row.vsAmx.avx512bf16!.median.toFixed(2)}, torch-bf16 x${row.vsAmx["torch-bf16"]!.median.toFixed(2)}`,
          );
        }
      }
    }
  } finally {
    addon.configure({ isa: "auto", threads: o.threads });
    await worker.close(JSON.stringify({ cmd: "quit" }));
  }
  return { runs: o.runs, threads: o.threads, torch, rows };
}

const ratio = (s: Stats | undefined) => (s ? medianRange(s, 2) : "");

/** The suite's table for BENCHMARKS.md. */
export function isaTables(
  r: IsaResults & { date: string; commit: string; machine: ReturnType<typeof machineInfo> },
  source: string,
): string {
  const lines = r.rows.map(
    (row) =>
      `| ${row.model} | ${row.op} | ${row.tokens} | ${medianRange(
        {
          ...row.time.amx!,
          median: row.time.amx!.median * 1e3,
          min: row.time.amx!.min * 1e3,
          max: row.time.amx!.max * 1e3,
        },
        3,
      )} | ${row.amxGflops.median.toFixed(0)} | ${ratio(row.vsAmx.avx512)} | ${ratio(row.vsAmx.avx512bf16)} | ${ratio(row.vsAmx["torch-bf16"])} |`,
  );
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.threads} threads, torch ${String(r.torch["torch"])} (bf16 Linear, \`cpu_capability\` ${String(r.torch["cpu_capability"])}), ${r.runs} interleaved rounds; from \`${source}\`. Weights bf16, rotated over copies of at least 512 MiB (cold caches); x f32. Ratios are the other side's time over amx's, paired by round, median (min-max): above 1, amx is faster.

| model | op | tokens | amx ms | amx GFLOP/s | avx512 (default ISA) / amx | avx512bf16 / amx | torch bf16 / amx |
|---|---|---:|---:|---:|---:|---:|---:|
${lines.join("\n")}`;
}
