// The serve suite (`npm run bench:serve`): the gateway under load, end to end over HTTP.
//
// The mini V3 checkpoint (make-tiny-model --preset mini, cached under
// ~/.cache/expertmesh/models/mini-v3) is served in three configurations, all up at once
// and measured in turn: (a) distributed: a nats-server, 4 shard processes and a gateway
// (`gateway --nats --plan`); (b) the same with `--micro-batches 2`, on the same shards;
// (c) single-process (`gateway --local`). A load generator sends streaming chat
// completions (fixed prompts, temperature 0, max_tokens 32 with ignore_eos, so that every
// request of every configuration generates exactly 32 tokens) at concurrency 1, 4, 8, 16
// and 32, and records per request the time to first token (first content chunk), the gaps
// between content chunks (inter-token latency) and the completion tokens (from usage); per
// level, output tokens/s = tokens / wall time. Each repetition runs every level of every
// configuration (the configurations' order rotated per repetition); the table gives the
// median and min-max of tokens/s over repetitions and latency percentiles over the requests
// of all repetitions. The CPU time of every process (gateway, shards, nats-server, this
// load generator) is read from /proc around each level, to see where the 2 cores go.
//
// The peer: Hugging Face transformers `generate` at batch 1 on CPU (bench/hf_generate.py in
// the golden venv, float32, same threads), greedy, the same prompts and number of new tokens,
// interleaved one to one with our single-process concurrency-1 requests.
import { type ChildProcess, spawn } from "node:child_process";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { availableParallelism, tmpdir } from "node:os";
import { join } from "node:path";
import type { Dispatcher } from "undici";
import { send } from "../src/loadgen/client.ts";
import { findNatsServer } from "../src/local/nats-binary.ts";
import { modelArchitectureOf, readModelConfig } from "../src/model/config.ts";
import { writeTinyModel } from "../src/model/tiny.ts";
import { planPlacement } from "../src/moe/placement.ts";
import { serializePlan } from "../src/moe/plan-json.ts";
import { cacheDir } from "../src/util/cache-dir.ts";
import {
  BENCH_DIR,
  goldenPython,
  LineClient,
  peerEnv,
  REPO_ROOT,
  type Stats,
  stats,
} from "./lib.ts";

export const SERVE_MODEL = "mini-v3";
const CLI = join(REPO_ROOT, "src", "cli", "main.ts");

export const PROMPTS = [
  "Write a haiku about the sea.",
  "Explain what a mixture-of-experts model is in one paragraph.",
  "List three uses of a hash table.",
  "What is the capital of France, and why is it famous?",
  "Translate 'good morning' into Spanish, French and German.",
  "Summarize the plot of Hamlet in two sentences.",
  "Give me a recipe for pancakes.",
  "Why is the sky blue?",
];

/**
 * An agent bench's tool result (the responses and context suites): `words` words of PROMPTS,
 * naming the loop's `task` and `step`, so no loop finds another's results cached.
 */
export function toolResultText(task: number, step: number, words: number): string {
  const text = Array.from(
    { length: words },
    (_, i) => PROMPTS[(step + i) % PROMPTS.length]!.split(" ")[i % 4],
  );
  return `task ${task}, step ${step}: ${text.join(" ")}`;
}

export type ServeConfig = "distributed" | "distributed-mb2" | "single-process";

/** What a configuration is, for tables and plots. */
export const CONFIG_LABEL: Record<ServeConfig, string> = {
  distributed: "distributed",
  "distributed-mb2": "distributed, 2 micro-batches",
  "single-process": "single-process",
};

/** CPU seconds used during a level, by process role. */
export interface CpuSeconds {
  gateway: number;
  shards: number;
  nats: number;
  loadgen: number;
}

/** One repetition of one level. */
export interface LevelRun {
  wallSeconds: number;
  outputTokens: number;
  tokensPerSecond: number;
  errors: number;
  /** Requests that ended with other than maxTokens completion tokens. */
  short: number;
  cpu: CpuSeconds | null;
  /** Cores busy on the whole machine (/proc/stat: our processes and everyone else's). */
  machineBusy: number;
  /** Expert round trips (one per shard touched per MoE layer and step), distributed only. */
  dispatch: { count: number; meanMs: number } | null;
}

