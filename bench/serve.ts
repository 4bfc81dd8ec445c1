// The serve suite (`npm run bench:serve`): the gateway under load, end to end over HTTP.
//
// The mini V3 checkpoint (make-tiny-model --preset mini, cached under
// ~/.cache/expertmesh/models/mini-v3) is served in two configurations, both up at once and
// measured alternately level by level: (a) distributed: a nats-server, 4 shard processes
// and a gateway (`gateway --nats --plan`); (b) single-process (`gateway --local`). A load
// generator sends streaming chat completions (fixed prompts, temperature 0, max_tokens 32)
// at concurrency 1, 8 and 32 and records per request the time to first token (first
// content chunk), the gaps between content chunks (inter-token latency) and the completion
// tokens (from usage); per level, output tokens/s = tokens / wall time.
//
// The peer: Hugging Face transformers `generate` at batch 1 on CPU (bench/hf_generate.py in
// the golden venv, float32, same threads), greedy, the same prompts and number of new tokens,
// interleaved one to one with our single-process concurrency-1 requests.
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { findNatsServer } from "../src/local/nats-binary.ts";
import { modelArchitectureOf, readModelConfig } from "../src/model/config.ts";
import { writeTinyModel } from "../src/model/tiny.ts";
import { planPlacement } from "../src/moe/placement.ts";
import { serializePlan } from "../src/moe/plan-json.ts";
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

export interface LevelResult {
  config: "distributed" | "single-process";
  concurrency: number;
  requests: number;
  errors: number;
  outputTokens: number;
  wallSeconds: number;
  /** outputTokens / wallSeconds. */
  tokensPerSecond: number;
  /** ms; percentiles over requests (TTFT) or over all gaps of all requests (ITL). */
  ttftP50: number;
  ttftP99: number;
  itlP50: number;
  itlP99: number;
}

export interface ServeResults {
  suite: "serve";
  date: string;
  commit: string;
  dirty: boolean;
  machine: import("./lib.ts").MachineInfo;
  model: { name: string; hiddenSize: number; layers: number; routedExperts: number; topK: number };
  natsVersion: string;
  shards: number;
  maxTokens: number;
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

function percentile(values: number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const s = [...values].sort((a, b) => a - b);
  const i = Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1));
  return s[i]!;
}

/** The mini V3 checkpoint, written once (about 30 s) and reused. */
export async function ensureMiniModel(log: (s: string) => void): Promise<string> {
  const cache =
    process.env["EXPERTMESH_CACHE_DIR"] ??
    join(process.env["XDG_CACHE_HOME"] ?? join(homedir(), ".cache"), "expertmesh");
  const dir = join(cache, "models", SERVE_MODEL);
  if (existsSync(join(dir, "config.json"))) return dir;
  log(`[serve] writing the mini V3 checkpoint to ${dir} (once, ~30 s)`);
  const tmp = `${dir}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  await writeTinyModel(tmp, { arch: "v3", preset: "mini", seed: 0 });
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
function child(name: string, cmd: string, args: string[], ready: RegExp): Child {
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

async function stop(c: ChildProcess): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return;
  const done = new Promise<void>((r) => c.once("exit", () => r()));
  c.kill("SIGTERM");
  const t = setTimeout(() => c.kill("SIGKILL"), 10_000);
  await done;
  clearTimeout(t);
}

interface RequestResult {
  ok: boolean;
  tokens: number;
  ttftMs: number;
  gapsMs: number[];
  totalMs: number;
}

/** One streaming chat completion; SSE parsed by hand. */
async function chat(base: string, prompt: string, maxTokens: number): Promise<RequestResult> {
  const t0 = performance.now();
  const res = await fetch(`${base}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      model: SERVE_MODEL,
      messages: [{ role: "user", content: prompt }],
      max_tokens: maxTokens,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    }),
  });
  if (!res.ok || !res.body) {
    await res.text().catch(() => "");
    return { ok: false, tokens: 0, ttftMs: Number.NaN, gapsMs: [], totalMs: 0 };
  }
  const decoder = new TextDecoder();
  let buf = "";
  let first = Number.NaN;
  let last = Number.NaN;
  const gaps: number[] = [];
  let tokens = 0;
  let ok = true;
  for await (const chunk of res.body) {
    buf += decoder.decode(chunk as Uint8Array, { stream: true });
    let i = buf.indexOf("\n\n");
    while (i >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      i = buf.indexOf("\n\n");
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data) as {
          choices?: { delta?: { content?: string } }[];
          usage?: { completion_tokens: number };
          error?: unknown;
        };
        if (msg.error) ok = false;
        if (msg.usage) tokens = msg.usage.completion_tokens;
        if (msg.choices?.some((c) => c.delta?.content)) {
          const now = performance.now();
          if (Number.isNaN(first)) first = now - t0;
          else gaps.push(now - last);
          last = now;
        }
      }
    }
  }
  return { ok, tokens, ttftMs: first, gapsMs: gaps, totalMs: performance.now() - t0 };
}

