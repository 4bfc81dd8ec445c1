// Turns benchmark results (bench/results/*.json) into the tables of BENCHMARKS.md and a
// plot. Only the generated sections (between the BEGIN/END markers) are rewritten; the
// hand-written method and analysis around them are kept.
//
//   node bench/report.ts [bench/results/kernels-<date>.json]   (default: the newest one)
//   node bench/report.ts --check [FILE]   exit 1 if BENCHMARKS.md is not what FILE generates

import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { basename, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import type { AutoscaleResults } from "./autoscale.ts";
import { autoscaleSvg, autoscaleTables } from "./autoscale-report.ts";
import { batchesTables } from "./batches.ts";
import { contextTables } from "./context.ts";
import { disaggTables } from "./disagg.ts";
import { diskReadTables } from "./disk-read.ts";
import { diskSharedTables } from "./disk-shared.ts";
import { type DispatchResults, dispatchTables } from "./dispatch-report.ts";
import { dtypeTables } from "./dtype.ts";
import { fetchTables } from "./fetch.ts";
import { frontTables } from "./front.ts";
import { invariantTables } from "./invariant.ts";
import { isaTables } from "./isa.ts";
import { jsonTables } from "./json.ts";
import type { KernelResults, RowResult, Side } from "./kernels.ts";
import { kvCacheTables } from "./kv-cache.ts";
import { formatLikeRepo, REPO_ROOT, RESULTS_DIR, type Stats, spread, stats } from "./lib.ts";
import { poolTables } from "./pool.ts";
import { prefixTables } from "./prefix.ts";
import { priorityTables } from "./priority.ts";
import { responsesTables } from "./responses.ts";
import { samplingTables } from "./sampling.ts";
import type { ServeResults } from "./serve.ts";
import { serveSvg, serveTables } from "./serve-report.ts";
import { speculativeTables } from "./speculative.ts";
import { tlsTables } from "./tls.ts";
import { tokenizeTables } from "./tokenize.ts";
import { tracingTables } from "./tracing.ts";

export const BENCHMARKS_MD = join(REPO_ROOT, "BENCHMARKS.md");
const BEGIN = (s: string) =>
  `<!-- BEGIN GENERATED ${s}: bench/report.ts from bench/results; do not edit -->`;
const END = (s: string) => `<!-- END GENERATED ${s} -->`;

/** Targets of the model-engine issue. */
export const TARGETS = { prefillSpeedup: 1.0, decodeBandwidthFraction: 0.7 };
/** A spread (max - min) / median above this marks a figure as noisy. */
const NOISY = 0.25;

// ------------------------------------------------------------------ formatting

function num(v: number | undefined, digits = 2): string {
  if (v === undefined || !Number.isFinite(v)) return "-";
  return v.toFixed(digits);
}

function range(s: Stats | undefined, digits = 2, scale = 1): string {
  if (!s || s.n === 0) return "-";
  const mark = s.n > 1 && spread(s) > NOISY ? " ‡" : "";
  return `${num(s.median * scale, digits)} (${num(s.min * scale, digits)}–${num(s.max * scale, digits)})${mark}`;
}

function ms(s: Stats | undefined): string {
  if (!s) return "-";
  const d = s.median >= 0.1 ? 0 : s.median >= 0.01 ? 1 : s.median >= 0.001 ? 2 : 3;
  return range(s, d, 1e3);
}

function mib(bytes: number): string {
  return bytes >= 1 << 20
    ? `${(bytes / (1 << 20)).toFixed(1)} MiB`
    : `${(bytes / 1024).toFixed(0)} KiB`;
}

function verdict(ok: boolean): string {
  return ok ? "met" : "**missed**";
}

const rowName = (r: RowResult) =>
  `${r.model} | ${r.op === "ffn" ? "expert FFN" : "matmul"} | ${r.tokens}`;

function table(head: string[], rows: string[][]): string {
  return [
    `| ${head.join(" | ")} |`,
    `|${head.map(() => "---").join("|")}|`,
    ...rows.map((r) => `| ${r.join(" | ")} |`),
  ].join("\n");
}

// ------------------------------------------------------------------ kernels

function torchBlasLine(res: KernelResults): string {
  const probes = res.software.torchKernels;
  const f32 = Object.entries(probes)
    .filter(([k]) => k.startsWith("f32"))
    .flatMap(([, v]) => v);
  const header = f32.find((l) => /MKL_VERBOSE oneMKL/.test(l));
  const cpuPath = header
    ? /for (Intel\(R\) 64 architecture )?(.*?),\s*Lnx/.exec(header)?.[2]
    : undefined;
  const sgemm = f32.some((l) => /SGEMM/.test(l));
  const bf16 = Object.entries(probes)
    .filter(([k]) => k.startsWith("bf16"))
    .flatMap(([, v]) => v);
  const bf16Kind = bf16.some((l) => /^onednn_verbose|^dnnl_verbose/i.test(l))
    ? "oneDNN"
    : bf16.some((l) => /MKL_VERBOSE.*GEMM/.test(l))
      ? "MKL bf16 gemm"
      : "ATen's own bf16 kernel (no oneDNN/MKL call: oneDNN bf16 needs AVX-512-BF16/AMX)";
  return `f32: ${sgemm ? "MKL SGEMM" : "?"}${cpuPath ? ` (MKL code path: "${cpuPath}")` : ""}; bf16: ${bf16Kind}`;
}

function machineTable(res: KernelResults, source: string): string {
  const m = res.machine;
  const t = res.software.torch as {
    torch?: string;
    cpu_capability?: string;
    numpy?: string;
    numpy_blas?: { corename?: string; config?: string };
  };
  const l = res.limits;
  const lines: [string, string][] = [
    [
      "CPU",
      `${m.cpu} (${m.vendor} family ${m.family} model ${m.model}), ${m.cores} cores${m.hypervisor ? ", virtual machine" : ""}; ${m.simd.join(" ")}; L2 ${m.l2Bytes ? mib(m.l2Bytes) : "?"}/core, L3 ${m.l3Bytes ? mib(m.l3Bytes) : "?"}; ${(m.memBytes / 2 ** 30).toFixed(0)} GiB`,
    ],
    [
      "threads",
      `${res.method.threads} for every side (ours, PyTorch, numpy) and for the limit loops`,
    ],
    [
      "ours",
      `shards/build/expertmesh.node via its JS API, ISA \`${res.software.addon.isa}\` (available: ${res.software.addon.availableIsas.join(", ")}), Node ${res.software.node}`,
    ],
    [
      "PyTorch",
      `${t.torch ?? "?"}, CPU capability ${t.cpu_capability ?? "?"}; ${torchBlasLine(res)}`,
    ],
    [
      "numpy (diagnostic)",
      `${t.numpy ?? "?"}, ${t.numpy_blas?.config ?? "?"}, kernel core \`${t.numpy_blas?.corename ?? "?"}\``,
    ],
    [
      "memory bandwidth",
      `read ${range(l.membw.read, 1)} GB/s, copy ${range(l.membw.copy, 1)} GB/s (${l.membw.arrayMiB} MiB arrays, passes before and after the rows); per-round samples (${res.method.limitsArrayMiB} MiB): read ${range(l.rounds.read, 1)}, copy ${range(l.rounds.copy, 1)}`,
    ],
    [
      "FMA peak",
      `${range(l.fma.gflops, 0)} GFLOP/s (register-only ${l.fma.vector} FMA loop, before and after); per-round samples ${range(l.rounds.fma, 0)}`,
    ],
    [
      "load average (1/5/15 min)",
      `${m.loadavgStart.join(" / ")} at start, ${m.loadavgEnd?.join(" / ") ?? "?"} at end (other work shares this machine)`,
    ],
    [
      "run",
      `${res.date.slice(0, 16).replace("T", " ")} UTC, commit \`${res.commit}\`${res.dirty ? " (+ uncommitted changes)" : ""}, ${res.method.runs} counted runs per row, ${res.seconds.toFixed(0)} s in all${res.quick ? ", **--quick**" : ""}; data: [${basename(source)}](${source})`,
    ],
  ];
  return table(
    ["", ""],
    lines.map(([k, v]) => [k, v]),
  );
}

function speedTable(res: KernelResults): string {
  const rows = res.rows.map((r) => {
    const sp = r.speedup;
    const f32 = sp["torch-f32"]?.median;
    const bf = sp["torch-bf16"]?.median;
    let target = "-";
    if (r.phase === "prefill") {
      target = `${verdict((f32 ?? 0) >= TARGETS.prefillSpeedup)} vs fp32, ${verdict((bf ?? 0) >= TARGETS.prefillSpeedup)} vs bf16`;
    }
    return [
      rowName(r),
      r.phase,
      ms(r.sides["ours-bf16"]?.time),
      ms(r.sides["torch-f32"]?.time),
      `**${range(sp["torch-f32"])}**`,
      ms(r.sides["torch-bf16"]?.time),
      range(sp["torch-bf16"]),
      target,
    ];
  });
  return table(
    [
      "model",
      "op",
      "tokens",
      "phase",
      "ours ms (bf16 W)",
      "torch fp32 ms",
      "speedup vs torch fp32",
      "torch bf16 ms",
      "speedup vs torch bf16",
      `target ≥ ${TARGETS.prefillSpeedup.toFixed(1)}x (prefill)`,
    ],
    rows,
  );
}

function bandwidthTable(res: KernelResults): string {
  const rows = res.rows
    .filter((r) => r.phase === "decode")
    .map((r) => {
      const b = r.bandwidth;
      const ours = b["ours-bf16"];
      return [
        rowName(r),
        mib(r.sides["ours-bf16"]?.weightBytes ?? 0),
        range(ours?.gbs, 1),
        `**${range(ours?.ofRead)}**`,
        range(ours?.ofCopy),
        range(b["torch-bf16"]?.gbs, 1),
        `${range(b["torch-f32"]?.gbs, 1)} = ${num(b["torch-f32"]?.ofRead.median)}`,
        b["ours-f32"]
          ? `${range(b["ours-f32"]?.gbs, 1)} = ${num(b["ours-f32"]?.ofRead.median)}`
          : "-",
        b["ours-bf16-hot"] ? range(b["ours-bf16-hot"]?.gbs, 1) : "-",
        num(r.ceilingOfRead),
        verdict((ours?.ofRead.median ?? 0) >= TARGETS.decodeBandwidthFraction),
      ];
    });
  return table(
    [
      "model",
      "op",
      "tokens",
      "weights/call (bf16)",
      "ours GB/s",
      "ours / read BW",
      "ours / copy BW",
      "torch bf16 GB/s",
      "torch fp32 GB/s = / read BW",
      "ours fp32 W GB/s = / read BW",
      "ours, one copy (cached if it fits), GB/s",
      "roofline ceiling / read BW",
      `target ≥ ${TARGETS.decodeBandwidthFraction} of read BW`,
    ],
    rows,
  );
}

function computeTable(res: KernelResults): string {
  const rows = res.rows.map((r) => {
    const c = r.compute;
    const ratio = (a: Side, b: Side) => {
      const x = r.sides[a]?.time.median;
      const y = r.sides[b]?.time.median;
      return x && y ? num(x / y) : "-";
    };
    return [
      rowName(r),
      num(r.flops / 1e9, 3),
      `${range(c["ours-bf16"]?.gflops, 1)} = **${num(c["ours-bf16"]?.ofPeak.median)}**`,
      c["ours-f32"]
        ? `${num(c["ours-f32"]?.gflops.median, 1)} = ${num(c["ours-f32"]?.ofPeak.median)}`
        : "-",
      ratio("ours-bf16", "ours-f32"),
      `${num(c["torch-f32"]?.gflops.median, 1)} = ${num(c["torch-f32"]?.ofPeak.median)}`,
      `${num(c["torch-bf16"]?.gflops.median, 1)} = ${num(c["torch-bf16"]?.ofPeak.median)}`,
      c["numpy-f32"]
        ? `${num(c["numpy-f32"]?.gflops.median, 1)} = ${num(c["numpy-f32"]?.ofPeak.median)}`
        : "-",
    ];
  });
  return table(
    [
      "model",
      "op",
      "tokens",
      "GFLOP/call",
      "ours bf16 W GFLOP/s = / FMA peak",
      "ours fp32 W",
      "time bf16 W / fp32 W",
      "torch fp32",
      "torch bf16",
      "numpy fp32 (OpenBLAS)",
    ],
    rows,
  );
}

function numpyTable(res: KernelResults): string | undefined {
  if (!res.rows.some((r) => r.sides["numpy-f32"])) return undefined;
  const rows = res.rows
    .filter((r) => r.sides["numpy-f32"])
    .map((r) => [
      rowName(r),
      range(r.speedup["numpy-f32"]),
      range(r.speedup["ours-f32"]),
      num((r.sides["numpy-f32"]?.time.median ?? 0) / (r.sides["torch-f32"]?.time.median ?? 1)),
    ]);
  return table(
    [
      "model",
      "op",
      "tokens",
      "speedup vs numpy fp32",
      "speedup vs ours fp32 W",
      "numpy time / torch fp32 time",
    ],
    rows,
  );
}

/**
 * Ours as `--cpu-matmul bf16` runs it against torch bf16, like for like (both round x to
 * bf16), and against ours by default: ratios paired by round from the speedups against the
 * subject (side / ours-bf16 each round).
 */
function matmulBf16Table(res: KernelResults): string | undefined {
  const side = "ours-matmul-bf16" as const;
  if (!res.rows.some((r) => r.sides[side])) return undefined;
  const per = (r: RowResult, f: (x: number, i: number) => number) =>
    stats(r.speedup[side]!.values.map(f));
  const rows = res.rows
    .filter((r) => r.sides[side])
    .map((r) => [
      rowName(r),
      ms(r.sides[side]?.time),
      `${num(r.compute[side]?.gflops.median, 1)} = ${num(r.compute[side]?.ofPeak.median)}`,
      range(per(r, (x, i) => r.speedup["torch-bf16"]!.values[i]! / x)),
      range(per(r, (x) => 1 / x)),
    ]);
  return table(
    [
      "model",
      "op",
      "tokens",
      "ours --cpu-matmul bf16 ms",
      "GFLOP/s = / FMA peak",
      "speedup vs torch bf16",
      "speedup vs ours (default)",
    ],
    rows,
  );
}

function summary(res: KernelResults): string {
  const prefill = res.rows.filter((r) => r.phase === "prefill");
  const decode = res.rows.filter((r) => r.phase === "decode");
  const pf32 = prefill.filter(
    (r) => (r.speedup["torch-f32"]?.median ?? 0) >= TARGETS.prefillSpeedup,
  );
  const pbf = prefill.filter(
    (r) => (r.speedup["torch-bf16"]?.median ?? 0) >= TARGETS.prefillSpeedup,
  );
  const dbw = decode.filter(
    (r) => (r.bandwidth["ours-bf16"]?.ofRead.median ?? 0) >= TARGETS.decodeBandwidthFraction,
  );
  const dbwCopy = decode.filter(
    (r) => (r.bandwidth["ours-bf16"]?.ofCopy.median ?? 0) >= TARGETS.decodeBandwidthFraction,
  );
  const noisy = res.rows.filter((r) => r.noisy).length;
  return [
    `- Prefill, ≥ ${TARGETS.prefillSpeedup.toFixed(1)}x PyTorch: ${pf32.length} of ${prefill.length} rows against torch fp32, ${pbf.length} of ${prefill.length} against torch bf16.`,
    `- Decode, ≥ ${TARGETS.decodeBandwidthFraction} of measured memory bandwidth: ${dbw.length} of ${decode.length} rows against the read bandwidth, ${dbwCopy.length} of ${decode.length} against the copy bandwidth.`,
    `- ${noisy} of ${res.rows.length} rows had a side whose min–max spread exceeded ${NOISY * 100}% of its median (marked ‡ where a figure is that wide): the machine was shared.`,
  ].join("\n");
}

/** Markdown of the kernel results (the generated section of BENCHMARKS.md). */
export function kernelTables(res: KernelResults, source: string, plot?: string): string {
  const parts = [
    `### Kernels: machine, limits and run`,
    "",
    machineTable(res, source),
    "",
    `### Summary against the targets`,
    "",
    summary(res),
    "",
    `### Speed against PyTorch`,
    "",
    "Per call, median (min–max) over the counted runs. Speedup = PyTorch time / ours, taken per round (the sides alternate, so each round's pair saw the same machine), then median (min–max) over rounds; above 1 ours is faster. ‡ = min–max wider than 25% of the median.",
    "",
    speedTable(res),
    "",
  ];
  if (plot) parts.push(`![speedup against PyTorch](${plot})`, "");
  parts.push(
    `### Decode: weight streaming against memory bandwidth`,
    "",
    'Weight bytes one call reads / time per call; the fraction divides by the bandwidth sample taken in the same round (read = a 4-stream read loop, what streaming weights is; copy = memcpy, bytes read + written, as STREAM counts). Weights rotate over copies of ≥ 256 MiB in all, so every call reads them from memory, as a shard does. "one copy": ours without the rotation, so weights that fit in the L3 stay there between calls (a kernel that is no faster then is not limited by memory; meaningful only where the weights are well under the L3 size: the V2-Lite matmul). Roofline ceiling = FMA peak / (FLOP per weight byte) / read bandwidth, capped at 1: the best fraction any kernel could reach at that batch on this machine.',
    "",
    bandwidthTable(res),
    "",
    `### Compute against the FMA peak`,
    "",
    'FLOP = 2·M·N·K per matmul (3 matmuls per expert FFN); the fraction divides by the FMA-loop sample of the same round. "ours fp32 W" is our kernel with the same weights widened to fp32: the gap to bf16 is the cost of converting bf16 in the kernel.',
    "",
    computeTable(res),
    "",
  );
  const mb = matmulBf16Table(res);
  if (mb) {
    parts.push(
      `### Ours with \`--cpu-matmul bf16\` against torch bf16`,
      "",
      `The same rows with our CPU kernels for \`--cpu-matmul bf16\` (${res.method.matmulBf16Isa}: x rounded to bf16, as torch's bf16 Linear does), in the same rounds. Speedups are paired by round; above 1 ours is faster. A bf16 dot product does two multiply-adds per fp32 lane, so this side's ceiling is about twice the FMA peak.`,
      "",
      mb,
      "",
    );
  }
  const np = numpyTable(res);
  if (np) {
    parts.push(
      `### Diagnostics: a second fp32 reference`,
      "",
      "numpy's matmul on its bundled OpenBLAS, same threads, same rounds: tells whether torch's MKL runs a slow path on this CPU.",
      "",
      np,
      "",
    );
  }
  return parts.join("\n");
}

// ------------------------------------------------------------------ plot

/** A horizontal bar chart (SVG) of the speedups against torch fp32 and bf16, log scale. */
export function speedupSvg(res: KernelResults): string {
  const rows = res.rows;
  const barH = 9;
  const rowH = 2 * barH + 8;
  const left = 150;
  const width = 760;
  const plotW = width - left - 20;
  const top = 40;
  const height = top + rows.length * rowH + 40;
  const lo = Math.log10(0.2);
  const hi = Math.log10(50);
  const xOf = (v: number) =>
    Math.round(
      (left + ((Math.log10(Math.min(Math.max(v, 0.2), 50)) - lo) / (hi - lo)) * plotW) * 10,
    ) / 10;
  const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;");
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="11" role="img" aria-labelledby="title">`,
    `<title id="title">Speedup of expertmesh's CPU kernels over PyTorch, per shape and batch</title>`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="10" y="16" font-size="13">Speedup of ours (bf16 weights) over PyTorch CPU, ${esc(res.machine.cpu)}, ${res.method.threads} threads, ${res.date.slice(0, 10)}, ${res.commit}</text>`,
    `<rect x="${left}" y="24" width="10" height="8" fill="#3b6fb6"/><text x="${left + 14}" y="32">vs torch fp32</text>`,
    `<rect x="${left + 110}" y="24" width="10" height="8" fill="#e0913a"/><text x="${left + 124}" y="32">vs torch bf16</text>`,
    `<text x="${left + 220}" y="32">whiskers: min–max over rounds; log scale; right of 1x = ours faster</text>`,
  ];
  for (const t of [0.2, 0.5, 1, 2, 5, 10, 20, 50]) {
    const x = xOf(t);
    out.push(
      `<line x1="${x}" y1="${top - 4}" x2="${x}" y2="${height - 34}" stroke="${t === 1 ? "#000" : "#ddd"}" stroke-width="${t === 1 ? 1.5 : 1}"/>`,
      `<text x="${x}" y="${height - 20}" text-anchor="middle">${t}x</text>`,
    );
  }
  rows.forEach((r, i) => {
    const y = top + i * rowH;
    out.push(
      `<text x="${left - 6}" y="${y + barH + 4}" text-anchor="end">${esc(`${r.model} ${r.op === "ffn" ? "FFN" : "matmul"} T=${r.tokens}`)}</text>`,
    );
    (["torch-f32", "torch-bf16"] as const).forEach((side, j) => {
      const s = r.speedup[side];
      if (!s) return;
      const yy = y + j * barH;
      const x0 = xOf(1);
      const x1 = xOf(s.median);
      out.push(
        `<rect x="${Math.min(x0, x1)}" y="${yy}" width="${Math.max(1, Math.abs(x1 - x0))}" height="${barH - 1}" fill="${j === 0 ? "#3b6fb6" : "#e0913a"}"/>`,
        `<line x1="${xOf(s.min)}" y1="${yy + barH / 2}" x2="${xOf(s.max)}" y2="${yy + barH / 2}" stroke="#222"/>`,
        `<text x="${Math.max(x0, x1) + 4}" y="${yy + barH - 1}" font-size="9">${s.median.toFixed(2)}</text>`,
      );
    });
  });
  out.push("</svg>");
  return `${out.join("\n")}\n`;
}

