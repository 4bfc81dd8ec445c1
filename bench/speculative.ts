// The speculative suite (`npm run bench -- --suite speculative`): what speculative decoding
// (`gateway --speculative-tokens K`) gains per decode step, against the same engine without
// it in the same run.
//
// Engines in this process (ServingEngine, as the gateway builds it) on the mini V3
// checkpoint, experts in process ("local") or on 4 shard processes over a nats-server
// ("distributed", the deployment's shape: every step is a NATS round trip per MoE layer;
// f32 on the wire so that outputs compare exactly).
// Per placement and batch size (1, 8): greedy requests of the serve suite's prompts, 64
// tokens each (EOS ignored), run to completion, the modes alternating within each pass:
//   - off: no speculation (the peer);
//   - ngram: prompt lookup, 4 draft tokens, lookup 4/2 (the defaults) - what this random
//     model's own repetitions give;
//   - oracle: drafts of 4 that are always right (the tokens the off run produced): the
//     ceiling, what a step that verifies 5 tokens costs against one that computes 1;
//   - oracle-1: drafts of 1 always right (what MTP at 100 % acceptance would give if its
//     layer cost nothing);
//   - mtp: the checkpoint's MTP layer drafts (ADR 0012): its random weights accept almost
//     nothing, so this is the MTP layer's cost (plus a second row per step) at ~0 %;
//   - mtp-ceiling: the MTP layer runs as in mtp, but its draft is replaced by the right
//     token: MTP's ceiling at 100 % acceptance, its layer's cost included;
//   - mtp-ceiling-3: the same with drafts of 3 (the layer chained on its own output, each
//     guess replaced by the right token);
//   - prediction: OpenAI's predicted output (PredictionDrafter, drafts of up to 8) given the
//     off run's tokens: an answer predicted whole, on an engine that does not speculate;
//   - prediction-edit: the same prediction with one token in 8 changed (an edit every few
//     words): the drafts stop at each change and resume two tokens after it.
// The checkpoint is mini-v3 with an MTP layer (the same main weights as the serve suite's).
// Every mode's outputs are checked equal to the off run's. Tokens per second over the whole
// batch, tokens per sequence and engine step, acceptance (accepted / draft tokens).
import type { ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import {
  BatchForward,
  type LatentCache,
  type MtpItem,
  type MtpResult,
} from "../src/engine/batch.ts";
import { type ExpertRunner, LocalExperts } from "../src/engine/experts.ts";
import { BlockKvCache } from "../src/engine/kv-blocks.ts";
import { heldExperts, loadWeights } from "../src/engine/loader.ts";
import { loadAddon, nativeBackend } from "../src/engine/native.ts";
import { type Drafter, ngramSpeculation } from "../src/engine/speculative.ts";
import { GREEDY, runToEnd, ServingEngine, type SpeculativeOptions } from "../src/gateway/engine.ts";
import { findNatsServer } from "../src/local/nats-binary.ts";
import { Checkpoint } from "../src/model/checkpoint.ts";
import { modelArchitectureOf } from "../src/model/config.ts";
import { Tokenizer } from "../src/model/tokenizer.ts";
import { RemoteExperts } from "../src/moe/dispatcher.ts";
import { planPlacement } from "../src/moe/placement.ts";
import { serializePlan } from "../src/moe/plan-json.ts";
import { REPO_ROOT, type Stats, stats } from "./lib.ts";
import { child, ensureMiniModel, PROMPTS, SERVE_MODEL, stop } from "./serve.ts";

const CLI = join(REPO_ROOT, "src", "cli", "main.ts");
const MAX_TOKENS = 64;
const DRAFT = 4;
const MODES = [
  "off",
  "ngram",
  "oracle",
  "oracle-1",
  "mtp",
  "mtp-ceiling",
  "mtp-ceiling-3",
  "prediction",
  "prediction-edit",
] as const;
type Mode = (typeof MODES)[number];
const BATCHES = [1, 8];

export interface SpeculativeRow {
  placement: "local" | "distributed";
  batch: number;
  mode: Mode;
  tokPerS: Stats;
  /** Tokens per sequence and engine step (the prompt's step counted too). */
  tokensPerStep: number;
  draftTokens: number;
  acceptedTokens: number;
}

export interface SpeculativeResults {
  runs: number;
  threads: number;
  maxTokens: number;
  draft: number;
  rows: SpeculativeRow[];
}

/** The off run's outputs, by prompt: the oracle proposes their next tokens. */
function oracle(outputs: Map<string, number[]>): (prompt: readonly number[]) => Drafter {
  return (prompt) => {
    const out = outputs.get(prompt.join(","));
    if (!out) throw new Error("oracle: unknown prompt");
    const P = prompt.length;
    return { propose: (seq, k) => out.slice(seq.numTokens - P, seq.numTokens - P + k) };
  };
}

/**
 * BatchForward whose MTP step runs as usual but whose draft logits are replaced by a one-hot
 * row at the right next token (the off run's output): MTP's cost at 100 % acceptance.
 */
class CeilingForward extends BatchForward {
  outputs = new Map<string, number[]>();
  readonly #prompts: readonly number[][];
  readonly #seqOf = new Map<LatentCache, number[]>();

  constructor(prompts: readonly number[][], ...args: ConstructorParameters<typeof BatchForward>) {
    super(...args);
    this.#prompts = prompts;
  }

  override async mtpStep(items: readonly MtpItem[]): Promise<MtpResult> {
    const out = await super.mtpStep(items);
    items.forEach((it, i) => {
      // A sequence's first MTP step starts at 0 with its prompt shifted by one.
      if (it.start === 0) {
        const p = this.#prompts.find((q) => q.slice(1).every((t, j) => it.tokens[j] === t));
        const o = p && this.outputs.get(p.join(","));
        if (p && o) this.#seqOf.set(it.cache, [...p, ...o]);
      }
      const full = this.#seqOf.get(it.cache);
      const next = full?.[it.start + it.tokens.length + 1];
      const row = out.logits[i]!;
      if (row.length > 0 && next !== undefined) {
        row.fill(-1e30);
        row[next] = 0;
      }
    });
    return out;
  }
}

export async function runSpeculative(o: {
  threads: number;
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<SpeculativeResults> {
  const modelDir = await ensureMiniModel(o.log, { mtp: true });
  const ckpt = await Checkpoint.open(modelDir, { mtp: true });
  const tokenizer = Tokenizer.load(modelDir);
  loadAddon().configure({ threads: o.threads });
  const native = nativeBackend();
  const runs = o.quick ? 1 : o.runs;
  const batches = o.quick ? [8] : BATCHES;
  const prompts = PROMPTS.slice(0, 8).map((p) => tokenizer.encode(p));
  const children: ChildProcess[] = [];
  let nc: NatsConnection | undefined;
  const runDir = mkdtempSync(join(tmpdir(), "em-bench-spec-"));
  const rows: SpeculativeRow[] = [];
  try {
    for (const placement of ["local", "distributed"] as const) {
      const weights = await loadWeights(ckpt, placement === "local" ? "all" : "none", undefined, {
        mtp: true,
      });
      let experts: ExpertRunner;
      if (placement === "local") {
        experts = new LocalExperts(native, heldExperts(weights));
      } else {
        const plan = planPlacement({
          architecture: modelArchitectureOf(ckpt.config),
          numShards: 4,
          mtpLayers: 1,
        });
        const planPath = join(runDir, "plan.json");
        writeFileSync(planPath, serializePlan(plan));
        const nats = child(
          "nats",
          findNatsServer(),
          ["-a", "127.0.0.1", "-p", "-1"],
          /Listening for client connections on [^:]+:(\d+)/,
        );
        children.push(nats.proc);
        const natsUrl = `nats://127.0.0.1:${(await nats.ready)[1]}`;
        const ready: Promise<unknown>[] = [];
        for (let k = 0; k < 4; k++) {
          const s = child(
            `shard-${k}`,
            process.execPath,
            [
              CLI,
              "shard",
              `--model=${modelDir}`,
              "--namespace=bench",
              `--model-name=${SERVE_MODEL}`,
              `--plan=${planPath}`,
              `--nats=${natsUrl}`,
              `--shard=${k}`,
              "--metrics-port=0",
            ],
            /serving /,
          );
          children.push(s.proc);
          ready.push(s.ready);
        }
        await Promise.all(ready);
        nc = await connect({ servers: natsUrl });
        experts = new RemoteExperts({
          nc,
          // The shards' subjects carry their weights' digest (ADR 0035).
          model: { namespace: "bench", model: SERVE_MODEL, weights: await ckpt.weightsDigest() },
          plan,
          // f32 both ways: a shard's bf16 kernels round a token's result differently
          // with the number of tokens an expert gets (as any batching does), which flips
          // near-ties of this random model's greedy picks; f32 keeps outputs comparable.
          dispatchDtype: "f32",
          combineDtype: "f32",
        });
      }
      const forward = new BatchForward(weights, native, experts);
      const ceiling = new CeilingForward(prompts, weights, native, experts);
      const engine = (spec?: SpeculativeOptions, model: BatchForward = forward) =>
        new ServingEngine(
          model,
          new BlockKvCache(weights.config, {
            memoryBytes: 256 * 2 ** 20,
            extraLayers: spec?.method === "mtp" ? 1 : 0,
          }),
          { maxBatchTokens: 2048, maxRunning: 64, maxQueueDepth: 64, prefixCaching: false },
          spec ? { speculative: spec } : {},
        );
      const mtp = { method: "mtp", numTokens: 1 } as const satisfies SpeculativeOptions;
      for (const batch of batches) {
        const want = new Map<string, number[]>();
        ceiling.outputs = want;
        const engines: Record<Mode, () => ServingEngine> = {
          off: () => engine(),
          ngram: () => engine(ngramSpeculation({ numTokens: DRAFT, maxN: 4, minN: 2 })),
          oracle: () => engine({ numTokens: DRAFT, drafter: oracle(want) }),
          "oracle-1": () => engine({ numTokens: 1, drafter: oracle(want) }),
          mtp: () => engine(mtp),
          "mtp-ceiling": () => engine(mtp, ceiling),
          "mtp-ceiling-3": () => engine({ method: "mtp", numTokens: 3 }, ceiling),
          prediction: () => engine(),
          "prediction-edit": () => engine(),
        };
        /** A mode's predicted output for `prompt` (the off run's tokens, edited or not). */
        const predictionOf = (mode: Mode, prompt: number[]): number[] | undefined => {
          const out = want.get(prompt.join(","));
          if (!out || !mode.startsWith("prediction")) return undefined;
          return mode === "prediction" ? out : out.map((t, i) => (i % 8 === 7 ? t ^ 1 : t));
        };
        const times = Object.fromEntries(MODES.map((m) => [m, [] as number[]])) as Record<
          Mode,
          number[]
        >;
        const last: Partial<
          Record<Mode, { steps: number; tokens: number; draft: number; accepted: number }>
        > = {};
        // A warm-up pass (the off run's outputs for the oracle), then the counted passes.
        for (let pass = -1; pass < runs; pass++) {
          const order = pass < 0 ? MODES : pass % 2 ? [...MODES].reverse() : MODES;
          for (const mode of order) {
            const e = engines[mode]();
            const t0 = performance.now();
            const outs = await Promise.all(
              Array.from({ length: batch }, (_, i) => {
                const prompt = prompts[i % prompts.length]!;
                return generate(e, prompt, predictionOf(mode, prompt));
              }),
            );
            const ms = performance.now() - t0;
            outs.forEach((out, i) => {
              const key = prompts[i % prompts.length]!.join(",");
              const w = want.get(key);
              if (!w) want.set(key, out);
              else if (w.join(",") !== out.join(","))
                throw new Error(`${placement} batch ${batch} ${mode}: output differs from off`);
            });
            if (pass < 0) continue;
            const tokens = batch * MAX_TOKENS;
            times[mode].push((tokens / ms) * 1000);
            last[mode] = {
              steps: e.numSteps,
              tokens,
              draft: e.stats.specDraftTokens,
              accepted: e.stats.specAcceptedTokens,
            };
          }
          o.log(
            `[speculative] ${placement} batch ${batch}: pass ${pass < 0 ? "warm-up" : `${pass + 1}/${runs}`}`,
          );
        }
        for (const mode of MODES) {
          const l = last[mode]!;
          rows.push({
            placement,
            batch,
            mode,
            tokPerS: stats(times[mode]),
            tokensPerStep: l.tokens / (l.steps * batch),
            draftTokens: l.draft,
            acceptedTokens: l.accepted,
          });
        }
      }
      if (experts instanceof RemoteExperts) experts.close();
      await nc?.close();
      nc = undefined;
      await Promise.all(children.splice(0).map((c) => stop(c)));
    }
    return { runs, threads: o.threads, maxTokens: MAX_TOKENS, draft: DRAFT, rows };
  } finally {
    await nc?.close();
    await Promise.all(children.map((c) => stop(c)));
    rmSync(runDir, { recursive: true, force: true });
  }
}

/** MAX_TOKENS greedy tokens of `prompt` (EOS ignored). */
async function generate(
  e: ServingEngine,
  prompt: number[],
  prediction?: readonly number[],
): Promise<number[]> {
  const req = {
    prompt,
    maxTokens: MAX_TOKENS,
    sampling: GREEDY,
    stopTokenIds: [],
    ...(prediction ? { prediction } : {}),
  };
  return (await runToEnd(e, { ...req, logprobs: null, promptLogprobs: false })).ids;
}

/** The suite's table for BENCHMARKS.md. */
export function speculativeTables(
  r: SpeculativeResults & {
    date: string;
    commit: string;
    machine: { cpu: string; cores: number };
  },
  source: string,
): string {
  const lines = r.rows.map((row) => {
    const off = r.rows.find(
      (x) => x.placement === row.placement && x.batch === row.batch && x.mode === "off",
    )!;
    const ratio = row.tokPerS.median / off.tokPerS.median;
    const acc =
      row.draftTokens > 0
        ? `${row.acceptedTokens} / ${row.draftTokens} (${((100 * row.acceptedTokens) / row.draftTokens).toFixed(0)} %)`
        : "-";
    return `| ${row.placement} | ${row.batch} | ${row.mode === "off" ? "off (peer)" : row.mode} | ${row.tokPerS.median.toFixed(1)} (${row.tokPerS.min.toFixed(1)}-${row.tokPerS.max.toFixed(1)}) | ${row.mode === "off" ? "1" : ratio.toFixed(2)}x | ${row.tokensPerStep.toFixed(2)} | ${acc} |`;
  });
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), mini-v3, ${r.threads} threads, engines in the bench process (distributed: experts on 4 shard processes over a local nats-server), ${r.maxTokens} greedy tokens per request, drafts of ${r.draft}, ${r.runs} passes after a warm-up with the modes alternating; from \`${source}\`. Tokens per second over the batch, median (min-max); acceptance: draft tokens accepted / run (last pass).

| experts | batch | speculation | tokens/s | vs off | tokens per sequence and step | accepted / draft tokens |
|---|---:|---|---:|---:|---:|---:|
${lines.join("\n")}`;
}
