// Shared pieces of the benchmark set: statistics, the machine record, a line-protocol
// client for helper processes (the PyTorch worker, the limits helper), and the build of
// the C++ limits helper. See BENCHMARKS.md for the method and /work/shared/BENCHMARKING.md
// (copied into BENCHMARKS.md's header) for the rules.
import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { availableParallelism, cpus, loadavg, totalmem } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

export const BENCH_DIR = dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = dirname(BENCH_DIR);
export const RESULTS_DIR = join(BENCH_DIR, "results");

// ------------------------------------------------------------------ statistics

export interface Stats {
  median: number;
  min: number;
  max: number;
  n: number;
}

export function stats(values: readonly number[]): Stats {
  if (values.length === 0) return { median: Number.NaN, min: Number.NaN, max: Number.NaN, n: 0 };
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  const median = s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
  return { median, min: s[0]!, max: s[s.length - 1]!, n: s.length };
}

/** (max - min) / median: the run's own spread. */
/**
 * The six orders of three interleaved series, to take in turn: each series then follows
 * each of the others equally often (a series leaves garbage to collect and warm or cold
 * caches to whichever runs next).
 */
export const ORDERS_OF_THREE = [
  [0, 1, 2],
  [0, 2, 1],
  [1, 0, 2],
  [1, 2, 0],
  [2, 0, 1],
  [2, 1, 0],
] as const;

/** "median (min-max)" with `digits` decimals, as the suites' tables print timings. */
export function medianRange(s: Stats, digits = 1): string {
  return `${s.median.toFixed(digits)} (${s.min.toFixed(digits)}-${s.max.toFixed(digits)})`;
}

export function spread(s: Stats): number {
  return (s.max - s.min) / s.median;
}

// ------------------------------------------------------------------ machine

export interface MachineInfo {
  cpu: string;
  vendor: string;
  family: string;
  model: string;
  cores: number;
  hypervisor: boolean;
  /** SIMD flags of note from /proc/cpuinfo. */
  simd: string[];
  l2Bytes: number | null;
  l3Bytes: number | null;
  memBytes: number;
  loadavgStart: number[];
  loadavgEnd?: number[];
}

function cacheBytes(level: number): number | null {
  for (let i = 0; i < 8; i++) {
    const dir = `/sys/devices/system/cpu/cpu0/cache/index${i}`;
    try {
      if (readFileSync(`${dir}/level`, "utf8").trim() !== String(level)) continue;
      const size = readFileSync(`${dir}/size`, "utf8").trim();
      const m = /^(\d+)([KMG]?)$/.exec(size);
      if (!m) return null;
      const mult = { "": 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 }[m[2] as "" | "K" | "M" | "G"];
      return Number(m[1]) * mult;
    } catch {
      return null;
    }
  }
  return null;
}

export function machineInfo(): MachineInfo {
  let text = "";
  try {
    text = readFileSync("/proc/cpuinfo", "utf8");
  } catch {
    // not Linux: fall back to os.cpus()
  }
  const field = (name: string) =>
    new RegExp(`^${name}\\s*:\\s*(.*)$`, "m").exec(text)?.[1]?.trim() ?? "";
  const flags = new Set(field("flags").split(/\s+/));
  const simd = [
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_bf16",
    "amx_bf16",
  ].filter((f) => flags.has(f));
  return {
    cpu: field("model name") || cpus()[0]?.model || "unknown",
    vendor: field("vendor_id"),
    family: field("cpu family"),
    model: field("model"),
    cores: availableParallelism(),
    hypervisor: flags.has("hypervisor"),
    simd,
    l2Bytes: cacheBytes(2),
    l3Bytes: cacheBytes(3),
    memBytes: totalmem(),
    loadavgStart: loadavg().map((v) => Math.round(v * 100) / 100),
  };
}

export function gitCommit(): { commit: string; dirty: boolean } {
  try {
    const commit = execFileSync("git", ["rev-parse", "--short", "HEAD"], {
      cwd: REPO_ROOT,
      encoding: "utf8",
    }).trim();
    const status = execFileSync("git", ["status", "--porcelain", "--untracked-files=no"], {
      cwd: REPO_ROOT,
      encoding: "utf8",
    });
    return { commit, dirty: status.trim().length > 0 };
  } catch {
    return { commit: "unknown", dirty: false };
  }
}

// ------------------------------------------------------------------ line-protocol client

/** A child process that answers each line written to its stdin with one line on stdout. */
export class LineClient {
  private readonly child: ChildProcess;
  private readonly waiting: Array<{ resolve: (line: string) => void; reject: (e: Error) => void }> =
    [];
  private readonly buffered: string[] = [];
  private exited: Error | undefined;
  readonly name: string;

  constructor(name: string, command: string, args: string[], env: NodeJS.ProcessEnv = process.env) {
    this.name = name;
    this.child = spawn(command, args, { stdio: ["pipe", "pipe", "inherit"], env, cwd: REPO_ROOT });
    const rl = createInterface({ input: this.child.stdout! });
    rl.on("line", (line) => {
      const w = this.waiting.shift();
      if (w) w.resolve(line);
      else this.buffered.push(line);
    });
    this.child.on("exit", (code, signal) => {
      this.exited = new Error(`${name} exited (code ${code}, signal ${signal})`);
      for (const w of this.waiting.splice(0)) w.reject(this.exited);
    });
    this.child.on("error", (e) => {
      this.exited = new Error(`${name}: ${e.message}`);
      for (const w of this.waiting.splice(0)) w.reject(this.exited);
    });
  }