export interface LevelResult {
  config: ServeConfig;
  microBatches: number;
  concurrency: number;
  /** Requests per repetition. */
  requests: number;
  runs: LevelRun[];
  /** Output tokens/s over repetitions. */
  tokS: Stats;
  errors: number;
  short: number;
  /** ms; percentiles over the requests (TTFT) or the gaps (ITL) of all repetitions. */
  ttftP50: number;
  ttftP99: number;
  itlP50: number;
  itlP99: number;
  /** Cores busy (CPU seconds / wall seconds), median over repetitions, by role and in all. */
  cores: (CpuSeconds & { total: number }) | null;
  /** Cores busy on the whole machine, median over repetitions. */
  machineBusy: number;
}

export interface ServeResults {
  suite: "serve";
  date: string;
  commit: string;
  dirty: boolean;
  machine: import("./lib.ts").MachineInfo & { loadavgEnd?: number[] };
  model: { name: string; hiddenSize: number; layers: number; routedExperts: number; topK: number };
  natsVersion: string;
  shards: number;
  maxTokens: number;
  repetitions: number;
  levels: LevelResult[];
  peer: {
    what: string;
    torch: string;
    transformers: string;
    dtype: string;
    threads: number;
    promptTokens: number;
    newTokens: number;
    /** Per-run tokens/s of the peer, and of our single-process concurrency-1 requests
     *  interleaved with it (completion tokens / request time, prefill included). */
    peerTokS: Stats;
    oursTokS: Stats;
    /** median(ours) / median(peer). */
    ratio: number;
  };
  seconds: number;
}

export function percentile(values: number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const s = [...values].sort((a, b) => a - b);
  const i = Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1));
  return s[i]!;
}

/** The mini V3 checkpoint, written once (about 30 s) and reused. */
export async function ensureMiniModel(
  log: (s: string) => void,
  opts: { mtp?: boolean } = {},
): Promise<string> {
  // With an MTP layer (the speculative suite): its own folder; the main weights are the same.
  const dir = join(cacheDir(), "models", opts.mtp ? `${SERVE_MODEL}-mtp` : SERVE_MODEL);
  if (existsSync(join(dir, "config.json"))) return dir;
  log(`[serve] writing the mini V3 checkpoint to ${dir} (once, ~30 s)`);
  const tmp = `${dir}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  await writeTinyModel(tmp, { arch: "v3", preset: "mini", seed: 0, mtp: opts.mtp ?? false });
  rmSync(dir, { recursive: true, force: true });
  renameSync(tmp, dir);
  return dir;
}

interface Child {
  proc: ChildProcess;
  ready: Promise<RegExpExecArray>;
  tail: string[];
}

/** Spawns a child; `ready` resolves with the first match of `ready` in its output. */
export function child(name: string, cmd: string, args: string[], ready: RegExp): Child {
  const proc = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], cwd: REPO_ROOT });
  const tail: string[] = [];
  let done = false;
  const readyP = new Promise<RegExpExecArray>((resolve, reject) => {
    const onData = (d: Buffer) => {
      for (const line of d.toString().split("\n")) {
        if (!line.trim()) continue;
        tail.push(line);
        if (tail.length > 20) tail.shift();
        const m = ready.exec(line);
        if (m && !done) {
          done = true;
          resolve(m);
        }
      }
    };
    proc.stdout!.on("data", onData);
    proc.stderr!.on("data", onData);
    proc.on("exit", (code, sig) => {
      if (!done) reject(new Error(`${name} exited (${sig ?? code}):\n${tail.join("\n")}`));
    });
  });
  return { proc, ready: readyP, tail };
}

export async function stop(c: ChildProcess): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return;
  const done = new Promise<void>((r) => c.once("exit", () => r()));
  c.kill("SIGTERM");
  const t = setTimeout(() => c.kill("SIGKILL"), 10_000);
  await done;
  clearTimeout(t);
}

/**
 * A single-process gateway (`gateway --local`) on `modelDir` with `extra` flags, on a free
 * port of 127.0.0.1; resolves its base URL once it serves. Its process goes in `children`.
 */
export async function localGateway(
  name: string,
  modelDir: string,
  extra: string[],
  children: ChildProcess[],
): Promise<string> {
  const c = child(
    name,
    process.execPath,
    [
      join(REPO_ROOT, "src", "cli", "main.ts"),
      "gateway",
      `--model=${modelDir}`,
      "--local",
      "--host=127.0.0.1",
      "--http-port=0",
      "--metrics-port=0",
      ...extra,
    ],
    /serving '[^']*' on (https?):\/\/[^:]+:(\d+)/,
  );
  children.push(c.proc);
  const [, scheme, port] = await c.ready;
  return `${scheme}://127.0.0.1:${port}`;
}

