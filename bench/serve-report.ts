// The serve suite's tables and plot for BENCHMARKS.md (generated from its results JSON).

import { type Stats, stats } from "./lib.ts";
import {
  CONFIG_LABEL,
  type CpuSeconds,
  type LevelResult,
  type ServeConfig,
  type ServeResults,
} from "./serve.ts";

const f = (v: number, d = 1) => (Number.isFinite(v) ? v.toFixed(d) : "-");
const range = (s: Stats, d = 1) =>
  `${f(s.median, d)} (${f(s.min, d)}–${f(s.max, d)})${s.n > 1 && (s.max - s.min) / s.median > 0.25 ? " ‡" : ""}`;

const CONFIGS: ServeConfig[] = ["single-process", "distributed", "distributed-mb2"];
const COLORS: Record<ServeConfig, string> = {
  "single-process": "#3b6fb6",
  distributed: "#e0913a",
  "distributed-mb2": "#3a9e5c",
};

/** Per repetition, tokens/s of 2 micro-batches over 1 (repetitions ran back to back). */
function mbRatio(r: ServeResults, c: number): Stats {
  const one = r.levels.find((x) => x.config === "distributed" && x.concurrency === c);
  const two = r.levels.find((x) => x.config === "distributed-mb2" && x.concurrency === c);
  if (!one || !two) return stats([]);
  return stats(
    two.runs.map((t, i) => t.tokensPerSecond / (one.runs[i]?.tokensPerSecond ?? Number.NaN)),
  );
}

/** CPU ms per output token of a role (or of all the benchmark's processes), median over repetitions. */
function cpuMsPerToken(x: LevelResult | undefined, pick: (c: CpuSeconds) => number): number {
  if (!x) return Number.NaN;
  return stats(
    x.runs.flatMap((run) =>
      run.cpu && run.outputTokens > 0 ? [(pick(run.cpu) / run.outputTokens) * 1000] : [],
    ),
  ).median;
}

const cores = (x: LevelResult) =>
  x.cores
    ? `${f(x.cores.gateway, 2)} / ${x.config === "single-process" ? "-" : f(x.cores.shards, 2)} / ${f(x.cores.total, 2)} / ${f(x.machineBusy, 2)}`
    : "-";

