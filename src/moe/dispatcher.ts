// The gateway side of expert parallelism: for each MoE layer, the batch's (token, expert)
// pairs are grouped by the shard that holds the expert, one request per shard goes out
// concurrently (split under max_payload), and the shards' weighted partial sums are added
// up. Every request has a deadline; a failed or silent replica is retried (NATS hands the
// retry to another replica of the queue group); when no replica answers in time the layer
// fails with EM_DISPATCH_UNAVAILABLE instead of hanging or returning partial sums.
import type { NatsConnection } from "@nats-io/transport-node";
import type { ExpertRunner } from "../engine/experts.ts";
import { ExpertMeshError, formatError } from "../util/errors.ts";
import { type PlacementPlan, shardsForExperts } from "./placement.ts";
import { type ModelRef, subjects } from "./subjects.ts";
import {
  type Combine,
  type Dispatch,
  decodeFrame,
  encodeDispatch,
  FLAG_COMBINE_F32,
  joinCombines,
  splitDispatch,
  type WireDtypeName,
} from "./wire.ts";

export interface DispatcherOptions {
  nc: NatsConnection;
  model: ModelRef;
  plan: PlacementPlan;
  /** Activations on the wire (default bf16; f32 makes distributed = single-process up to summation order). */
  dispatchDtype?: WireDtypeName;
  combineDtype?: "bf16" | "f32";
  /** Deadline of one layer's round trip, retries included (ms). */
  deadlineMs?: number;
  /** Time one attempt waits for a reply (ms). */
  attemptTimeoutMs?: number;
  /** Observes each shard round trip (for metrics). */
  onRoundTrip?: (shard: number, ms: number, ok: boolean) => void;
}

/** Routed experts on remote shards, over NATS. */
export class RemoteExperts implements ExpertRunner {
  readonly #o: Required<Omit<DispatcherOptions, "onRoundTrip">> &
    Pick<DispatcherOptions, "onRoundTrip">;
  /** Retries done (a replica failed or timed out and another one answered). */
  retries = 0;

  constructor(o: DispatcherOptions) {
    this.#o = {
      dispatchDtype: "bf16",
      combineDtype: "bf16",
      deadlineMs: 10_000,
      attemptTimeoutMs: 2_000,
      ...o,
    };
  }

  async run(
    layer: number,
    x: Float32Array,
    t: number,
    dim: number,
    ids: Int32Array,
    weights: Float32Array,
    topK: number,
  ): Promise<Float32Array> {
    const { plan } = this.#o;
    // Per shard: its tokens (local index -> global token) and its assignments.
    const perShard = new Map<
      number,
      {
        tokens: number[];
        local: Map<number, number>;
        token: number[];
        expert: number[];
        weight: number[];
      }
    >();
    for (let tok = 0; tok < t; tok++) {
      for (let k = 0; k < topK; k++) {
        const e = ids[tok * topK + k]!;
        const [shard] = shardsForExperts(plan, layer, [e], tok);
        let s = perShard.get(shard!);
        if (!s) {
          s = { tokens: [], local: new Map(), token: [], expert: [], weight: [] };
          perShard.set(shard!, s);
        }
        let li = s.local.get(tok);
        if (li === undefined) {
          li = s.tokens.length;
          s.local.set(tok, li);
          s.tokens.push(tok);
        }
        s.token.push(li);
        s.expert.push(e);
        s.weight.push(weights[tok * topK + k]!);
      }
    }
    const deadline = Date.now() + this.#o.deadlineMs;
    const shards = [...perShard.keys()].sort((a, b) => a - b);
    const results = await Promise.all(
      shards.map((shard) => {
        const s = perShard.get(shard)!;
        const acts = new Float32Array(s.tokens.length * dim);
        s.tokens.forEach((tok, i) => {
          acts.set(x.subarray(tok * dim, (tok + 1) * dim), i * dim);
        });
        const d: Dispatch = {
          dtype: this.#o.dispatchDtype,
          planVersion: plan.version,
          layer,
          hidden: dim,
          numTokens: s.tokens.length,
          tokenOffset: 0,
          totalTokens: s.tokens.length,
          activations: acts,
          token: Uint32Array.from(s.token),
          expert: Uint32Array.from(s.expert),
          weight: Float32Array.from(s.weight),
        };
        return this.#roundTrip(shard, d, deadline);
      }),
    );
    // Add the partial sums in shard order (a fixed order: the same inputs give the same bits).
    const out = new Float32Array(t * dim);
    shards.forEach((shard, i) => {
      const s = perShard.get(shard)!;
      const sums = results[i]!;
      s.tokens.forEach((tok, li) => {
        for (let j = 0; j < dim; j++) out[tok * dim + j]! += sums[li * dim + j]!;
      });
    });
    return out;
  }

  /** Sends one shard's dispatch (split under max_payload) and joins the replies. */
  async #roundTrip(shard: number, d: Dispatch, deadline: number): Promise<Float32Array> {
    const { nc, model } = this.#o;
    const maxPayload = nc.info?.max_payload ?? 1024 * 1024;
    const flags = this.#o.combineDtype === "f32" ? FLAG_COMBINE_F32 : 0;
    const parts = splitDispatch(d, maxPayload);
    const subject = subjects.shard(model, shard);
    const t0 = performance.now();
    try {
      const replies = await Promise.all(
        parts.map((p) => this.#request(subject, shard, encodeDispatch(p, flags), deadline, d)),
      );
      this.#o.onRoundTrip?.(shard, performance.now() - t0, true);
      return joinCombines(replies, d);
    } catch (err) {
      this.#o.onRoundTrip?.(shard, performance.now() - t0, false);
      throw err;
    }
  }

  async #request(
    subject: string,
    shard: number,
    frame: Uint8Array,
    deadline: number,
    d: Dispatch,
  ): Promise<Combine> {
    let last: unknown;
    for (let attempt = 0; ; attempt++) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      try {
        const msg = await this.#o.nc.request(subject, frame, {
          timeout: Math.min(this.#o.attemptTimeoutMs, left),
        });
        const reply = decodeFrame(msg.data);
        if (reply.kind === "error") {
          // A shard that refuses the frame will refuse it again: no retry.
          throw new ExpertMeshError(
            reply.code === "EM_WIRE_PLAN_VERSION" ? "EM_WIRE_PLAN_VERSION" : "EM_DISPATCH_REJECTED",
            `shard ${shard}: [${reply.code}] ${reply.message}`,
          );
        }
        if (
          reply.kind !== "combine" ||
          reply.planVersion !== d.planVersion ||
          reply.layer !== d.layer
        ) {
          throw new ExpertMeshError(
            "EM_WIRE_PLAN_VERSION",
            `shard ${shard} answered for plan v${reply.planVersion} layer ${reply.layer}, expected v${d.planVersion} layer ${d.layer}`,
          );
        }
        if (attempt > 0) this.retries++;
        return reply;
      } catch (err) {
        if (err instanceof ExpertMeshError) throw err;
        last = err;
        // No responders answers at once: give a restarting replica or NATS a moment.
        await new Promise((r) =>
          setTimeout(r, Math.min(100 * 2 ** attempt, 1000, Math.max(0, deadline - Date.now()))),
        );
      }
    }
    throw new ExpertMeshError(
      "EM_DISPATCH_UNAVAILABLE",
      `no replica of shard ${shard} (${subject}) answered layer ${d.layer} within the ${this.#o.deadlineMs} ms deadline: ${last ? formatError(last) : "timed out"}`,
    );
  }
}
