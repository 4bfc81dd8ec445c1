// What the operator knows from the load reports of one model's gateways and shards
// (em.<ns>.<model>.stats.<role>.<id>, once a second each). Pure: every call takes the time,
// so the windows and staleness are table-testable.
//
// Queue depth per role: gateways (and prefill gateways) report requests waiting; shards the time-averaged tokens
// pending since their last report. Each reporter's samples are averaged over the metric
// window; a reporter whose last report is older than `staleMs` counts as absent.
import type { Observation } from "./hpa.ts";

/** A gateway's, or a prefill gateway's (spec.gateway.disaggregation): their own roles. */
export interface GatewayReport {
  role: "gateway" | "prefill";
  id: string;
  waiting: number;
  running?: number;
  planVersion?: number;
}

export interface ShardReport {
  role: "shard";
  shard: number;
  id: string;
  planVersion: number;
  plans?: number[];
  planError?: string;
  pendingTokens: number;
  meanPendingTokens?: number;
  /** Tokens per layer and expert since the previous report. */
  expertTokens?: Record<string, Record<string, number>>;
  /** A shard of a blue/green copy on the previous weights (weights-rollout.ts). */
  previousWeights?: boolean;
}

export type LoadReport = GatewayReport | ShardReport;

/** `gateway`, `prefill` or `shard-<k>`. */
export type RoleKey = string;
export const shardRole = (k: number): RoleKey => `shard-${k}`;

interface Reporter {
  role: RoleKey;
  /** A shard of a blue/green copy on the previous weights (weights-rollout.ts): not scaled. */
  previous: boolean;
  samples: { at: number; depth: number }[];
  last: LoadReport;
  lastAt: number;
}

export interface TrackerOptions {
  windowMs: number;
  staleMs: number;
  /** Window of the per-expert token counts (rebalancing). */
  expertWindowMs: number;
}

/** Parses a load report from NATS; undefined for anything malformed. */
export function parseReport(data: Uint8Array | string): LoadReport | undefined {
  let v: Record<string, unknown>;
  try {
    v = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
  } catch {
    return undefined;
  }
  if (!v || typeof v !== "object" || typeof v["id"] !== "string") return undefined;
  const num = (x: unknown) => typeof x === "number" && Number.isFinite(x) && x >= 0;
  if ((v["role"] === "gateway" || v["role"] === "prefill") && num(v["waiting"]))
    return v as unknown as GatewayReport;
  if (
    v["role"] === "shard" &&
    Number.isInteger(v["shard"]) &&
    num(v["shard"]) &&
    num(v["pendingTokens"]) &&
    Number.isInteger(v["planVersion"])
  )
    return v as unknown as ShardReport;
  return undefined;
}

export class LoadTracker {
  #o: TrackerOptions;
  readonly #reporters = new Map<string, Reporter>();
  /** Per-expert token counts: (time, layer, expert, tokens), oldest first. */
  #expertSamples: { at: number; counts: Record<string, Record<string, number>> }[] = [];
  /** Every report ever accepted (for tests and metrics). */
  accepted = 0;

  constructor(o: TrackerOptions) {
    this.#o = o;
  }

  /** New windows (the spec changed); samples are kept. */
  setOptions(o: TrackerOptions): void {
    this.#o = o;
  }

  /**
   * A report at `now`. `previous`: it comes from a copy of the shard on the previous weights
   * (spec.experts.weightsRollout BlueGreen). Such a copy serves the old gateways while the
   * shard's Deployment rolls, so it takes plan changes like any replica (`fresh` lists it),
   * and its experts' tokens are the model's traffic; but it is no replica of the Deployment
   * being scaled, so `observe` leaves it out (counted, two copies beside two replicas would
   * make HPA's arithmetic scale the two to four below target).
   */
  add(r: LoadReport, now: number, previous = false): void {
    const role = r.role === "shard" ? shardRole(r.shard) : r.role;
    const key = `${role}/${r.id}`;
    const depth = r.role === "shard" ? (r.meanPendingTokens ?? r.pendingTokens) : r.waiting;
    let rep = this.#reporters.get(key);
    if (!rep) {
      rep = { role, previous, samples: [], last: r, lastAt: now };
      this.#reporters.set(key, rep);
    }
    rep.samples.push({ at: now, depth });
    rep.last = r;
    rep.lastAt = now;
    if (r.role === "shard" && r.expertTokens)
      this.#expertSamples.push({ at: now, counts: r.expertTokens });
    this.accepted++;
    this.#prune(now);
  }

  #prune(now: number): void {
    for (const [key, rep] of this.#reporters) {
      rep.samples = rep.samples.filter((s) => now - s.at <= this.#o.windowMs);
      // Forget a reporter long gone (kept a while so status can say it went silent).
      if (now - rep.lastAt > Math.max(this.#o.windowMs, this.#o.staleMs) * 4)
        this.#reporters.delete(key);
    }
    const cut = now - this.#o.expertWindowMs;
    while (this.#expertSamples.length && this.#expertSamples[0]!.at < cut)
      this.#expertSamples.shift();
  }

  /**
   * Fresh reporters of a role and their window-averaged queue depth (the replicas of its
   * Deployment: copies on the previous weights left out).
   */
  observe(role: RoleKey, now: number): Observation {
    this.#prune(now);
    let reporters = 0;
    let total = 0;
    let stale = 0;
    for (const rep of this.#reporters.values()) {
      if (rep.role !== role || rep.previous) continue;
      if (now - rep.lastAt > this.#o.staleMs || rep.samples.length === 0) {
        stale++;
        continue;
      }
      reporters++;
      total += rep.samples.reduce((n, s) => n + s.depth, 0) / rep.samples.length;
    }
    if (reporters > 0) return { reporters, total };
    return {
      reporters: 0,
      total: 0,
      unknownReason: stale
        ? `the last report of ${stale} replica(s) is older than ${this.#o.staleMs / 1000} s`
        : "no load report received",
    };
  }

  /** The latest report of every fresh reporter of a role (copies included). */
  fresh(role: RoleKey, now: number): LoadReport[] {
    return [...this.#reporters.values()]
      .filter((r) => r.role === role && now - r.lastAt <= this.#o.staleMs)
      .map((r) => r.last);
  }

  /**
   * Routed tokens per (MoE layer, expert) summed over the window and over all shard
   * replicas, [moeLayers.length][routedExperts], and their total.
   */
  expertLoad(moeLayers: readonly number[], routedExperts: number, now: number) {
    this.#prune(now);
    const load = moeLayers.map(() => new Array<number>(routedExperts).fill(0));
    const index = new Map(moeLayers.map((l, i) => [String(l), i]));
    let total = 0;
    for (const s of this.#expertSamples) {
      for (const [layer, byExpert] of Object.entries(s.counts)) {
        const i = index.get(layer);
        if (i === undefined) continue;
        for (const [e, n] of Object.entries(byExpert)) {
          const ei = Number(e);
          if (!Number.isInteger(ei) || ei < 0 || ei >= routedExperts || !(n > 0)) continue;
          load[i]![ei]! += n;
          total += n;
        }
      }
    }
    return { load, total };
  }
}
