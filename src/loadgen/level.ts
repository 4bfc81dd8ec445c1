// A benchmark level: `requests` requests sent with at most `concurrency` in flight, started as
// fast as slots free up (closed loop) or at Poisson arrivals of `rate` per second (open loop,
// vLLM's --request-rate with --max-concurrency); and what a level's results add up to.
import { Prng } from "../model/prng.ts";
import { type RequestOptions, type RequestResult, send, type Target } from "./client.ts";

export interface LevelSpec {
  readonly concurrency: number;
  /** Requests per second (Poisson arrivals); Infinity sends whenever a slot is free. */
  readonly rate: number;
  readonly requests: number;
}

/**
 * When each of `n` requests arrives, in ms after the start: Poisson arrivals at `rate` per
 * second (exponential gaps drawn from `seed`), all at 0 when `rate` is Infinity.
 */
export function arrivalOffsetsMs(n: number, rate: number, seed: number): number[] {
  if (rate === Number.POSITIVE_INFINITY) return new Array<number>(n).fill(0);
  const prng = new Prng(seed, "arrivals");
  const out: number[] = [];
  let t = 0;
  for (let i = 0; i < n; i++) {
    out.push(t);
    t += (-Math.log(prng.uniform()) / rate) * 1000;
  }
  return out;
}

export interface LevelRun {
  readonly results: RequestResult[];
  readonly wallSeconds: number;
  /** `stop` fired before every request settled: the results are partial. */
  readonly interrupted?: boolean;
}

/**
 * Runs one level. Request i gets `request(i)`'s prompt and options; `onSettled` is called as
 * each request ends. A request still waiting for a slot after its arrival time waits (the
 * level then measures the server at `concurrency`, as vLLM's --max-concurrency does).
 * `stop` (Ctrl-C) sends nothing more and cancels the requests in flight, which are left out.
 */
export async function runLevel(
  target: Target,
  spec: LevelSpec,
  request: (i: number) => RequestOptions,
  o: {
    seed?: number;
    timeoutMs?: number;
    onSettled?: (r: RequestResult) => void;
    stop?: AbortSignal;
  } = {},
): Promise<LevelRun> {
  const arrivals = arrivalOffsetsMs(spec.requests, spec.rate, o.seed ?? 0);
  const results: RequestResult[] = [];
  const t0 = performance.now();
  const stop = o.stop;
  const stopped = stop
    ? new Promise<void>((r) => stop.addEventListener("abort", () => r(), { once: true }))
    : new Promise<void>(() => {});
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(spec.concurrency, spec.requests) }, async () => {
      while (next < spec.requests && !stop?.aborted) {
        const i = next++;
        const wait = t0 + arrivals[i]! - performance.now();
        if (wait > 0) {
          let timer: NodeJS.Timeout | undefined;
          await Promise.race([new Promise((r) => (timer = setTimeout(r, wait))), stopped]);
          clearTimeout(timer);
          if (stop?.aborted) break;
        }
        const signals = [
          ...(o.timeoutMs ? [AbortSignal.timeout(o.timeoutMs)] : []),
          ...(stop ? [stop] : []),
        ];
        const signal = signals.length > 1 ? AbortSignal.any(signals) : signals[0];
        const r = await send(target, { ...request(i), ...(signal ? { signal } : {}) });
        if (stop?.aborted) break;
        results.push(r);
        o.onSettled?.(r);
      }
    }),
  );
  return {
    results,
    wallSeconds: (performance.now() - t0) / 1000,
    ...(stop?.aborted ? { interrupted: true } : {}),
  };
}

/** Mean and percentiles of a latency, in ms (NaN when there are no samples). */
export interface Distribution {
  mean: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

/** The p-th percentile of `values` by linear interpolation between ranks (numpy's default). */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const s = [...values].sort((a, b) => a - b);
  const at = (p / 100) * (s.length - 1);
  const lo = Math.floor(at);
  const hi = Math.min(s.length - 1, lo + 1);
  return s[lo]! + (s[hi]! - s[lo]!) * (at - lo);
}

export function distribution(values: readonly number[]): Distribution {
  const finite = values.filter(Number.isFinite);
  return {
    mean: finite.length ? finite.reduce((a, b) => a + b, 0) / finite.length : Number.NaN,
    p50: percentile(finite, 50),
    p90: percentile(finite, 90),
    p99: percentile(finite, 99),
    max: finite.length ? Math.max(...finite) : Number.NaN,
  };
}

/**
 * Service-level objectives of a request, in ms (vLLM's --goodput): a succeeded request meets
 * them when its TTFT, TPOT and end-to-end time are each at most the one given.
 */
export interface Slo {
  ttft?: number;
  tpot?: number;
  e2e?: number;
}

/** Whether a succeeded request meets every objective in `slo`. */
export function meetsSlo(r: RequestResult, slo: Slo): boolean {
  const tpot = r.outputTokens > 1 ? (r.e2eMs - r.ttftMs) / (r.outputTokens - 1) : 0;
  return (
    r.ok &&
    (slo.ttft === undefined || r.ttftMs <= slo.ttft) &&
    (slo.tpot === undefined || tpot <= slo.tpot) &&
    (slo.e2e === undefined || r.e2eMs <= slo.e2e)
  );
}