export function serveTables(r: ServeResults, source: string, svg?: string): string {
  const p = r.peer;
  const concurrencies = [...new Set(r.levels.map((x) => x.concurrency))];
  const reqs = (x: LevelResult) => `${x.requests} × ${x.runs.length}`;
  const lines = [
    "### Serving: machine and run",
    "",
    "| | |",
    "| --- | --- |",
    `| CPU | ${r.machine.cpu}, ${r.machine.cores} cores${r.machine.hypervisor ? ", virtual machine" : ""}, shared with other work (load average ${r.machine.loadavgEnd?.map((v) => f(v, 1)).join(", ") ?? "-"} at the end) |`,
    `| model | ${r.model.name} (make-tiny-model --arch v3 --preset mini): hidden ${r.model.hiddenSize}, ${r.model.layers} layers, ${r.model.routedExperts} routed experts, top-${r.model.topK}, bf16 on disk |`,
    `| distributed | nats-server ${r.natsVersion} on loopback, ${r.shards} shard processes, gateway process (\`gateway --nats --plan\`, bf16 on the wire); the same shards serve a second gateway with \`--micro-batches 2\` |`,
    "| single-process | `gateway --local` (all gateways up at once, measured in turn) |",
    `| load | streaming chat completions over HTTP, fixed prompts, temperature 0, max_tokens ${r.maxTokens} with \`ignore_eos\` (every request generates exactly ${r.maxTokens} tokens) |`,
    `| method | ${r.repetitions} repetitions; each runs every level of every configuration, the configurations' order rotated per repetition; tokens/s: median (min–max) over repetitions; latencies: percentiles over the requests of all repetitions; cores busy: CPU seconds of the processes (/proc) / wall time, median over repetitions |`,
    `| run | ${r.date}, commit \`${r.commit}\`${r.dirty ? " (+ uncommitted changes)" : ""}, ${f(r.seconds, 0)} s; data: [${source.split("/").pop()}](${source}) |`,
    "",
    "### Batch 1 against Hugging Face transformers",
    "",
    `Peer: transformers ${p.transformers} \`generate\` (torch ${p.torch}), ${p.dtype}, ${p.threads} threads, greedy, ${p.newTokens} new tokens forced (min = max new tokens), prompt ${p.promptTokens} tokens (the same chat template), ${p.peerTokS.n} runs interleaved one to one with ours. Ours: the single-process gateway, one streaming request at a time, completion tokens / request time (HTTP and prefill included). Tokens/s, median (min–max); ‡ marks a spread over 25% of the median.`,
    "",
    "| ours tok/s | transformers tok/s | ours / transformers |",
    "| --- | --- | --- |",
    `| ${range(p.oursTokS)} | ${range(p.peerTokS)} | **${f(p.ratio, 2)}** |`,
    "",
    "### Throughput and latency against concurrency",
    "",
    `Output tok/s = completion tokens of a level's requests / its wall time, median (min–max) over ${r.repetitions} repetitions; ‡ marks a spread over 25% of the median. TTFT: request sent to first content chunk; ITL: gaps between content chunks (one per token, except where the gateway holds back text that could still be a stop string or an unfinished UTF-8 character); p50/p99 in ms over all requests of all repetitions. Cores busy, of ${r.machine.cores}: gateway / shards (all 4) / all processes of the benchmark (with nats-server and the load generator) / the whole machine (other people's work included).`,
    ...(svg ? ["", `![output tokens/s against concurrency](${svg})`] : []),
    "",
    "| config | concurrency | requests × reps | errors | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | cores busy |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ...concurrencies.flatMap((c) =>
      CONFIGS.flatMap((config) => {
        const x = r.levels.find((l) => l.config === config && l.concurrency === c);
        if (!x) return [];
        const errs =
          x.errors + x.short ? `${x.errors}${x.short ? ` (+${x.short} short)` : ""}` : "0";
        return [
          `| ${CONFIG_LABEL[config]} | ${c} | ${reqs(x)} | ${errs} | **${range(x.tokS)}** | ${f(x.ttftP50, 0)} | ${f(x.ttftP99, 0)} | ${f(x.itlP50)} | ${f(x.itlP99)} | ${cores(x)} |`,
        ];
      }),
    ),
    "",
    "### Two micro-batches against one (distributed)",
    "",
    "Tokens/s with `--micro-batches 2` / tokens/s with 1, per repetition (the two ran back to back), median (min–max); above 1: two micro-batches faster. At concurrency 1 there is one sequence and nothing to split. Expert round trips: per level, one per shard touched per MoE layer and micro-batch step; mean round trip as the gateway sees it. CPU ms per output token: CPU time of the gateway, of the 4 shards, and of all the benchmark's processes, / completion tokens, median over repetitions (less sensitive than tokens/s to other work on the machine, which takes cores but not our CPU time).",
    "",
    "| concurrency | 2 / 1 micro-batches | round trips, 1 → 2 | mean round trip ms, 1 → 2 | CPU ms/token gateway, 1 → 2 | shards, 1 → 2 | all, 1 → 2 |",
    "| --- | --- | --- | --- | --- | --- | --- |",
    ...concurrencies.map((c) => {
      const one = r.levels.find((x) => x.config === "distributed" && x.concurrency === c);
      const two = r.levels.find((x) => x.config === "distributed-mb2" && x.concurrency === c);
      const med = (
        x: LevelResult | undefined,
        pick: (d: { count: number; meanMs: number }) => number,
      ) =>
        x
          ? stats(x.runs.flatMap((run) => (run.dispatch ? [pick(run.dispatch)] : []))).median
          : Number.NaN;
      const cpu = (pick: (c: CpuSeconds) => number) =>
        `${f(cpuMsPerToken(one, pick))} → ${f(cpuMsPerToken(two, pick))}`;
      const trips = `${f(
        med(one, (d) => d.count),
        0,
      )} → ${f(
        med(two, (d) => d.count),
        0,
      )}`;
      const rt = `${f(med(one, (d) => d.meanMs))} → ${f(med(two, (d) => d.meanMs))}`;
      return `| ${c} | **${range(mbRatio(r, c), 2)}** | ${trips} | ${rt} | ${cpu((x) => x.gateway)} | ${cpu((x) => x.shards)} | ${cpu((x) => x.gateway + x.shards + x.nats + x.loadgen)} |`;
    }),
  ];
  return lines.join("\n");
}

const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;");

