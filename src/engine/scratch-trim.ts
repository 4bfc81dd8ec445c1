// Gives the native engine's scratch caches back once a process has been quiet a while. The
// CPU backend keeps its large scratch arrays (1 MiB or more) per thread for the next calls
// (ADR 0025): a long prompt's chunk leaves hundreds of MiB (GBs at V3's dims) mapped, which
// the next long prompt reuses without faulting pages in. A serving process that then sits
// idle would hold them for ever; after `afterMs` without a step (or a shard's batch) this
// frees them. A burst keeps them: any activity restarts the wait.
import { Gauge, type Registry } from "prom-client";
import { ExpertMeshError } from "../util/errors.ts";
import type { Backend } from "./backend.ts";

/** Default quiet time before a trim (ms); `EM_SCRATCH_TRIM_MS` overrides it, 0 never trims. */
export const DEFAULT_SCRATCH_TRIM_MS = 30_000;

/** The quiet time from `EM_SCRATCH_TRIM_MS` (ms; 0: never), else the default. */
export function scratchTrimAfterMs(env: NodeJS.ProcessEnv = process.env): number {
  const v = env["EM_SCRATCH_TRIM_MS"];
  if (v === undefined || v === "") return DEFAULT_SCRATCH_TRIM_MS;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0)
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `EM_SCRATCH_TRIM_MS must be a whole number of milliseconds >= 0, got '${v}'`,
    );
  return n;
}

export class ScratchTrimmer {
  readonly #trim: () => number;
  readonly #afterMs: number;
  readonly #onTrim: ((bytes: number) => void) | undefined;
  readonly #timer: NodeJS.Timeout;
  #last = performance.now();
  /** Nothing ran since the last trim (or since start): no trim is due. */
  #quiet = true;
  /** Trims done, and the bytes they freed. */
  trims = 0;
  freedBytes = 0;

  constructor(trim: () => number, afterMs: number, onTrim?: (bytes: number) => void) {
    if (!(afterMs > 0)) throw new RangeError(`afterMs must be > 0, got ${afterMs}`);
    this.#trim = trim;
    this.#afterMs = afterMs;
    this.#onTrim = onTrim;
    // Checked a few times per quiet period; never keeps the process alive.
    this.#timer = setInterval(() => this.check(), Math.max(10, Math.min(afterMs / 4, 5000)));
    this.#timer.unref();
  }

  /** Work ran (a step, a batch): the quiet time starts again. */
  touch(now = performance.now()): void {
    this.#last = now;
    this.#quiet = false;
  }

  /** Trims when the quiet time has passed since the last work (the timer calls it). */
  check(now = performance.now()): void {
    if (this.#quiet || now - this.#last < this.#afterMs) return;
    this.#quiet = true;
    const bytes = this.#trim();
    this.trims++;
    this.freedBytes += bytes;
    this.#onTrim?.(bytes);
  }

  close(): void {
    clearInterval(this.#timer);
  }
}

/**
 * The trimmer of a serving process's backend (gateway, shard): none for a backend without
 * scratch memory or when `afterMs` is 0; each trim logged.
 */
export function scratchTrimmerFor(
  backend: Backend,
  log: ((line: string) => void) | undefined,
  afterMs = scratchTrimAfterMs(),
): ScratchTrimmer | undefined {
  const trim = backend.trimScratch?.bind(backend);
  if (!trim || afterMs <= 0) return undefined;
  return new ScratchTrimmer(trim, afterMs, (bytes) =>
    log?.(
      `idle for ${afterMs / 1000} s: freed ${(bytes / 2 ** 20).toFixed(0)} MiB of native scratch`,
    ),
  );
}

/** `expertmesh_native_scratch_bytes` in `registry` (gateways and shards), read at each scrape. */
export function registerScratchGauge(registry: Registry, scratchBytes: () => number): void {
  new Gauge({
    name: "expertmesh_native_scratch_bytes",
    help: "Scratch memory the native engine keeps between calls (per-thread caches of its large arrays; freed after a quiet time).",
    registers: [registry],
    collect() {
      this.set(scratchBytes());
    },
  });
}