/** A gateway's metric (an unlabelled series) from its /metrics, or NaN. */
export async function metricValue(base: string, name: string): Promise<number> {
  const text = await (await fetch(`${base}/metrics`)).text();
  return Number(new RegExp(`^${name} (\\S+)$`, "m").exec(text)?.[1] ?? Number.NaN);
}

export interface RequestResult {
  ok: boolean;
  /** Why it failed (status and body, or the error event). */
  error?: string;
  tokens: number;
  ttftMs: number;
  gapsMs: number[];
  totalMs: number;
}

/**
 * Where a gateway answers: its base URL, or (over TLS) the URL and an undici dispatcher that
 * trusts its CA and presents a client certificate if it asks for one.
 */
export type Endpoint = string | { url: string; dispatcher: Dispatcher };

/**
 * One streaming chat completion of exactly maxTokens tokens (ignore_eos, temperature 0),
 * timed by `expertmesh bench`'s client (src/loadgen/client.ts). `system`: a system message
 * before the prompt; `extra`: more request fields (with `logprobs: true` every token makes a
 * chunk, text or not); `onContent`: called with performance.now() as each token's chunk
 * arrives.
 */
export async function chat(
  base: Endpoint,
  prompt: string,
  maxTokens: number,
  system?: string,
  extra: Record<string, unknown> = {},
  onContent?: (now: number) => void,
): Promise<RequestResult> {
  const r = await send(
    typeof base === "string"
      ? { url: base, model: SERVE_MODEL, api: "chat" }
      : { url: base.url, dispatcher: base.dispatcher, model: SERVE_MODEL, api: "chat" },
    {
      prompt,
      maxTokens,
      ignoreEos: true,
      messages: [
        ...(system ? [{ role: "system", content: system }] : []),
        { role: "user", content: prompt },
      ],
      extra: { temperature: 0, ...extra },
      ...(onContent ? { onToken: onContent } : {}),
    },
  );
  return {
    ok: r.ok,
    ...(r.error ? { error: r.error } : {}),
    tokens: r.outputTokens,
    ttftMs: r.ttftMs,
    gapsMs: r.itlMs,
    totalMs: r.e2eMs,
  };
}

/** `requests` requests through `concurrency` workers. */
async function level(
  base: string,
  concurrency: number,
  requests: number,
  maxTokens: number,
): Promise<{ results: RequestResult[]; wallSeconds: number }> {
  let next = 0;
  const results: RequestResult[] = [];
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < requests) {
        const i = next++;
        results.push(await chat(base, PROMPTS[i % PROMPTS.length]!, maxTokens));
      }
    }),
  );
  return { results, wallSeconds: (performance.now() - t0) / 1000 };
}

const CLK_TCK = 100;

/** utime + stime of a process in seconds (Linux /proc), or NaN. */
export function procCpuSeconds(pid: number | undefined): number {
  if (pid === undefined) return Number.NaN;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the command name (which may hold spaces) start at field 3.
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch {
    return Number.NaN;
  }
}

/** Busy and total jiffies of the whole machine (all cores), from /proc/stat. */
function machineJiffies(): { busy: number; total: number } {
  try {
    const line = readFileSync("/proc/stat", "utf8").split("\n")[0]!;
    const v = line.trim().split(/\s+/).slice(1).map(Number);
    const total = v.slice(0, 8).reduce((a, b) => a + b, 0);
    // idle + iowait
    return { busy: total - v[3]! - v[4]!, total };
  } catch {
    return { busy: Number.NaN, total: Number.NaN };
  }
}

/** The CPU seconds of each role so far. */
function cpuNow(pids: { gateways: number[]; shards: number[]; nats: number }): CpuSeconds {
  const sum = (ps: number[]) => ps.reduce((s, p) => s + procCpuSeconds(p), 0);
  const self = process.cpuUsage();
  return {
    gateway: sum(pids.gateways),
    shards: sum(pids.shards),
    nats: procCpuSeconds(pids.nats),
    loadgen: (self.user + self.system) / 1e6,
  };
}