// ------------------------------------------------------------------ BENCHMARKS.md

/** Used only when BENCHMARKS.md does not exist yet; the real header is hand-written there. */
const DEFAULT_HEADER =
  "# Benchmarks\n\nGenerated sections below come from `npm run bench` (bench/run.ts, bench/report.ts).\n";

function replaceSection(doc: string, name: string, body: string): string {
  const begin = BEGIN(name);
  const end = END(name);
  const block = `${begin}\n\n${body.trim()}\n\n${end}`;
  const i = doc.indexOf(begin);
  const j = doc.indexOf(end);
  if (i >= 0 && j > i) return doc.slice(0, i) + block + doc.slice(j + end.length);
  return `${doc.trimEnd()}\n\n${block}\n`;
}

/** The newest results file of a suite (full runs only: *.tmp.json are skipped). */
export function newestResults(suite: string): string | undefined {
  if (!existsSync(RESULTS_DIR)) return undefined;
  const files = readdirSync(RESULTS_DIR)
    .filter((f) => f.startsWith(`${suite}-`) && f.endsWith(".json") && !f.endsWith(".tmp.json"))
    .sort();
  const last = files[files.length - 1];
  return last ? join(RESULTS_DIR, last) : undefined;
}

/** The suites with a section in BENCHMARKS.md, in the order bench/run.ts runs them. */
export const SUITES = [
  "kernels",
  "dispatch",
  "serve",
  "autoscale",
  "tokenize",
  "prefix",
  "sampling",
  "json",
  "speculative",
  "kvcache",
  "pool",
  "dtype",
  "priority",
  "isa",
  "diskread",
  "diskshared",
  "invariant",
  "front",
  "disagg",
  "tracing",
  "tls",
  "fetch",
  "batches",
  "responses",
  "context",
] as const;
export type Suite = (typeof SUITES)[number];

