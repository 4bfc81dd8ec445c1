// The gateway side of expert parallelism: for each MoE layer, the batch's (token, expert)
// pairs are grouped by the shard that holds the expert, one request per shard goes out
// concurrently (split under max_payload), and the shards' weighted partial sums are added
// up. Every request has a deadline; a failed or silent replica is retried (NATS hands the
// retry to another replica of the queue group); when no replica answers in time the layer
// fails with EM_DISPATCH_UNAVAILABLE instead of hanging or returning partial sums.
import type { NatsConnection } from "@nats-io/transport-node";
import type { ExpertRunner } from "../engine/experts.ts";
import { BufferPool } from "../util/buffer-pool.ts";
import { ExpertMeshError, formatError } from "../util/errors.ts";
import { layerOf, type PlacementPlan, shardsForExperts } from "./placement.ts";
import { checkSwitchable } from "./plan-control.ts";
import { Requester } from "./requester.ts";
import { type ModelRef, subjects } from "./subjects.ts";
import {
  addCombine,
  type CombineView,
  checkCombines,
  decodeReply,
  encodeDispatchRows,
  encodeTable,
  FLAG_COMBINE_F32,
  splitRanges,
  type WireDtypeName,
  type WireTable,
} from "./wire.ts";

/** One shard's part of a layer: its tokens (rows of the layer's x) and their assignments. */
interface ShardJob {
  shard: number;
  /** [tokens] the row of x of each of the shard's tokens, ascending. */
  rows: Int32Array;
  /** [assignments] index into `rows` (non-decreasing), expert id, gate weight. */
  token: Uint32Array;
  expert: Uint32Array;
  weight: Float32Array;
  /** Filled so far (while grouping). */
  nt: number;
  na: number;
}

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
  /**
   * Picks each token's copy of a redundant expert by a hash of its own activations instead of
   * its place in the step (`--batch-invariant`, ADR 0027): a token's experts then fall into the
   * same shards' partial sums whatever else the step holds. Default false.
   */
  batchInvariant?: boolean;
}

/** Routed experts on remote shards, over NATS. */
export class RemoteExperts implements ExpertRunner {
  readonly #o: Required<Omit<DispatcherOptions, "onRoundTrip">> &
    Pick<DispatcherOptions, "onRoundTrip">;
  /** Retries done (a replica failed or timed out and another one answered). */
  retries = 0;
  /**
   * Dispatch frame buffers. A frame's buffer comes back once every reply of its layer has
   * arrived (the NATS client has sent and dropped it by then); the frames of a layer that
   * failed are left to the collector, in case the client still holds one for a reconnect.
   */
  readonly #frames = new BufferPool();
  readonly #requester: Requester;
  /** Results the caller handed back (release()). */
  readonly #results = new BufferPool(4);
  #table = new Uint8Array(0);

  /** The fp8 table's buffer of n bytes (grown, never shrunk). */
  #tableBytes(n: number): Uint8Array {
    if (this.#table.length < n) this.#table = new Uint8Array(n);
    return this.#table.subarray(0, n);
  }

  /** The plan new frames are routed with. */
  get plan(): PlacementPlan {
    return this.#o.plan;
  }