/** Output tokens/s against concurrency (log2 axis), one line per configuration, min–max whiskers. */
export function serveSvg(r: ServeResults): string {
  const width = 700;
  const height = 360;
  const left = 56;
  const right = 220;
  const top = 36;
  const bottom = 44;
  const cs = [...new Set(r.levels.map((x) => x.concurrency))].sort((a, b) => a - b);
  const maxY = Math.max(...r.levels.map((x) => x.tokS.max).filter(Number.isFinite), 1);
  const step = maxY > 200 ? 50 : maxY > 80 ? 20 : 10;
  const yTop = Math.ceil(maxY / step) * step;
  const lo = Math.log2(cs[0] ?? 1);
  const hi = Math.log2(cs.at(-1) ?? 2);
  const xOf = (c: number) =>
    left + ((Math.log2(c) - lo) / Math.max(1e-9, hi - lo)) * (width - left - right);
  const yOf = (v: number) => top + (1 - v / yTop) * (height - top - bottom);
  const out = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="11" role="img" aria-labelledby="title">`,
    `<title id="title">${esc(`Output tokens/s against concurrency, ${r.model.name}, ${r.machine.cores} cores, ${r.date}`)}</title>`,
    `<rect width="${width}" height="${height}" fill="#fff"/>`,
    `<text x="${left}" y="18" font-size="13" font-weight="bold">${esc(`Output tokens/s against concurrency (${r.model.name}, ${r.machine.cores} cores, ${r.date.slice(0, 10)})`)}</text>`,
  ];
  for (let v = 0; v <= yTop; v += step) {
    out.push(
      `<line x1="${left}" y1="${f(yOf(v))}" x2="${width - right}" y2="${f(yOf(v))}" stroke="#e4e4e4"/>`,
      `<text x="${left - 6}" y="${f(yOf(v) + 4)}" text-anchor="end">${v}</text>`,
    );
  }
  for (const c of cs) {
    out.push(
      `<line x1="${f(xOf(c))}" y1="${top}" x2="${f(xOf(c))}" y2="${height - bottom}" stroke="#f0f0f0"/>`,
      `<text x="${f(xOf(c))}" y="${height - bottom + 16}" text-anchor="middle">${c}</text>`,
    );
  }
  out.push(
    `<text x="${(left + width - right) / 2}" y="${height - 8}" text-anchor="middle">concurrent streaming requests (log scale)</text>`,
    `<text x="14" y="${(top + height - bottom) / 2}" text-anchor="middle" transform="rotate(-90 14 ${(top + height - bottom) / 2})">output tokens/s</text>`,
    `<line x1="${left}" y1="${height - bottom}" x2="${width - right}" y2="${height - bottom}" stroke="#000"/>`,
    `<line x1="${left}" y1="${top}" x2="${left}" y2="${height - bottom}" stroke="#000"/>`,
  );
  CONFIGS.forEach((config, k) => {
    const pts = cs.flatMap((c) => {
      const x = r.levels.find((l) => l.config === config && l.concurrency === c);
      return x && Number.isFinite(x.tokS.median) ? [{ c, s: x.tokS }] : [];
    });
    if (pts.length === 0) return;
    const color = COLORS[config];
    // Whiskers side by side so that they do not hide each other.
    const dx = (k - 1) * 4;
    out.push(
      `<polyline fill="none" stroke="${color}" stroke-width="2" points="${pts.map((p) => `${f(xOf(p.c) + dx)},${f(yOf(p.s.median))}`).join(" ")}"/>`,
    );
    for (const p of pts) {
      const x = f(xOf(p.c) + dx);
      out.push(
        `<line x1="${x}" y1="${f(yOf(p.s.min))}" x2="${x}" y2="${f(yOf(p.s.max))}" stroke="${color}"/>`,
        `<circle cx="${x}" cy="${f(yOf(p.s.median))}" r="3" fill="${color}"/>`,
      );
    }
    const ly = top + 10 + k * 18;
    out.push(
      `<line x1="${width - right + 14}" y1="${ly}" x2="${width - right + 34}" y2="${ly}" stroke="${color}" stroke-width="2"/>`,
      `<text x="${width - right + 40}" y="${ly + 4}">${esc(CONFIG_LABEL[config])}</text>`,
    );
  });
  out.push(
    `<text x="${width - right + 14}" y="${top + 70}" font-size="10" fill="#555">median of ${r.repetitions} repetitions;</text>`,
    `<text x="${width - right + 14}" y="${top + 83}" font-size="10" fill="#555">whiskers: min–max</text>`,
    "</svg>",
  );
  return `${out.join("\n")}\n`;
}
