// A shard: holds the routed experts the placement plan gives shard k, answers dispatch
// frames from gateways with weighted partial sums, and reports its load. Requests that
// arrive together are coalesced into one grouped-FFN call over every (layer, expert) they
// touch. Malformed or mismatched frames get an error reply; the shard carries on.
import type { Msg, NatsConnection, Subscription } from "@nats-io/transport-node";
import type { Backend } from "../engine/backend.ts";
import { groupByExpert, runGrouped } from "../engine/experts.ts";
import type { MlpWeights } from "../engine/loader.ts";
import { ExpertMeshError, formatError } from "../util/errors.ts";
import type { PlacementPlan } from "./placement.ts";
import { type ModelRef, subjects } from "./subjects.ts";
import {
  type Dispatch,
  decodeFrame,
  encodeCombine,
  encodeError,
  FLAG_COMBINE_F32,
} from "./wire.ts";

export interface ShardLoad {
  role: "shard";
  shard: number;
  id: string;
  planVersion: number;
  /** Frames and tokens waiting or being computed now (the queue depth). */
  pendingFrames: number;
  pendingTokens: number;
  /** Since the previous report: tokens (assignments) per layer and expert, frames, busy ms. */
  expertTokens: Record<string, Record<string, number>>;
  frames: number;
  processingMs: number;
  timestamp: number;
}

interface Pending {
  msg: Msg;
  frame: Dispatch;
  flags: number;
}

export interface ShardServerOptions {
  nc: NatsConnection;
  model: ModelRef;
  shard: number;
  id: string;
  plan: PlacementPlan;
  backend: Backend;
  /** The experts this shard holds, by layer. */
  experts: Map<number, Map<number, MlpWeights>>;
  log?: (msg: string) => void;
}