/** A results file per suite (absent: that section is left as it is). */
export type SuiteFiles = { [S in Suite]?: string | undefined };

/** The section of each suite that is its tables alone: results file JSON -> Markdown. */
export const TABLES_ONLY: Record<
  | "tokenize"
  | "prefix"
  | "json"
  | "sampling"
  | "speculative"
  | "kvcache"
  | "pool"
  | "dtype"
  | "priority"
  | "isa"
  | "diskread"
  | "diskshared"
  | "invariant"
  | "front"
  | "disagg"
  | "tracing"
  | "tls"
  | "fetch"
  | "batches"
  | "responses"
  | "context",
  (results: never, source: string) => string
> = {
  tokenize: tokenizeTables,
  prefix: prefixTables,
  json: jsonTables,
  sampling: samplingTables,
  speculative: speculativeTables,
  kvcache: kvCacheTables,
  pool: poolTables,
  priority: priorityTables,
  dtype: dtypeTables,
  isa: isaTables,
  diskread: diskReadTables,
  diskshared: diskSharedTables,
  invariant: invariantTables,
  front: frontTables,
  disagg: disaggTables,
  tracing: tracingTables,
  tls: tlsTables,
  fetch: fetchTables,
  batches: batchesTables,
  responses: responsesTables,
  context: contextTables,
};

