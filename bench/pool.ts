// The pool suite: what the native engine's thread pool costs a decode-sized call, with the
// other cores idle and with each of them held by a busy process (a shared machine, or a
// shard beside other work). Ours on all threads against the peer that sets the bar: the same
// call on one thread, in the same run, alternating. A pool that waits for every worker to
// check in pays for a descheduled worker in full (it did before 2026-11-30: 110-130 µs per
// loop on 2 vCPUs); one that returns once the items are done should cost no more than one
// thread when the others are busy.
//
// Calls: y[1, N] = x[1, K] w[N, K]^T through the addon (matmul, f32 and bf16 weights), at a
// small decode shape and at DeepSeek-V2-Lite's expert shapes; each sample times enough calls
// for about 100 ms.
import { spawn } from "node:child_process";
import { availableParallelism } from "node:os";
import { loadAddon } from "../src/engine/native.ts";
import { float32ToBf16 } from "../src/model/floats.ts";
import { medianRange, type Stats, stats } from "./lib.ts";

interface Shape {
  name: string;
  n: number;
  k: number;
  dtype: "f32" | "bf16";
}

const SHAPES: Shape[] = [
  { name: "small decode matmul", n: 512, k: 1024, dtype: "f32" },
  { name: "V2-Lite expert up (1408 x 2048)", n: 1408, k: 2048, dtype: "bf16" },
  { name: "V2-Lite expert down (2048 x 1408)", n: 2048, k: 1408, dtype: "bf16" },
];

export interface PoolRow {
  shape: Shape;
  /** "idle": nothing else runs; "busy": a spinning process per core beyond the first. */
  others: "idle" | "busy";
  /** Microseconds per call on every thread, and on one. */
  poolUs: Stats;
  oneUs: Stats;
}

export interface PoolResults {
  runs: number;
  threads: number;
  rows: PoolRow[];
}

export async function runPool(o: {
  threads: number;
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<PoolResults> {
  const addon = loadAddon();
  const threads = Math.max(2, o.threads || availableParallelism());
  const shapes = o.quick ? SHAPES.slice(0, 1) : SHAPES;
  const rows: PoolRow[] = [];
  for (const others of ["idle", "busy"] as const) {
    // One spinning process per core the pool's workers would use.
    const spinners =
      others === "busy"
        ? Array.from({ length: threads - 1 }, () =>
            spawn(process.execPath, ["-e", "for (;;) {}"], { stdio: "ignore" }),
          )
        : [];
    try {
      if (spinners.length) await new Promise((r) => setTimeout(r, 300));
      for (const shape of shapes) {
        const x = new Float32Array(shape.k).map((_, i) => Math.sin(i));
        const f32 = new Float32Array(shape.n * shape.k).map((_, i) => Math.cos(i) * 0.01);
        const data = shape.dtype === "f32" ? f32 : Uint16Array.from(f32, (v) => float32ToBf16(v));
        const w = { data, dtype: shape.dtype, shape: [shape.n, shape.k] };
        const time = (t: number): number => {
          addon.configure({ threads: t });
          addon.matmul(x, 1, w); // warm
          const t0 = performance.now();
          let calls = 0;
          while (performance.now() - t0 < 100) {
            addon.matmul(x, 1, w);
            calls++;
          }
          return ((performance.now() - t0) * 1000) / calls;
        };
        const pool: number[] = [];
        const one: number[] = [];
        for (let run = 0; run < o.runs; run++) {
          pool.push(time(threads));
          one.push(time(1));
        }
        const row = { shape, others, poolUs: stats(pool), oneUs: stats(one) };
        o.log(
          `[bench] pool ${shape.name}, others ${others}: ${threads} threads ${row.poolUs.median.toFixed(1)} µs, ` +
            `1 thread ${row.oneUs.median.toFixed(1)} µs`,
        );
        rows.push(row);
      }
    } finally {
      for (const s of spinners) s.kill("SIGKILL");
      addon.configure({ threads: 0 });
    }
  }
  return { runs: o.runs, threads, rows };
}

/** The suite's table for BENCHMARKS.md. */
export function poolTables(
  r: PoolResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const us = (s: Stats) => medianRange(s, 1);
  const rows = r.rows
    .map(
      (x) =>
        `| ${x.shape.name} | ${x.shape.dtype} | ${x.others} | ${us(x.poolUs)} | ${us(x.oneUs)} | ${(x.oneUs.median / x.poolUs.median).toFixed(2)}x |`,
    )
    .join("\n");
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs); ${r.runs} samples per side of about 100 ms each, sides alternating; from \`${source}\`. Microseconds per call, medians (min-max). "busy": a spinning process per core beyond the first while it runs.

| call (1 token) | weights | other cores | ours, ${r.threads} threads | ours, 1 thread (peer) | speedup of the pool |
|---|---|---|---:|---:|---:|
${rows}`;
}