export class ShardServer {
  readonly #o: ShardServerOptions;
  #sub: Subscription | undefined;
  #queue: Pending[] = [];
  #busy = false;
  #idle: (() => void)[] = [];
  #timer: NodeJS.Timeout | undefined;
  #interval = {
    expertTokens: {} as Record<string, Record<string, number>>,
    frames: 0,
    processingMs: 0,
  };
  /** Totals since start, for /metrics. */
  readonly totals = { frames: 0, tokens: 0, errors: 0, batches: 0 };

  constructor(o: ShardServerOptions) {
    this.#o = o;
  }

  get pendingFrames(): number {
    return this.#queue.length + (this.#busy ? 1 : 0);
  }

  start(reportEveryMs = 1000): void {
    const { nc, model, shard } = this.#o;
    this.#sub = nc.subscribe(subjects.shard(model, shard), {
      queue: subjects.shardQueue(shard),
      callback: (err, msg) => {
        if (!err) this.#accept(msg);
      },
    });
    this.#timer = setInterval(() => this.#report(), reportEveryMs);
    this.#timer.unref();
  }

  /** Stops taking requests, finishes the ones accepted, then resolves. */
  async drain(): Promise<void> {
    clearInterval(this.#timer);
    await this.#sub?.drain();
    if (this.#busy || this.#queue.length) await new Promise<void>((r) => this.#idle.push(r));
  }

  #accept(msg: Msg): void {
    let frame: ReturnType<typeof decodeFrame>;
    try {
      frame = decodeFrame(msg.data);
      if (frame.kind !== "dispatch")
        throw new ExpertMeshError(
          "EM_WIRE_KIND",
          `a shard takes dispatch frames, got ${frame.kind}`,
        );
      this.#check(frame);
    } catch (err) {
      this.totals.errors++;
      const code = err instanceof ExpertMeshError ? err.code : "EM_SHARD_INTERNAL";
      msg.respond(encodeError(code, formatError(err)));
      return;
    }
    this.#queue.push({ msg, frame, flags: msg.data[7] ?? 0 });
    if (!this.#busy) setImmediate(() => this.#drainQueue());
  }

  #check(f: Dispatch): void {
    const { plan, experts } = this.#o;
    if (f.planVersion !== plan.version) {
      throw new ExpertMeshError(
        "EM_WIRE_PLAN_VERSION",
        `frame routed with plan v${f.planVersion}; this shard has plan v${plan.version}`,
      );
    }
    const held = experts.get(f.layer);
    if (!held)
      throw new ExpertMeshError(
        "EM_WIRE_RANGE",
        `layer ${f.layer} is not an MoE layer of this model`,
      );
    for (const e of f.expert) {
      if (!held.has(e))
        throw new ExpertMeshError(
          "EM_WIRE_RANGE",
          `expert ${e} of layer ${f.layer} is not on shard ${this.#o.shard} (plan v${plan.version})`,
        );
    }
    const dim = held.values().next().value?.gate.cols;
    if (dim !== undefined && f.hidden !== dim)
      throw new ExpertMeshError("EM_WIRE_RANGE", `frame width ${f.hidden}, model width ${dim}`);
  }

  /** Computes every queued frame in one grouped call, replies to each. */
  #drainQueue(): void {
    if (this.#busy || this.#queue.length === 0) return;
    this.#busy = true;
    const batch = this.#queue;
    this.#queue = [];
    const t0 = performance.now();
    try {
      const dim = batch[0]!.frame.hidden;
      // Rows of all frames in one table: token row = frame's base + token index.
      let base = 0;
      const bases = batch.map((p) => {
        const b = base;
        base += p.frame.numTokens;
        return b;
      });
      const x = new Float32Array(base * dim);
      batch.forEach((p, i) => {
        x.set(p.frame.activations, bases[i]! * dim);
      });
      // Group by (layer, expert): key = layer * 65536 + expert keeps layers apart.
      const token: number[] = [];
      const key: number[] = [];
      const weight: number[] = [];
      batch.forEach((p, i) => {
        const f = p.frame;
        for (let a = 0; a < f.token.length; a++) {
          token.push(bases[i]! + f.token[a]!);
          key.push(f.layer * 65536 + f.expert[a]!);
          weight.push(f.weight[a]!);
          this.#count(f.layer, f.expert[a]!);
        }
      });
      const g = groupByExpert(x, dim, token, key, weight);
      const sums = runGrouped(
        this.#o.backend,
        g,
        dim,
        base,
        (k) => this.#o.experts.get(Math.floor(k / 65536))!.get(k % 65536)!,
      );
      batch.forEach((p, i) => {
        const f = p.frame;
        p.msg.respond(
          encodeCombine({
            ...f,
            dtype: p.flags & FLAG_COMBINE_F32 ? "f32" : "bf16",
            sums: sums.subarray(bases[i]! * dim, (bases[i]! + f.numTokens) * dim),
          }),
        );
        this.totals.tokens += f.numTokens;
      });
      this.totals.frames += batch.length;
      this.totals.batches++;
      this.#interval.frames += batch.length;
    } catch (err) {
      this.totals.errors++;
      this.#o.log?.(`batch failed: ${formatError(err)}`);
      for (const p of batch)
        p.msg.respond(
          encodeError("EM_SHARD_INTERNAL", formatError(err), p.frame.planVersion, p.frame.layer),
        );
    } finally {
      this.#interval.processingMs += performance.now() - t0;
      this.#busy = false;
      if (this.#queue.length) setImmediate(() => this.#drainQueue());
      else for (const r of this.#idle.splice(0)) r();
    }
  }

  #count(layer: number, expert: number): void {
    this.#interval.expertTokens[layer] ??= {};
    const byLayer = this.#interval.expertTokens[layer];
    byLayer[expert] = (byLayer[expert] ?? 0) + 1;
  }

  /** The current load; resets the per-interval counters. */
  takeLoad(): ShardLoad {
    const load: ShardLoad = {
      role: "shard",
      shard: this.#o.shard,
      id: this.#o.id,
      planVersion: this.#o.plan.version,
      pendingFrames: this.pendingFrames,
      pendingTokens: this.#queue.reduce((n, p) => n + p.frame.numTokens, 0),
      ...this.#interval,
      timestamp: Date.now(),
    };
    this.#interval = { expertTokens: {}, frames: 0, processingMs: 0 };
    return load;
  }

  #report(): void {
    const { nc, model, id } = this.#o;
    if (nc.isClosed()) return;
    nc.publish(
      subjects.stats(model, "shard", `${this.#o.shard}.${id}`),
      JSON.stringify(this.takeLoad()),
    );
  }
}
