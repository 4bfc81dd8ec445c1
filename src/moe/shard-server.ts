// A shard: holds the routed experts the placement plan gives shard k, answers dispatch
// frames from gateways with weighted partial sums, and reports its load. Requests that
// arrive together are coalesced into one grouped-FFN call over every (layer, expert) they
// touch. Malformed or mismatched frames get an error reply; the shard carries on.
import type { Msg, NatsConnection, Subscription } from "@nats-io/transport-node";
import type { Backend } from "../engine/backend.ts";
import { groupByExpert, runGrouped } from "../engine/experts.ts";
import type { MlpWeights } from "../engine/loader.ts";
import { BufferPool } from "../util/buffer-pool.ts";
import { ExpertMeshError, formatError } from "../util/errors.ts";
import type { PlacementPlan } from "./placement.ts";
import { checkSwitchable, decodePlanControl, type PlanControl } from "./plan-control.ts";
import { serializePlan } from "./plan-json.ts";
import { ReplyBuffers } from "./reply-buffers.ts";
import { type ModelRef, subjects } from "./subjects.ts";
import {
  combineFrameBytes,
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
  /** The active plan (the newest activated one). */
  planVersion: number;
  /** Every plan whose experts are loaded: frames of any of them are served. */
  plans: number[];
  /** The last failure to prepare a plan, if any (e.g. weights missing). */
  planError?: string;
  /** Frames and tokens waiting or being computed now (the queue depth). */
  pendingFrames: number;
  pendingTokens: number;
  /** Tokens waiting or being computed, averaged over time since the previous report. */
  meanPendingTokens: number;
  /** Since the previous report: tokens (assignments) per layer and expert, frames, busy ms. */
  expertTokens: Record<string, Record<string, number>>;
  frames: number;
  processingMs: number;
  timestamp: number;
  /** A shard of a blue/green copy on the previous weights (set by the operator, weights-rollout.ts). */
  previousWeights?: true;
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
  /** The experts this shard holds, by layer (grows and shrinks with live plan changes). */
  experts: Map<number, Map<number, MlpWeights>>;
  /** Reads experts for a new plan; without it the shard refuses live plan changes. */
  loadExperts?: (
    wanted: (layer: number, expert: number) => boolean,
  ) => Promise<Map<number, Map<number, MlpWeights>>>;
  /** How long an older plan stays loaded after a newer one is activated (ms, default 10 s). */
  retireAfterMs?: number;
  log?: (msg: string) => void;
  /** Called as each batch starts and ends (the scratch trimmer's touch). */
  onBatch?: () => void;
  /** Its reports say it serves a blue/green copy on the previous weights (not a replica to scale). */
  previousWeights?: boolean;
}

/** What plan `version` gives this shard: (layer -> experts). */
type Holdings = Map<number, Set<number>>;

