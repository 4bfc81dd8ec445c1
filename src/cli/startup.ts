// What a starting `shard` or `gateway` says about itself while it loads weights and waits
// for NATS. Both open their probe port first, so that a pod's liveness probe is answered
// during a load of many minutes (a probe nobody answers gets the container killed after
// a minute), and readiness says which step the process is on, with the bytes read so far
// also in /metrics.
import { Gauge, type Registry } from "prom-client";

const GiB = 2 ** 30;

export interface StartupOptions {
  /** "gateway" or "shard": the `role` label of the metrics. */
  readonly role: string;
  /** Where the startup gauges are registered (more can be added: `register`). */
  readonly registry: Registry;
  readonly now?: () => number;
}

/** A process's startup: the step it is on, until `done()`. */
export class Startup {
  readonly #now: () => number;
  readonly #t0: number;
  readonly #gauges: Gauge[];
  readonly #registry: Registry;
  readonly #role: string;
  #phase = "starting";
  #done = false;
  #bytes: { read: () => number; total: number } | null = null;
  /** stalled(): the step and bytes last seen, and since when (ms). */
  #mark = "";
  #since = 0;

  constructor(o: StartupOptions) {
    this.#now = o.now ?? Date.now;
    this.#t0 = this.#now();
    this.#registry = o.registry;
    this.#role = o.role;
    const labels = { role: o.role };
    const self = this;
    this.#gauges = [
      new Gauge({
        name: "expertmesh_startup_complete",
        help: "1 once the process has loaded its weights and connected (it may then serve), 0 before.",
        labelNames: ["role"],
        registers: [o.registry],
        collect() {
          this.set(labels, self.#done ? 1 : 0);
        },
      }),
      new Gauge({
        name: "expertmesh_load_read_bytes",
        help: "Bytes of weights read from the checkpoint so far.",
        labelNames: ["role"],
        registers: [o.registry],
        collect() {
          this.set(labels, self.#bytes?.read() ?? 0);
        },
      }),
      new Gauge({
        name: "expertmesh_load_size_bytes",
        help: "Bytes of weights this process reads from the checkpoint in all.",
        labelNames: ["role"],
        registers: [o.registry],
        collect() {
          this.set(labels, self.#bytes?.total ?? 0);
        },
      }),
    ];
  }

  /**
   * The weights' digest (ADR 0035) as `expertmesh_weights_info{role, digest} 1`: a rollout
   * to other weights shows in Prometheus as two digests, `count by (digest)`.
   */
  weights(digest: string): void {
    const info = new Gauge({
      name: "expertmesh_weights_info",
      help: "1, labelled with the digest of the weights this process loaded (shards and gateways meet only with the same).",
      labelNames: ["role", "digest"],
      registers: [this.#registry],
    });
    info.set({ role: this.#role, digest }, 1);
    this.#gauges.push(info); // for `register`, called after this
  }

  /** Whether startup is over. */
  get done(): boolean {
    return this.#done;
  }

  /** The step, for /ready and /readyz: "loading experts 3/16 (0.2 of 1.0 GiB)". */
  get phase(): string {
    return this.#phase;
  }

  /** Seconds since the process started starting. */
  get elapsedSeconds(): number {
    return (this.#now() - this.#t0) / 1000;
  }

  /** The loader's byte counts (read so far: a function; in all: a number). */
  bytes(read: () => number, total: number): void {
    this.#bytes = { read, total };
  }

  /** The current step. */
  step(phase: string): void {
    this.#phase = phase;
  }

  /** A loading step: `done` of `total` `unit` loaded, with the bytes when known. */
  loading(unit: string, done: number, total: number): void {
    const b = this.#bytes;
    const gib = (n: number) => (n / GiB).toFixed(n < 10 * GiB ? 2 : 1);
    this.#phase =
      `loading ${unit} ${done}/${total}` +
      (b && b.total > 0 ? ` (${gib(b.read())} of ${gib(b.total)} GiB)` : "");
  }

  /** Reading the checkpoint's headers: `done` of `total` files. */
  opening(done: number, total: number): void {
    this.#phase = `opening the checkpoint: file ${done}/${total}`;
  }

  /** Startup is over: the process serves from now on. */
  finish(): void {
    this.#done = true;
    this.#phase = "serving";
  }

  /**
   * The stall in seconds, as a message, when opening the checkpoint or loading the weights
   * has made no progress for `seconds`: no byte read and no step taken since the last
   * progress seen by an earlier call. Null otherwise, and once a later step (connecting
   * to NATS, which --nats-wait bounds) or serving began.
   */
  stalled(seconds: number): string | null {
    const p = this.#phase;
    if (this.#done || !(p === "starting" || p.startsWith("opening") || p.startsWith("loading")))
      return null;
    const now = this.#now();
    const mark = `${this.#phase}\u0000${this.#bytes?.read() ?? 0}`;
    if (mark !== this.#mark) {
      this.#mark = mark;
      this.#since = now;
      return null;
    }
    const idle = (now - this.#since) / 1000;
    return idle >= seconds
      ? `no progress for ${idle < 10 ? idle.toFixed(1) : Math.floor(idle)} s while ${p === "starting" ? "starting" : p}: the weights' volume may hang (a network file system, a FUSE mount)`
      : null;
  }

  /**
   * Calls `onStall` (once) when stalled(seconds) says so, checking every `seconds`/10
   * (at most 5 s); 0 never. The timer does not keep the process alive.
   */
  watchStalls(seconds: number, onStall: (message: string) => void): void {
    if (seconds <= 0) return;
    const timer = setInterval(
      () => {
        if (this.#done) return clearInterval(timer);
        const why = this.stalled(seconds);
        if (why === null) return;
        clearInterval(timer);
        onStall(why);
      },
      Math.min(5000, seconds * 100),
    );
    timer.unref();
    this.stalled(seconds);
  }

  /** Registers the startup gauges in another registry too (the served one, once built). */
  register(registry: Registry): void {
    for (const g of this.#gauges) registry.registerMetric(g);
  }
}