/** What BENCHMARKS.md should be, given result files per suite. */
export function renderBenchmarksMd(
  files: SuiteFiles,
  current?: string,
): {
  md: string;
  svgs: { path: string; text: string }[];
} {
  let doc =
    current ?? (existsSync(BENCHMARKS_MD) ? readFileSync(BENCHMARKS_MD, "utf8") : DEFAULT_HEADER);
  const svgs: { path: string; text: string }[] = [];
  if (files.kernels) {
    const res = JSON.parse(readFileSync(files.kernels, "utf8")) as KernelResults;
    const svgPath = join(RESULTS_DIR, "kernels-speedup.svg");
    svgs.push({ path: svgPath, text: speedupSvg(res) });
    doc = replaceSection(
      doc,
      "kernels",
      kernelTables(res, relative(REPO_ROOT, files.kernels), relative(REPO_ROOT, svgPath)),
    );
  }
  if (files.dispatch) {
    const res = JSON.parse(readFileSync(files.dispatch, "utf8")) as DispatchResults;
    doc = replaceSection(doc, "dispatch", dispatchTables(res, relative(REPO_ROOT, files.dispatch)));
  }
  if (files.serve) {
    const res = JSON.parse(readFileSync(files.serve, "utf8")) as ServeResults;
    const svgPath = join(RESULTS_DIR, "serve-throughput.svg");
    svgs.push({ path: svgPath, text: serveSvg(res) });
    doc = replaceSection(
      doc,
      "serve",
      serveTables(res, relative(REPO_ROOT, files.serve), relative(REPO_ROOT, svgPath)),
    );
  }
  if (files.autoscale) {
    const res = JSON.parse(readFileSync(files.autoscale, "utf8")) as AutoscaleResults & {
      date: string;
      commit: string;
    };
    const svgPath = join(RESULTS_DIR, "autoscale-step.svg");
    svgs.push({ path: svgPath, text: autoscaleSvg(res.steps[0]!, 64, 2000) });
    doc = replaceSection(
      doc,
      "autoscale",
      `Run ${res.date} at ${res.commit.slice(0, 7)} from \`${relative(REPO_ROOT, files.autoscale)}\` (a deterministic simulation: the same commit gives the same figures on any machine).\n\n![Replicas and queue depth over time](${relative(REPO_ROOT, svgPath)})\n\n${autoscaleTables(res)}`,
    );
  }
  // The suites whose section is their tables alone.
  for (const [suite, tables] of Object.entries(TABLES_ONLY)) {
    const file = files[suite as keyof typeof TABLES_ONLY];
    if (!file) continue;
    const res = JSON.parse(readFileSync(file, "utf8")) as never;
    doc = replaceSection(doc, suite, tables(res, relative(REPO_ROOT, file)));
  }
  doc = formatLikeRepo(doc, BENCHMARKS_MD);
  return { md: doc, svgs };
}