  /** The next line from the child (one already received, or the next to come). */
  nextLine(): Promise<string> {
    const b = this.buffered.shift();
    if (b !== undefined) return Promise.resolve(b);
    if (this.exited) return Promise.reject(this.exited);
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject }));
  }

  async request(line: string): Promise<string> {
    if (this.exited) throw this.exited;
    this.child.stdin!.write(`${line}\n`);
    return this.nextLine();
  }

  /** Sends a JSON command, parses the JSON reply; a reply with `error` throws. */
  async call<T = Record<string, unknown>>(cmd: Record<string, unknown>): Promise<T> {
    const reply = JSON.parse(await this.request(JSON.stringify(cmd))) as T & { error?: string };
    if (reply.error) throw new Error(`${this.name}: ${reply.error}`);
    return reply;
  }

  async close(quitLine: string): Promise<void> {
    if (this.exited) return;
    const done = new Promise<void>((resolve) => this.child.once("exit", () => resolve()));
    this.child.stdin!.write(`${quitLine}\n`);
    this.child.stdin!.end();
    const timer = setTimeout(() => this.child.kill("SIGTERM"), 10_000);
    await done;
    clearTimeout(timer);
  }
}

// ------------------------------------------------------------------ the limits helper

const LIMITS_SRC = join(BENCH_DIR, "native", "limits.cpp");
const LIMITS_BIN = join(BENCH_DIR, "build", "limits");
const LIMITS_FLAGS = ["-O2", "-march=native", "-ffp-contract=fast", "-std=gnu++17", "-pthread"];

/** Compiles bench/native/limits.cpp into bench/build/limits when it (or the compiler) changed. */
export function buildLimits(log: (s: string) => void): string {
  const candidates = [process.env["CXX"], "c++", "g++", "clang++"].filter((c): c is string => !!c);
  let cxx: string | undefined;
  let version = "";
  for (const c of candidates) {
    try {
      version = execFileSync(c, ["--version"], { encoding: "utf8" }).split("\n")[0] ?? "";
      cxx = c;
      break;
    } catch {
      // try the next one
    }
  }
  if (!cxx) {
    throw new Error(
      "no C++ compiler found for bench/native/limits.cpp (install g++ or set CXX); the native engine needs one too",
    );
  }
  const want = createHash("sha256")
    .update(readFileSync(LIMITS_SRC))
    .update(version)
    .update(LIMITS_FLAGS.join(" "))
    .digest("hex");
  const stamp = `${LIMITS_BIN}.stamp`;
  if (existsSync(LIMITS_BIN) && existsSync(stamp) && readFileSync(stamp, "utf8") === want) {
    return LIMITS_BIN;
  }
  log(`[bench] compiling ${LIMITS_SRC} (${version})`);
  mkdirSync(dirname(LIMITS_BIN), { recursive: true });
  execFileSync(cxx, [...LIMITS_FLAGS, LIMITS_SRC, "-o", LIMITS_BIN], {
    stdio: ["ignore", "inherit", "inherit"],
  });
  writeFileSync(stamp, want);
  return LIMITS_BIN;
}

export interface MembwSample {
  copy_gbs: number;
  read_gbs: number;
}

export interface FmaSample {
  gflops: number;
  vector: string;
}

/** The limits helper as a persistent process: one membw or fma pass per request. */
export class Limits {
  private readonly client: LineClient;
  private constructor(client: LineClient) {
    this.client = client;
  }

  static async start(bin: string, threads: number, mib: number): Promise<Limits> {
    const client = new LineClient("limits", bin, ["serve", String(threads), String(mib)]);
    const ready = JSON.parse(await client.nextLine()) as { kind: string };
    if (ready.kind !== "ready")
      throw new Error(`limits helper: unexpected ${JSON.stringify(ready)}`);
    return new Limits(client);
  }

  async membw(): Promise<MembwSample> {
    return JSON.parse(await this.client.request("membw")) as MembwSample;
  }

  async fma(): Promise<FmaSample> {
    return JSON.parse(await this.client.request("fma")) as FmaSample;
  }

  close(): Promise<void> {
    return this.client.close("quit");
  }
}

// ------------------------------------------------------------------ the PyTorch side

/** The golden venv's python (scripts/golden/setup.sh creates it once, idempotently). */
export function goldenPython(log: (s: string) => void): string {
  log("[bench] scripts/golden/setup.sh (creates the PyTorch venv once; idempotent)");
  const out = execFileSync("bash", [join(REPO_ROOT, "scripts", "golden", "setup.sh")], {
    cwd: REPO_ROOT,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
  });
  const py = out.trim().split("\n").pop() ?? "";
  if (!py || !existsSync(py)) throw new Error(`scripts/golden/setup.sh printed no python (${out})`);
  return py;
}

/** The environment for the PyTorch worker: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (set on
 *  some machines for old OpenBLAS builds) removed so current libraries pick their own
 *  kernels; thread-count variables removed so the worker's explicit count rules. */
export function peerEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  for (const k of [
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
  ]) {
    delete env[k];
  }
  return env;
}

/** `text` as the repo's formatter (biome, which `npm run lint` checks) would write the file
 *  at `path` (JSON, Markdown); unchanged where biome is not installed or declines. */
export function formatLikeRepo(text: string, path: string): string {
  const biome = join(REPO_ROOT, "node_modules", ".bin", "biome");
  if (!existsSync(biome)) return text;
  const r = spawnSync(biome, ["format", `--stdin-file-path=${path}`], {
    cwd: REPO_ROOT,
    input: text,
    encoding: "utf8",
    maxBuffer: 64 * 1024 * 1024,
  });
  return r.status === 0 && r.stdout ? r.stdout : text;
}

/** Today's date in UTC as YYYY-MM-DD. */
export function today(): string {
  return new Date().toISOString().slice(0, 10);
}
