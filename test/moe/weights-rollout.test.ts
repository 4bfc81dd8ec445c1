// Two models of the same shape under one name, as while a DeepSeekModel rolls from one
// checkpoint to another (V3 to R1, a new revision): real gateway and shard processes over the
// test nats-server. Each gateway uses only the shards of its own weights (ADR 0035), so none
// adds another model's experts into its sums: until its own shards serve, it is not ready and
// says which subject nobody serves; once they do, its answers are its weights' alone, whoever
// else serves the model's name.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { writeTinyModel } from "../../src/model/tiny.ts";
import { subjects } from "../../src/moe/subjects.ts";
import type { ManagedProcess } from "../env/process.ts";
import { type GatewayProcess, startGatewayProcess } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import {
  type Cluster,
  metricsPort,
  startShard,
  startShards,
  stopAll,
  waitServing,
} from "../support/shards.ts";

let oldDir: string;
let newDir: string;
let oldShards: Cluster;
const newShards: ManagedProcess[] = [];
const gateways: GatewayProcess[] = [];

beforeAll(async () => {
  oldDir = await tinyCheckpointFor("tiny-v3");
  // The same shape, other weights (another seed): what V3 and R1 are to each other.
  newDir = mkdtempSync(join(tmpdir(), "em-tiny-v3-next-"));
  await writeTinyModel(newDir, {
    arch: "v3",
    preset: "tiny",
    seed: 1,
    fp8: false,
    mtp: false,
    shards: 1,
  });
  oldShards = await startShards(oldDir, 2);
});

afterAll(async () => {
  for (const g of gateways) await g.process.stop(3000);
  for (const s of newShards) await s.stop(3000);
  await stopAll(oldShards);
  rmSync(newDir, { recursive: true, force: true });
});

const BODY = {
  model: "tiny",
  prompt: "one two three",
  max_tokens: 12,
  temperature: 0,
  ignore_eos: true,
} as const;

const complete = async (g: GatewayProcess) =>
  (await g.client.completions.create(BODY as never)).choices[0]!.text;

describe("a gateway of new weights among shards of the old ones", () => {
  it("is not ready until shards of its weights serve, then answers as its weights alone do", async () => {
    const name = oldShards.modelName;
    const [oldDigest, newDigest] = await Promise.all(
      [oldDir, newDir].map(async (d) => (await Checkpoint.open(d)).weightsDigest()),
    );
    expect(newDigest).not.toBe(oldDigest);
    expect(readFileSync(oldShards.shards[0]!.logPath, "utf8")).toContain(`weights ${oldDigest}`);

    const start = (dir: string, args: string[] = []) =>
      startGatewayProcess({
        modelDir: dir,
        planPath: oldShards.planPath,
        namespace: "test",
        modelName: name,
        name: `gateway-${name}-${gateways.length}`,
        args: ["--wire=f32", ...args],
      });
    const next = await start(newDir);
    gateways.push(next);
    expect(next.log()).toContain(`weights ${newDigest}`);
    const ref = { namespace: "test", model: name, weights: newDigest };
    const ready = await fetch(`${next.url}/ready`);
    expect(ready.status).toBe(503);
    expect(await ready.json()).toEqual({
      status: "not ready",
      shards: {
        "0": `no replica serves ${subjects.shard(ref, 0)} (no responders)`,
        "1": `no replica serves ${subjects.shard(ref, 1)} (no responders)`,
      },
    });

    // The new generation's shards come up beside the old ones.
    for (const k of [0, 1]) newShards.push(startShard(newDir, oldShards.planPath, name, k, "next"));
    await Promise.all(newShards.map((s) => waitServing(s)));
    expect(readFileSync(newShards[0]!.logPath, "utf8")).toContain(`weights ${newDigest}`);
    expect((await fetch(`${next.url}/ready`)).status).toBe(200);
    // Prometheus tells the two generations apart.
    const info = async (p: ManagedProcess) =>
      (await (await fetch(`http://127.0.0.1:${metricsPort(p)}/metrics`)).text())
        .split("\n")
        .filter((l) => l.startsWith("expertmesh_weights_info{"));
    expect(await info(next.process)).toEqual([
      `expertmesh_weights_info{role="gateway",digest="${newDigest}"} 1`,
    ]);
    expect(await info(oldShards.shards[0]!)).toEqual([
      `expertmesh_weights_info{role="shard",digest="${oldDigest}"} 1`,
    ]);

    // An old gateway still serves through the old shards, beside it.
    const old = await start(oldDir);
    gateways.push(old);
    expect((await fetch(`${old.url}/ready`)).status).toBe(200);

    // Each answers as its own weights do in one process (--local): no expert of the other's.
    const local = async (dir: string) => {
      const g = await startGatewayProcess({
        modelDir: dir,
        namespace: "test",
        modelName: `${name}-local`,
        name: `gateway-${name}-local-${gateways.length}`,
      });
      gateways.push(g);
      return complete(g);
    };
    const [wantNew, wantOld] = [await local(newDir), await local(oldDir)];
    expect(wantNew).not.toBe(wantOld);
    expect(await complete(next)).toBe(wantNew);
    expect(await complete(old)).toBe(wantOld);
  });
});