/** Sum and count of the gateway's dispatch latency histogram over all shards. */
async function dispatchTotals(base: string): Promise<{ sum: number; count: number }> {
  const text = await (await fetch(`${base}/metrics`)).text();
  let sum = 0;
  let count = 0;
  for (const m of text.matchAll(
    /^expertmesh_gateway_dispatch_latency_seconds_(sum|count)\{[^}]*\} (\S+)$/gm,
  )) {
    if (m[1] === "sum") sum += Number(m[2]);
    else count += Number(m[2]);
  }
  return { sum, count };
}

/** Folds the repetitions of one (config, concurrency) into a LevelResult. */
function summarize(
  config: ServeConfig,
  concurrency: number,
  requests: number,
  reps: { run: LevelRun; results: RequestResult[] }[],
): LevelResult {
  const good = reps.flatMap((r) => r.results.filter((x) => x.ok));
  const ttft = good.map((r) => r.ttftMs).filter((x) => Number.isFinite(x));
  const gaps = good.flatMap((r) => r.gapsMs);
  const runs = reps.map((r) => r.run);
  const withCpu = runs.filter((r) => r.cpu !== null);
  const coresOf = (pick: (c: CpuSeconds) => number) =>
    stats(withCpu.map((r) => pick(r.cpu!) / r.wallSeconds)).median;
  return {
    config,
    microBatches: config === "distributed-mb2" ? 2 : 1,
    concurrency,
    requests,
    runs,
    tokS: stats(runs.map((r) => r.tokensPerSecond)),
    machineBusy: stats(runs.map((r) => r.machineBusy)).median,
    errors: runs.reduce((n, r) => n + r.errors, 0),
    short: runs.reduce((n, r) => n + r.short, 0),
    ttftP50: percentile(ttft, 50),
    ttftP99: percentile(ttft, 99),
    itlP50: percentile(gaps, 50),
    itlP99: percentile(gaps, 99),
    cores:
      withCpu.length === 0
        ? null
        : {
            gateway: coresOf((c) => c.gateway),
            shards: coresOf((c) => c.shards),
            nats: coresOf((c) => c.nats),
            loadgen: coresOf((c) => c.loadgen),
            total: coresOf((c) => c.gateway + c.shards + c.nats + c.loadgen),
          },
  };
}