export interface LevelSummary {
  concurrency: number;
  /** Requests per second asked for; null for as fast as slots free up. */
  rate: number | null;
  requests: number;
  succeeded: number;
  failed: number;
  /** Failures by kind, most frequent first: how many requests each ended, and one's message. */
  errors: { kind: string; count: number; example: string }[];
  wallSeconds: number;
  /** Succeeded requests per second of wall time. */
  requestsPerSecond: number;
  /** With objectives: the requests that met them, and those per second of wall time. */
  goodRequests?: number;
  goodputRequestsPerSecond?: number;
  /** Output tokens of succeeded requests per second of wall time. */
  outputTokensPerSecond: number;
  /** Prompt and output tokens of succeeded requests per second of wall time. */
  totalTokensPerSecond: number;
  promptTokens: number;
  outputTokens: number;
  /** Time to first token. */
  ttftMs: Distribution;
  /** Time per output token after the first: (e2e - ttft) / (output tokens - 1), per request. */
  tpotMs: Distribution;
  /** Gaps between token-carrying chunks, over every request. */
  itlMs: Distribution;
  e2eMs: Distribution;
}

/** What a level's requests add up to; latencies count succeeded requests only. */
export function summarizeLevel(spec: LevelSpec, run: LevelRun, slo?: Slo): LevelSummary {
  const ok = run.results.filter((r) => r.ok);
  const failures = new Map<string, { kind: string; count: number; example: string }>();
  for (const r of run.results) {
    if (r.ok) continue;
    const kind = r.errorKind ?? "failed";
    const f = failures.get(kind) ?? { kind, count: 0, example: r.error ?? kind };
    f.count++;
    failures.set(kind, f);
  }
  const sum = (f: (r: RequestResult) => number) => ok.reduce((n, r) => n + f(r), 0);
  const promptTokens = sum((r) => r.promptTokens);
  const outputTokens = sum((r) => r.outputTokens);
  const per = (n: number) => (run.wallSeconds > 0 ? n / run.wallSeconds : Number.NaN);
  const good = slo ? ok.filter((r) => meetsSlo(r, slo)).length : undefined;
  return {
    concurrency: spec.concurrency,
    rate: Number.isFinite(spec.rate) ? spec.rate : null,
    requests: run.results.length,
    succeeded: ok.length,
    failed: run.results.length - ok.length,
    errors: [...failures.values()].sort((a, b) => b.count - a.count),
    wallSeconds: run.wallSeconds,
    requestsPerSecond: per(ok.length),
    ...(good !== undefined ? { goodRequests: good, goodputRequestsPerSecond: per(good) } : {}),
    outputTokensPerSecond: per(outputTokens),
    totalTokensPerSecond: per(promptTokens + outputTokens),
    promptTokens,
    outputTokens,
    ttftMs: distribution(ok.map((r) => r.ttftMs)),
    tpotMs: distribution(
      ok.filter((r) => r.outputTokens > 1).map((r) => (r.e2eMs - r.ttftMs) / (r.outputTokens - 1)),
    ),
    itlMs: distribution(ok.flatMap((r) => r.itlMs)),
    e2eMs: distribution(ok.map((r) => r.e2eMs)),
  };
}

const ms = (v: number) => (Number.isFinite(v) ? (v >= 100 ? v.toFixed(0) : v.toFixed(1)) : "-");
const num = (v: number, digits = 1) => (Number.isFinite(v) ? v.toFixed(digits) : "-");

/**
 * The summaries as a text table: one row per level, latencies in ms as p50/p90/p99; with
 * objectives, the goodput (requests/s that met them) after the requests/s.
 */
export function formatLevels(levels: readonly LevelSummary[]): string {
  const header = [
    "concurrency",
    "rate/s",
    "ok",
    "failed",
    "req/s",
    "out tok/s",
    "total tok/s",
    "TTFT p50/p90/p99",
    "TPOT p50/p90/p99",
    "ITL p50/p90/p99",
    "E2E p50/p90/p99",
  ];
  const d = (x: Distribution) => `${ms(x.p50)}/${ms(x.p90)}/${ms(x.p99)}`;
  const goodput = levels.some((l) => l.goodputRequestsPerSecond !== undefined);
  if (goodput) header.splice(5, 0, "good req/s");
  const rows = levels.map((l) => [
    String(l.concurrency),
    l.rate === null ? "inf" : num(l.rate, 2),
    String(l.succeeded),
    String(l.failed),
    num(l.requestsPerSecond, 2),
    ...(goodput ? [num(l.goodputRequestsPerSecond ?? Number.NaN, 2)] : []),
    num(l.outputTokensPerSecond),
    num(l.totalTokensPerSecond),
    d(l.ttftMs),
    d(l.tpotMs),
    d(l.itlMs),
    d(l.e2eMs),
  ]);
  const widths = header.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c]!.length)));
  const line = (cells: string[]) =>
    cells
      .map((cell, c) => (c < 2 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!)))
      .join("  ");
  return [line(header), ...rows.map(line), "(latencies in ms)"].join("\n");
}
