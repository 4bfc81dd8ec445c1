// Runs `expertmesh shard` processes against the test nats-server, and in-process
// gateways (dense layers here, routed experts over NATS) to compare with one process.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { loadWeights, type ModelWeights } from "../../src/engine/loader.ts";
import { DeepSeekForward } from "../../src/engine/model.ts";
import { nativeBackend } from "../../src/engine/native.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { modelArchitectureOf } from "../../src/model/config.ts";
import { type DispatcherOptions, RemoteExperts } from "../../src/moe/dispatcher.ts";
import { type PlacementPlan, planPlacement } from "../../src/moe/placement.ts";
import { serializePlan } from "../../src/moe/plan-json.ts";
import type { ModelRef } from "../../src/moe/subjects.ts";
import { ManagedProcess } from "../env/process.ts";
import { testEnv, uniqueName } from "./env.ts";
import { localModel as localModelOn } from "./golden.ts";

const mainTs = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
export const native = nativeBackend();

export interface Cluster {
  modelDir: string;
  modelName: string;
  /** The shards' NATS names: namespace "test", modelName, and the weights' digest (ADR 0035). */
  ref: ModelRef;
  plan: PlacementPlan;
  planPath: string;
  shards: ManagedProcess[];
}

/** Writes the plan for a checkpoint and starts `replicas` processes per shard. */
export async function startShards(
  modelDir: string,
  numShards: number,
  opts: {
    redundant?: number;
    replicas?: number;
    natsUrl?: string;
    planVersion?: number;
    /** Place the MTP layer's experts too (plan --mtp). */
    mtp?: boolean;
    /** More flags for every shard. */
    args?: string[];
  } = {},
): Promise<Cluster> {
  const ckpt = await Checkpoint.open(modelDir);
  const plan = planPlacement({
    architecture: modelArchitectureOf(ckpt.config),
    numShards,
    redundantExperts: opts.redundant ?? 0,
    version: opts.planVersion ?? 1,
    mtpLayers: opts.mtp ? 1 : 0,
  });
  const modelName = uniqueName("m");
  const planPath = join(testEnv().runDir, `${modelName}.plan.json`);
  writeFileSync(planPath, serializePlan(plan));
  const shards: ManagedProcess[] = [];
  for (let k = 0; k < numShards; k++) {
    for (let r = 0; r < (opts.replicas ?? 1); r++)
      shards.push(
        startShard(modelDir, planPath, modelName, k, `r${r}`, opts.natsUrl, "test", {
          args: opts.args ?? [],
        }),
      );
  }
  await Promise.all(shards.map((s) => waitServing(s)));
  const ref = { namespace: "test", model: modelName, weights: await ckpt.weightsDigest() };
  return { modelDir, modelName, ref, plan, planPath, shards };
}

export function startShard(
  modelDir: string,
  planPath: string,
  modelName: string,
  k: number,
  id: string,
  natsUrl = testEnv().nats.url,
  namespace = "test",
  extra: { args?: string[]; env?: NodeJS.ProcessEnv } = {},
): ManagedProcess {
  return new ManagedProcess(
    `shard-${modelName}-${k}-${id}`,
    process.execPath,
    [
      mainTs,
      "shard",
      `--model=${modelDir}`,
      `--plan=${planPath}`,
      `--shard=${k}`,
      `--nats=${natsUrl}`,
      `--model-name=${modelName}`,
      `--namespace=${namespace}`,
      `--id=${id}`,
      "--metrics-port=0",
      ...(extra.args ?? []),
    ],
    join(testEnv().runDir, "logs"),
    extra.env,
  );
}

export async function waitServing(p: ManagedProcess): Promise<void> {
  await p.waitUntil(
    "serving",
    async () => readFileSync(p.logPath, "utf8").includes("serving "),
    30_000,
  );
}

/** The metrics port a shard printed. */
export function metricsPort(p: ManagedProcess): number {
  return Number(/metrics on :(\d+)/.exec(readFileSync(p.logPath, "utf8"))?.[1]);
}

export async function stopAll(c: Cluster | undefined): Promise<void> {
  for (const s of c?.shards ?? []) await s.stop(3000);
}

/** Single-process model: all experts local, native kernels. */
export function localModel(modelDir: string): ReturnType<typeof localModelOn> {
  return localModelOn(modelDir, native);
}

/** A gateway-side model: dense weights here, routed experts on the shards over NATS. */
export async function distributedModel(
  c: Cluster,
  opts: Partial<Omit<DispatcherOptions, "nc" | "model" | "plan">> & { natsUrl?: string } = {},
): Promise<{
  weights: ModelWeights;
  model: DeepSeekForward;
  experts: RemoteExperts;
  nc: NatsConnection;
}> {
  const weights = await loadWeights(await Checkpoint.open(c.modelDir), "none");
  const nc = await connect({
    servers: opts.natsUrl ?? testEnv().nats.url,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 200,
  });
  const experts = new RemoteExperts({
    nc,
    model: c.ref,
    plan: c.plan,
    dispatchDtype: "f32",
    combineDtype: "f32",
    ...opts,
  });
  return { weights, model: new DeepSeekForward(weights, native, experts), experts, nc };
}