/** `requests` requests through `concurrency` workers. */
async function level(
  base: string,
  config: LevelResult["config"],
  concurrency: number,
  requests: number,
  maxTokens: number,
): Promise<LevelResult> {
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
  const wallSeconds = (performance.now() - t0) / 1000;
  const good = results.filter((r) => r.ok);
  const outputTokens = good.reduce((n, r) => n + r.tokens, 0);
  const ttft = good.map((r) => r.ttftMs).filter((x) => Number.isFinite(x));
  const gaps = good.flatMap((r) => r.gapsMs);
  return {
    config,
    concurrency,
    requests,
    errors: results.length - good.length,
    outputTokens,
    wallSeconds,
    tokensPerSecond: outputTokens / wallSeconds,
    ttftP50: percentile(ttft, 50),
    ttftP99: percentile(ttft, 99),
    itlP50: percentile(gaps, 50),
    itlP99: percentile(gaps, 99),
  };
}

export async function runServe(opts: {
  threads: number;
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<Omit<ServeResults, "suite" | "date" | "commit" | "dirty" | "machine">> {
  const { log } = opts;
  const start = performance.now();
  const modelDir = await ensureMiniModel(log);
  const cfg = readModelConfig(modelDir);
  const arch = modelArchitectureOf(cfg);
  const numShards = 4;
  const maxTokens = 32;
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
    const natsUrl = `nats://127.0.0.1:${(await natsPortMatch.ready)[1]}`;
    const common = [`--model=${modelDir}`, `--namespace=bench`, `--model-name=${SERVE_MODEL}`];
    const shards: Promise<unknown>[] = [];
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
      shards.push(s.ready);
    }
    await Promise.all(shards);
    const gwArgs = ["--host=127.0.0.1", "--http-port=0", "--metrics-port=0"];
    const serving = /serving '[^']*' on (http:\/\/[^ ]+)/;
    const dist = child(
      "gateway (distributed)",
      process.execPath,
      [CLI, "gateway", ...common, `--plan=${planPath}`, `--nats=${natsUrl}`, ...gwArgs],
      serving,
    );
    children.push(dist.proc);
    const local = child(
      "gateway (single-process)",
      process.execPath,
      [CLI, "gateway", ...common, "--local", ...gwArgs],
      serving,
    );
    children.push(local.proc);
    const bases = {
      distributed: (await dist.ready)[1]!,
      "single-process": (await local.ready)[1]!,
    } as const;
    log(
      `[serve] distributed gateway at ${bases.distributed}, single-process at ${bases["single-process"]}`,
    );

    // Warm up both gateways (and the peer).
    for (const base of Object.values(bases)) await level(base, "distributed", 2, 2, maxTokens);
    await peer.call({ cmd: "generate", prompt: PROMPTS[0], new_tokens: maxTokens });

    // Batch 1, ours (single-process) and the peer interleaved one to one.
    const peerRuns = Math.max(opts.runs, opts.quick ? 3 : 5);
    const peerTokS: number[] = [];
    const oursTokS: number[] = [];
    let promptTokens = 0;
    for (let i = 0; i < peerRuns; i++) {
      const prompt = PROMPTS[i % PROMPTS.length]!;
      const r = await chat(bases["single-process"], prompt, maxTokens);
      if (r.ok) oursTokS.push(r.tokens / (r.totalMs / 1000));
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

    const plans = opts.quick
      ? [
          { c: 1, n: 3 },
          { c: 8, n: 8 },
          { c: 32, n: 32 },
        ]
      : [
          { c: 1, n: 8 },
          { c: 8, n: 32 },
          { c: 32, n: 64 },
        ];
    const levels: LevelResult[] = [];
    for (const { c, n } of plans) {
      for (const config of ["distributed", "single-process"] as const) {
        const r = await level(bases[config], config, c, n, maxTokens);
        levels.push(r);
        log(
          `[serve] ${config} c=${c}: ${r.tokensPerSecond.toFixed(1)} tok/s, TTFT p50 ${r.ttftP50.toFixed(0)} ms p99 ${r.ttftP99.toFixed(0)} ms, ITL p50 ${r.itlP50.toFixed(1)} ms p99 ${r.itlP99.toFixed(1)} ms${r.errors ? `, ${r.errors} errors` : ""}`,
        );
      }
    }
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