export function updateBenchmarksMd(files: SuiteFiles): string {
  const { md, svgs } = renderBenchmarksMd(files);
  writeFileSync(BENCHMARKS_MD, md);
  for (const svg of svgs) writeFileSync(svg.path, svg.text);
  return BENCHMARKS_MD;
}

// ------------------------------------------------------------------ CLI

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const args = process.argv.slice(2);
  const check = args.includes("--check");
  const file = args.find((a) => !a.startsWith("--")) ?? newestResults("kernels");
  if (!file) {
    console.error("no bench/results/kernels-*.json yet: run `npm run bench` first");
    process.exit(1);
  }
  // Every suite's newest results, the kernels' possibly chosen on the command line.
  const files: SuiteFiles = Object.fromEntries(
    SUITES.map((suite) => [suite, suite === "kernels" ? file : newestResults(suite)]),
  );
  if (check) {
    const { md, svgs } = renderBenchmarksMd(files);
    const have = existsSync(BENCHMARKS_MD) ? readFileSync(BENCHMARKS_MD, "utf8") : "";
    const svgOk = svgs.every(
      (svg) => existsSync(svg.path) && readFileSync(svg.path, "utf8") === svg.text,
    );
    if (md !== have || !svgOk) {
      console.error(
        `BENCHMARKS.md is not what ${relative(REPO_ROOT, file)} generates: run node bench/report.ts`,
      );
      process.exit(1);
    }
    console.error(`BENCHMARKS.md matches ${relative(REPO_ROOT, file)}`);
  } else {
    updateBenchmarksMd(files);
    console.error(
      `BENCHMARKS.md regenerated from ${Object.values(files)
        .filter((f) => f !== undefined)
        .map((f) => relative(REPO_ROOT, f))
        .join(", ")}`,
    );
  }
}