export async function runServe(opts: {
  threads: number;
  runs: number;
  quick: boolean;
  /** Passes over every level and configuration (at least 3; default 3). */
  repetitions?: number;
  log: (s: string) => void;
}): Promise<Omit<ServeResults, "suite" | "date" | "commit" | "dirty" | "machine">> {
  const { log } = opts;
  const start = performance.now();
  const modelDir = await ensureMiniModel(log);
  const cfg = readModelConfig(modelDir);
  const arch = modelArchitectureOf(cfg);
  const numShards = 4;
  const maxTokens = 32;
  const repetitions = Math.max(3, opts.repetitions ?? 3);
  const plan = planPlacement({ architecture: arch, numShards });
  const runDir = mkdtempSync(join(tmpdir(), "em-bench-serve-"));
  const planPath = join(runDir, "plan.json");
  writeFileSync(planPath, serializePlan(plan));
  const children: ChildProcess[] = [];
  let peer: LineClient | undefined;
  try {
    // The peer loads first (10-20 s) while nothing else runs.
    const py = goldenPython(log);
    const env: NodeJS.ProcessEnv = {
      ...peerEnv(),
      TRANSFORMERS_VERBOSITY: "error",
      HF_HUB_DISABLE_PROGRESS_BARS: "1",
      TQDM_DISABLE: "1",
    };
    peer = new LineClient(
      "hf_generate.py",
      py,
      [
        join(BENCH_DIR, "hf_generate.py"),
        "--model",
        modelDir,
        "--threads",
        String(opts.threads),
        "--dtype",
        "float32",
      ],
      env,
    );
    const peerInfo = JSON.parse(await peer.nextLine()) as {
      torch: string;
      transformers: string;
      dtype: string;
      threads: number;
    };
    log(
      `[serve] peer ready: torch ${peerInfo.torch}, transformers ${peerInfo.transformers}, ${peerInfo.dtype}`,
    );

    const natsPortMatch = child(
      "nats",
      findNatsServer(),
      ["-a", "127.0.0.1", "-p", "-1"],
      /Listening for client connections on [^:]+:(\d+)/,
    );
    children.push(natsPortMatch.proc);
    const natsProc = natsPortMatch.proc;
    const natsUrl = `nats://127.0.0.1:${(await natsPortMatch.ready)[1]}`;
    const common = [`--model=${modelDir}`, `--namespace=bench`, `--model-name=${SERVE_MODEL}`];
    const shards: Promise<unknown>[] = [];
    const shardProcs: ChildProcess[] = [];
    for (let k = 0; k < numShards; k++) {
      const s = child(
        `shard-${k}`,
        process.execPath,
        [
          CLI,
          "shard",
          ...common,
          `--plan=${planPath}`,
          `--nats=${natsUrl}`,
          `--shard=${k}`,
          "--id=r0",
          "--metrics-port=0",
        ],
        /serving /,
      );
      children.push(s.proc);
      shardProcs.push(s.proc);
      shards.push(s.ready);
    }
    await Promise.all(shards);
    // Every prompt computed in full, as by the peer: the fixed prompts repeat, and cached
    // prefixes would measure the cache (bench/prefix.ts does), not the engine.
    const gwArgs = ["--host=127.0.0.1", "--http-port=0", "--metrics-port=0", "--no-prefix-caching"];
    const serving = /serving '[^']*' on (http:\/\/[^ ]+)/;
    const distArgs = [CLI, "gateway", ...common, `--plan=${planPath}`, `--nats=${natsUrl}`];
    const gateways = {
      distributed: child(
        "gateway (distributed)",
        process.execPath,
        [...distArgs, ...gwArgs],
        serving,
      ),
      "distributed-mb2": child(
        "gateway (distributed, 2 micro-batches)",
        process.execPath,
        [...distArgs, "--micro-batches=2", ...gwArgs],
        serving,
      ),
      "single-process": child(
        "gateway (single-process)",
        process.execPath,
        [CLI, "gateway", ...common, "--local", ...gwArgs],
        serving,
      ),
    } as const;
    for (const g of Object.values(gateways)) children.push(g.proc);
    const bases = {} as Record<ServeConfig, string>;
    for (const [k, g] of Object.entries(gateways)) bases[k as ServeConfig] = (await g.ready)[1]!;
    log(
      `[serve] gateways: ${Object.entries(bases)
        .map(([k, v]) => `${k} at ${v}`)
        .join(", ")}`,
    );
    const configs = Object.keys(bases) as ServeConfig[];
    const pids = (config: ServeConfig) => ({
      gateways: [gateways[config].proc.pid!],
      shards: config === "single-process" ? [] : shardProcs.map((p) => p.pid!),
      nats: natsProc.pid!,
    });

    // Warm up the gateways (and the peer).
    for (const base of Object.values(bases)) await level(base, 2, 2, maxTokens);
    await peer.call({ cmd: "generate", prompt: PROMPTS[0], new_tokens: maxTokens });

    // Batch 1, ours (single-process) and the peer interleaved one to one.
    const peerRuns = Math.max(opts.runs, opts.quick ? 3 : 5);
    const peerTokS: number[] = [];
    const oursTokS: number[] = [];
    let promptTokens = 0;
    for (let i = 0; i < peerRuns; i++) {
      const prompt = PROMPTS[i % PROMPTS.length]!;
      const r = await chat(bases["single-process"], prompt, maxTokens);
      if (!r.ok) throw new Error(`single-process batch-1 request failed: ${r.error ?? "?"}`);
      oursTokS.push(r.tokens / (r.totalMs / 1000));
      const p = await peer.call<{ seconds: number; prompt_tokens: number; new_tokens: number }>({
        cmd: "generate",
        prompt,
        new_tokens: maxTokens,
      });
      promptTokens = p.prompt_tokens;
      peerTokS.push(p.new_tokens / p.seconds);
      log(
        `[serve] batch 1 #${i + 1}: ours ${oursTokS.at(-1)?.toFixed(1)} tok/s, transformers ${peerTokS.at(-1)!.toFixed(1)} tok/s`,
      );
    }
    await peer.close(JSON.stringify({ cmd: "quit" }));
    peer = undefined;

    // Requests per level: one wave at concurrency >= 4 (every request the same length).
    const plans = (opts.quick ? [1, 8, 32] : [1, 4, 8, 16, 32]).map((c) => ({
      c,
      n: Math.max(c, 4),
    }));
    const reps = opts.quick ? 1 : repetitions;
    const runs = new Map<string, { run: LevelRun; results: RequestResult[] }[]>();
    for (let rep = 0; rep < reps; rep++) {
      for (const { c, n } of plans) {
        // Rotate the order of the configurations from one repetition to the next.
        const order = configs.map((_, i) => configs[(i + rep) % configs.length]!);
        for (const config of order) {
          const base = bases[config];
          const dist = config !== "single-process";
          const cpu0 = cpuNow(pids(config));
          const m0 = machineJiffies();
          const d0 = dist ? await dispatchTotals(base) : null;
          const { results, wallSeconds } = await level(base, c, n, maxTokens);
          const cpu1 = cpuNow(pids(config));
          const m1 = machineJiffies();
          const d1 = dist ? await dispatchTotals(base) : null;
          const good = results.filter((r) => r.ok);
          const outputTokens = good.reduce((t, r) => t + r.tokens, 0);
          const cpu = Object.fromEntries(
            Object.keys(cpu0).map((k) => [
              k,
              cpu1[k as keyof CpuSeconds] - cpu0[k as keyof CpuSeconds],
            ]),
          ) as unknown as CpuSeconds;
          const run: LevelRun = {
            wallSeconds,
            outputTokens,
            tokensPerSecond: outputTokens / wallSeconds,
            errors: results.length - good.length,
            short: good.filter((r) => r.tokens !== maxTokens).length,
            cpu: Object.values(cpu).every(Number.isFinite) ? cpu : null,
            machineBusy: ((m1.busy - m0.busy) / (m1.total - m0.total)) * availableParallelism(),
            dispatch:
              d0 && d1
                ? {
                    count: d1.count - d0.count,
                    meanMs: ((d1.sum - d0.sum) / Math.max(1, d1.count - d0.count)) * 1000,
                  }
                : null,
          };
          const failed = results.find((r) => !r.ok);
          if (failed) log(`[serve] ${config} c=${c}: first error: ${failed.error ?? "?"}`);
          // A level where every request failed measures nothing: stop before any table is written.
          if (good.length === 0)
            throw new Error(`${config} c=${c}: all ${results.length} requests failed`);
          const key = `${config}/${c}`;
          runs.set(key, [...(runs.get(key) ?? []), { run, results }]);
          const busy = run.cpu
            ? `, cores busy: gateway ${(run.cpu.gateway / wallSeconds).toFixed(2)} shards ${(run.cpu.shards / wallSeconds).toFixed(2)} nats ${(run.cpu.nats / wallSeconds).toFixed(2)} loadgen ${(run.cpu.loadgen / wallSeconds).toFixed(2)}, machine ${run.machineBusy.toFixed(2)}`
            : "";
          log(
            `[serve] rep ${rep + 1}/${reps} ${config} c=${c}: ${run.tokensPerSecond.toFixed(1)} tok/s${busy}${run.dispatch ? `, ${run.dispatch.count} round trips of ${run.dispatch.meanMs.toFixed(1)} ms` : ""}${run.errors ? `, ${run.errors} errors` : ""}${run.short ? `, ${run.short} short` : ""}`,
          );
        }
      }
    }
    const levels: LevelResult[] = [];
    for (const { c, n } of plans)
      for (const config of configs)
        levels.push(summarize(config, c, n, runs.get(`${config}/${c}`)!));
    let natsVersion = "";
    const m = /nats-server-(v[\d.]+)/.exec(findNatsServer());
    if (m) natsVersion = m[1]!;
    const ours = stats(oursTokS);
    const theirs = stats(peerTokS);
    return {
      model: {
        name: SERVE_MODEL,
        hiddenSize: arch.hiddenSize,
        layers: arch.numLayers,
        routedExperts: arch.routedExperts,
        topK: arch.expertsPerToken,
      },
      natsVersion,
      shards: numShards,
      maxTokens,
      repetitions: opts.quick ? 1 : repetitions,
      levels,
      peer: {
        what: "transformers generate, batch 1, greedy, CPU",
        torch: peerInfo.torch,
        transformers: peerInfo.transformers,
        dtype: peerInfo.dtype,
        threads: peerInfo.threads,
        promptTokens,
        newTokens: maxTokens,
        peerTokS: theirs,
        oursTokS: ours,
        ratio: ours.median / theirs.median,
      },
      seconds: (performance.now() - start) / 1000,
    };
  } finally {
    if (peer) await peer.close(JSON.stringify({ cmd: "quit" })).catch(() => {});
    // Gateways first, then shards, then NATS.
    for (const c of [...children].reverse()) await stop(c);
    rmSync(runDir, { recursive: true, force: true });
  }
}