  /**
   * Routes frames of layers that start from now on with `plan` (a live rebalance, ADR 0003):
   * the shards must have prepared it. Frames in flight finish on their own plan. Ignores an
   * older version. Throws EM_PLAN_INVALID when the plan's shape differs (needs a restart).
   */
  setPlan(plan: PlacementPlan): boolean {
    if (plan.version <= this.#o.plan.version) return false;
    checkSwitchable(this.#o.plan, plan);
    this.#o.plan = plan;
    return true;
  }

  constructor(o: DispatcherOptions) {
    this.#o = {
      dispatchDtype: "bf16",
      combineDtype: "bf16",
      deadlineMs: 10_000,
      attemptTimeoutMs: 2_000,
      batchInvariant: false,
      ...o,
    };
    this.#requester = new Requester(o.nc);
  }

  release(result: Float32Array): void {
    this.#results.give(result);
  }

  /** Unsubscribes the reply inbox; layers in flight fail (and may retry on a new one). */
  close(): void {
    this.#requester.close();
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
    const { replicas } = layerOf(plan, layer);
    // Pass 1: the shard of every assignment (the token's copy of its expert), and how many
    // tokens and assignments each shard gets. Typed arrays, no per-token objects: this runs
    // for every layer of every step.
    const n = t * topK;
    const shardOf = new Int32Array(n);
    const tokens = new Int32Array(plan.numShards);
    const assigns = new Int32Array(plan.numShards);
    const last = new Int32Array(plan.numShards).fill(-1);
    const bits = this.#o.batchInvariant ? new Uint32Array(x.buffer, x.byteOffset, t * dim) : null;
    for (let tok = 0; tok < t; tok++) {
      const pick = bits ? copyHash(bits, tok * dim, dim) : tok;
      for (let k = 0; k < topK; k++) {
        const i = tok * topK + k;
        const copies = replicas[ids[i]!];
        if (!copies) shardsForExperts(plan, layer, [ids[i]!], tok); // throws EM_PLAN_LOOKUP
        const s = copies![pick % copies!.length]!;
        shardOf[i] = s;
        assigns[s]!++;
        if (last[s] !== tok) {
          last[s] = tok;
          tokens[s]!++;
        }
      }
    }
    // Pass 2: each shard's tokens (rows of x, read in place by the encoder) and assignments,
    // all in one buffer: a typed array of more than 64 bytes is an off-heap allocation of
    // its own (about 1 µs, and collector work), and there are four per shard per layer.
    let words = 0;
    for (let s = 0; s < plan.numShards; s++) words += tokens[s]! + 3 * assigns[s]!;
    const buf = new ArrayBuffer(4 * words);
    let at = 0;
    const view = <A extends Int32Array | Uint32Array | Float32Array>(
      Ctor: new (b: ArrayBuffer, offset: number, length: number) => A,
      length: number,
    ): A => {
      const v = new Ctor(buf, at, length);
      at += 4 * length;
      return v;
    };
    const jobs: ShardJob[] = [];
    const jobOf: (ShardJob | undefined)[] = [];
    for (let s = 0; s < plan.numShards; s++) {
      if (assigns[s] === 0) continue;
      const a = assigns[s]!;
      const job: ShardJob = {
        shard: s,
        rows: view(Int32Array, tokens[s]!),
        token: view(Uint32Array, a),
        expert: view(Uint32Array, a),
        weight: view(Float32Array, a),
        nt: 0,
        na: 0,
      };
      jobs.push(job);
      jobOf[s] = job;
    }
    last.fill(-1);
    for (let tok = 0; tok < t; tok++) {
      for (let k = 0; k < topK; k++) {
        const i = tok * topK + k;
        const s = shardOf[i]!;
        const job = jobOf[s]!;
        if (last[s] !== tok) {
          last[s] = tok;
          job.rows[job.nt++] = tok;
        }
        job.token[job.na] = job.nt - 1;
        job.expert[job.na] = ids[i]!;
        job.weight[job.na++] = weights[i]!;
      }
    }
    // fp8: every token's codes and scales computed once (a token goes to several shards:
    // about 3.5 of 4 with top-8), each shard's frame copies its rows; that halves the
    // encoding time of a layer. bf16 converts about as fast as it copies: its frames
    // convert their rows in place. The table's buffer is reused from layer to layer: the
    // frames are all encoded before the first await below.
    const src =
      this.#o.dispatchDtype === "fp8" ? encodeTable(x, dim, "fp8", (b) => this.#tableBytes(b)) : x;
    const deadline = Date.now() + this.#o.deadlineMs;
    const sent: Uint8Array[] = [];
    // The partial sums are added in shard order (a fixed order: the same inputs give the
    // same bits), straight from the reply frames into the output rows of their tokens (each
    // reply's checksum is checked in the same pass; a mismatch fails the layer). A shard's
    // replies are added as soon as every shard before it has been: the first ones are
    // converted while the last are still on their way.
    const out = this.#results.f32(t * dim).fill(0);
    const replies: (CombineView[] | undefined)[] = [];
    let added = 0;
    const addReady = () => {
      for (; added < jobs.length && replies[added]; added++) {
        const rows = jobs[added]!.rows;
        for (const c of replies[added]!)
          addCombine(c, out, rows.subarray(c.tokenOffset, c.tokenOffset + c.numTokens));
      }
    };
    await Promise.all(
      jobs.map((job, i) =>
        this.#roundTrip(job, plan.version, layer, src, dim, deadline, sent).then((r) => {
          replies[i] = r;
          addReady();
        }),
      ),
    );
    // Every request of the layer was answered: its frame buffers can be reused.
    for (const f of sent) this.#frames.give(f);
    return out;
  }

  /** Sends one shard's dispatch (split under max_payload); resolves its checked replies. */
  async #roundTrip(
    job: ShardJob,
    planVersion: number,
    layer: number,
    x: Float32Array | WireTable,
    dim: number,
    deadline: number,
    sent: Uint8Array[],
  ): Promise<CombineView[]> {
    const { nc, model } = this.#o;
    const { shard } = job;
    const maxPayload = nc.info?.max_payload ?? 1024 * 1024;
    const flags = this.#o.combineDtype === "f32" ? FLAG_COMBINE_F32 : 0;
    const dtype = this.#o.dispatchDtype;
    const totalTokens = job.rows.length;
    const subject = subjects.shard(model, shard);
    const expect = { planVersion, layer, hidden: dim, totalTokens };
    const t0 = performance.now();
    try {
      const combine = flags & FLAG_COMBINE_F32 ? "f32" : "bf16";
      const ranges = splitRanges(dtype, totalTokens, dim, job.token, maxPayload, combine);
      const frames = ranges.map((r) => {
        let token = job.token.subarray(r.a0, r.a1);
        if (r.start > 0) token = token.map((tok) => tok - r.start);
        return encodeDispatchRows(
          {
            dtype,
            planVersion,
            layer,
            hidden: dim,
            tokenOffset: r.start,
            totalTokens,
            x,
            rows: job.rows.subarray(r.start, r.end),
            token,
            expert: job.expert.subarray(r.a0, r.a1),
            weight: job.weight.subarray(r.a0, r.a1),
          },
          flags,
          this.#frames.bytes,
        );
      });
      sent.push(...frames);
      const replies = await Promise.all(
        frames.map((f) => this.#request(subject, shard, f, deadline, expect)),
      );
      checkCombines(replies, expect);
      this.#o.onRoundTrip?.(shard, performance.now() - t0, true);
      return replies;
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
    d: { planVersion: number; layer: number },
  ): Promise<CombineView> {
    let last: unknown;
    for (let attempt = 0; ; attempt++) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      try {
        const msg = await this.#requester.request(
          subject,
          frame,
          Math.min(this.#o.attemptTimeoutMs, left),
        );
        const reply = decodeReply(msg.data);
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

/** A token's copy choice from its row's first and last activations' bits (non-negative). */
export function copyHash(bits: Uint32Array, at: number, dim: number): number {
  const h = Math.imul(bits[at]! ^ Math.imul(bits[at + dim - 1]!, 0x9e3779b1), 0x85ebca6b);
  return (h ^ (h >>> 15)) >>> 0;
}