export class ShardServer {
  readonly #o: ShardServerOptions;
  #sub: Subscription | undefined;
  #control: Subscription | undefined;
  /** Loaded plans by version, with what each gives this shard. */
  readonly #plans = new Map<number, { plan: PlacementPlan; holds: Holdings }>();
  #active: number;
  #planError: string | undefined;
  /** Plan changes run one at a time, in arrival order. */
  #planChain: Promise<void> = Promise.resolve();
  #retireTimer: NodeJS.Timeout | undefined;
  /** Time integral of pending tokens since the last report (token-ms), for meanPendingTokens. */
  #pendingTokens = 0;
  #pendingSince = performance.now();
  #pendingArea = 0;
  #intervalStart = performance.now();
  #queue: Pending[] = [];
  /**
   * Decoded activations (and the table of a multi-frame batch): each buffer is only read
   * by the synchronous expert call of its batch, so it is free again once the batch replied.
   */
  readonly #acts = new BufferPool();
  /** Reply frames, reused once the NATS client has copied them out (reply-buffers.ts). */
  readonly #replies: ReplyBuffers;
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
    this.#replies = new ReplyBuffers(o.nc);
    this.#plans.set(o.plan.version, { plan: o.plan, holds: holdingsOf(o.plan, o.shard) });
    this.#active = o.plan.version;
  }

  /** Versions of the loaded plans, ascending. */
  get planVersions(): number[] {
    return [...this.#plans.keys()].sort((a, b) => a - b);
  }

  get activePlan(): PlacementPlan {
    return this.#plans.get(this.#active)!.plan;
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
    this.#control = nc.subscribe(subjects.planControl(model), {
      callback: (err, msg) => {
        if (err) return;
        let c: PlanControl;
        try {
          c = decodePlanControl(msg.data);
        } catch (e) {
          this.#o.log?.(`ignoring plan control message: ${formatError(e)}`);
          return;
        }
        this.#planChain = this.#planChain.then(() => this.applyPlanControl(c));
      },
    });
    this.#timer = setInterval(() => this.#report(), reportEveryMs);
    this.#timer.unref();
  }

  /**
   * Prepare: load what `plan` gives this shard (old plans keep serving meanwhile). Activate:
   * prepare if needed, make it the active plan, and retire older plans after the grace period.
   * Never throws: a failure is logged and reported as `planError`.
   */
  async applyPlanControl(c: PlanControl): Promise<void> {
    const { plan } = c;
    try {
      const known = this.#plans.get(plan.version);
      if (known && serializePlan(known.plan) !== serializePlan(plan)) {
        // The same version with other contents: an operator restarted mid-rollout and
        // planned again. Fine while it is not active: prepare the new contents instead.
        if (plan.version <= this.#active)
          throw new ExpertMeshError(
            "EM_PLAN_INVALID",
            `plan v${plan.version} is active here with other contents; a new plan needs a new version`,
          );
        this.#plans.delete(plan.version);
      }
      if (!this.#plans.has(plan.version)) {
        if (plan.version < this.#active) return; // stale message
        checkSwitchable(this.activePlan, plan);
        if (!this.#o.loadExperts)
          throw new ExpertMeshError(
            "EM_PLAN_INVALID",
            "this shard cannot load experts for a new plan",
          );
        const holds = holdingsOf(plan, this.#o.shard);
        const have = this.#o.experts;
        const added = await this.#o.loadExperts(
          (layer, e) => (holds.get(layer)?.has(e) ?? false) && !have.get(layer)?.has(e),
        );
        let n = 0;
        for (const [layer, byExpert] of added) {
          if (!have.has(layer)) have.set(layer, new Map());
          for (const [e, w] of byExpert) {
            have.get(layer)!.set(e, w);
            n++;
          }
        }
        this.#plans.set(plan.version, { plan, holds });
        this.#o.log?.(`prepared plan v${plan.version}: loaded ${n} more experts`);
      }
      this.#planError = undefined;
      if (c.op === "activate" && plan.version > this.#active) {
        this.#active = plan.version;
        this.#o.log?.(`plan v${plan.version} active`);
        clearTimeout(this.#retireTimer);
        this.#retireTimer = setTimeout(() => this.#retire(), this.#o.retireAfterMs ?? 10_000);
        this.#retireTimer.unref();
      }
    } catch (err) {
      this.#planError = `plan v${plan.version}: ${formatError(err)}`;
      this.#o.log?.(`cannot ${c.op} ${this.#planError}`);
    }
  }

  /** Drops plans older than the active one and the experts only they needed. */
  #retire(): void {
    for (const v of this.#plans.keys()) if (v < this.#active) this.#plans.delete(v);
    let dropped = 0;
    for (const [layer, byExpert] of this.#o.experts) {
      for (const e of byExpert.keys()) {
        if (![...this.#plans.values()].some((p) => p.holds.get(layer)?.has(e))) {
          byExpert.delete(e);
          dropped++;
        }
      }
    }
    this.#o.log?.(`retired plans before v${this.#active}; dropped ${dropped} experts`);
  }

  /** Stops taking requests, finishes the ones accepted, then resolves. */
  async drain(): Promise<void> {
    clearInterval(this.#timer);
    clearTimeout(this.#retireTimer);
    await this.#control?.unsubscribe();
    await this.#sub?.drain();
    if (this.#busy || this.#queue.length) await new Promise<void>((r) => this.#idle.push(r));
  }

  #accept(msg: Msg): void {
    let frame: ReturnType<typeof decodeFrame> | undefined;
    try {
      frame = decodeFrame(msg.data, this.#acts.f32);
      if (frame.kind !== "dispatch")
        throw new ExpertMeshError(
          "EM_WIRE_KIND",
          `a shard takes dispatch frames, got ${frame.kind}`,
        );
      this.#check(frame);
    } catch (err) {
      if (frame?.kind === "dispatch") this.#acts.give(frame.activations);
      this.totals.errors++;
      const code = err instanceof ExpertMeshError ? err.code : "EM_SHARD_INTERNAL";
      msg.respond(encodeError(code, formatError(err)));
      return;
    }
    this.#queue.push({ msg, frame, flags: msg.data[7] ?? 0 });
    this.#addPending(frame.numTokens);
    // The client delivers every message of a socket read before microtasks run: frames that
    // arrived together are all queued when the drain starts (one grouped FFN call), without
    // waiting for the next event-loop turn (measured: ~0.03x of the 1-token dispatch round
    // trip, BENCHMARKS.md).
    if (!this.#busy) queueMicrotask(() => this.#drainQueue());
  }

  #check(f: Dispatch): void {
    const { experts } = this.#o;
    const loaded = this.#plans.get(f.planVersion);
    if (!loaded) {
      throw new ExpertMeshError(
        "EM_WIRE_PLAN_VERSION",
        `frame routed with plan v${f.planVersion}; this shard has plan ${this.planVersions.map((v) => `v${v}`).join(", ")}`,
      );
    }
    const held = experts.get(f.layer);
    const planned = loaded.holds.get(f.layer);
    if (!held || !planned)
      throw new ExpertMeshError(
        "EM_WIRE_RANGE",
        `layer ${f.layer} is not an MoE layer of this model`,
      );
    for (const e of f.expert) {
      if (!planned.has(e) || !held.has(e))
        throw new ExpertMeshError(
          "EM_WIRE_RANGE",
          `expert ${e} of layer ${f.layer} is not on shard ${this.#o.shard} (plan v${f.planVersion})`,
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
    this.#o.onBatch?.();
    const batch = this.#queue;
    this.#queue = [];
    const t0 = performance.now();
    let table: Float32Array | undefined;
    let out: Float32Array | undefined;
    try {
      const dim = batch[0]!.frame.hidden;
      // Rows of all frames in one table: token row = frame's base + token index.
      let base = 0;
      const bases = batch.map((p) => {
        const b = base;
        base += p.frame.numTokens;
        return b;
      });
      // One frame (the common case) is its own table; the FFN gathers rows from it.
      let x = batch[0]!.frame.activations;
      if (batch.length > 1) {
        x = table = this.#acts.f32(base * dim);
        batch.forEach((p, i) => {
          x.set(p.frame.activations, bases[i]! * dim);
        });
      }
      for (const p of batch) this.#countLoad(p.frame);
      // The weighted sums, in a pooled buffer (encoded into the replies, then free).
      out = this.#acts.f32(base * dim);
      let sums: Float32Array;
      if (batch.length === 1) {
        // One frame (the common case): grouped by expert straight from its arrays.
        const f = batch[0]!.frame;
        const held = this.#o.experts.get(f.layer)!;
        const g = groupByExpert(x, dim, f.token, f.expert, f.weight);
        sums = runGrouped(this.#o.backend, g, dim, base, (e) => held.get(e)!, out);
      } else {
        // Group by (layer, expert): key = layer * 65536 + expert keeps layers apart.
        const assignments = batch.reduce((n, p) => n + p.frame.token.length, 0);
        const token = new Int32Array(assignments);
        const key = new Float64Array(assignments);
        const weight = new Float32Array(assignments);
        let at = 0;
        batch.forEach((p, i) => {
          const f = p.frame;
          for (let a = 0; a < f.token.length; a++, at++) {
            token[at] = bases[i]! + f.token[a]!;
            key[at] = f.layer * 65536 + f.expert[a]!;
            weight[at] = f.weight[a]!;
          }
        });
        const g = groupByExpert(x, dim, token, key, weight);
        sums = runGrouped(
          this.#o.backend,
          g,
          dim,
          base,
          (k) => this.#o.experts.get(Math.floor(k / 65536))!.get(k % 65536)!,
          out,
        );
      }
      // Every reply buffer of the previous batch was published (or dropped) by now.
      this.#replies.reclaim();
      const maxPayload = this.#o.nc.info?.max_payload ?? Number.POSITIVE_INFINITY;
      batch.forEach((p, i) => {
        const f = p.frame;
        const dtype = p.flags & FLAG_COMBINE_F32 ? "f32" : "bf16";
        const bytes = combineFrameBytes(dtype, f.numTokens, f.hidden);
        if (bytes > maxPayload) {
          // A sender that split by the dispatch's size alone: its reply cannot be sent.
          this.totals.errors++;
          p.msg.respond(
            encodeError(
              "EM_WIRE_RANGE",
              `the ${dtype} reply to ${f.numTokens} tokens needs ${bytes} bytes, more than max_payload ${maxPayload}: split requests so that replies fit too`,
              f.planVersion,
              f.layer,
            ),
          );
          return;
        }
        p.msg.respond(
          encodeCombine(
            { ...f, dtype, sums: sums.subarray(bases[i]! * dim, (bases[i]! + f.numTokens) * dim) },
            this.#replies.take,
          ),
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
      // Every reply is encoded (or the batch failed): the activations are free again.
      for (const p of batch) this.#acts.give(p.frame.activations);
      if (table) this.#acts.give(table);
      if (out) this.#acts.give(out);
      this.#interval.processingMs += performance.now() - t0;
      this.#busy = false;
      this.#o.onBatch?.();
      this.#addPending(-batch.reduce((n, p) => n + p.frame.numTokens, 0));
      if (this.#queue.length) setImmediate(() => this.#drainQueue());
      else for (const r of this.#idle.splice(0)) r();
    }
  }

  /** Adds a frame's assignments to the per-expert token counts of the load report. */
  #countLoad(f: Dispatch): void {
    let byLayer = this.#interval.expertTokens[f.layer];
    for (let a = 0; a < f.expert.length; a++) {
      // Readiness probes send weight 0: not load (a router weight is never exactly 0).
      if (f.weight[a] === 0) continue;
      byLayer ??= this.#interval.expertTokens[f.layer] = {};
      byLayer[f.expert[a]!] = (byLayer[f.expert[a]!] ?? 0) + 1;
    }
  }

  /** Pending tokens changed by `delta`: integrates the old value over the time it held. */
  #addPending(delta: number): void {
    const now = performance.now();
    this.#pendingArea += this.#pendingTokens * (now - this.#pendingSince);
    this.#pendingSince = now;
    this.#pendingTokens += delta;
  }

  /** The current load; resets the per-interval counters. */
  takeLoad(): ShardLoad {
    this.#addPending(0);
    const now = performance.now();
    const span = now - this.#intervalStart;
    const load: ShardLoad = {
      role: "shard",
      shard: this.#o.shard,
      id: this.#o.id,
      planVersion: this.#active,
      plans: this.planVersions,
      ...(this.#planError ? { planError: this.#planError } : {}),
      pendingFrames: this.pendingFrames,
      pendingTokens: this.#pendingTokens,
      meanPendingTokens: span > 0 ? this.#pendingArea / span : this.#pendingTokens,
      ...this.#interval,
      timestamp: Date.now(),
      ...(this.#o.previousWeights ? { previousWeights: true as const } : {}),
    };
    this.#interval = { expertTokens: {}, frames: 0, processingMs: 0 };
    this.#pendingArea = 0;
    this.#intervalStart = now;
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

function holdingsOf(plan: PlacementPlan, shard: number): Holdings {
  return new Map(plan.layers.map((l) => [l.layer, new Set(l.shardExperts[shard])]));
}
