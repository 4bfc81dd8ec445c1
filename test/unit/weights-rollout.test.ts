// Blue/green for a change of weights (src/operator/weights-rollout.ts): which shard
// Deployments change weights, the copies made of them, when the spec waits for the copies,
// and when they go. Deployments as the workloads render them (desiredObjects) and as the
// cluster reports them (a status added).
import type { V1Deployment, V1Pod } from "@kubernetes/client-node";
import { describe, expect, it } from "vitest";
import { architectureOf, parseManifest } from "../../src/api/manifest.ts";
import type { DeepSeekModel } from "../../src/api/schema.ts";
import { planPlacement } from "../../src/moe/placement.ts";
import { PREVIOUS_WEIGHTS_ENV } from "../../src/moe/subjects.ts";
import {
  copiesStuck,
  isPreviousCopy,
  LABEL_PREVIOUS_WEIGHTS,
  previousCopiesDone,
  previousCopy,
  previousShardsStep,
  reportOfPreviousCopy,
  rollWithoutCopies,
  shardsChangingWeights,
  weightsSourceOf,
} from "../../src/operator/weights-rollout.ts";
import { desiredObjects } from "../../src/operator/workloads.ts";

const SHARDS = ["m-shard-0", "m-shard-1"];

function model(
  source: Record<string, unknown>,
  extra: Record<string, unknown> = {},
): DeepSeekModel {
  return parseManifest(
    JSON.stringify({
      apiVersion: "expertmesh.io/v1alpha1",
      kind: "DeepSeekModel",
      metadata: { name: "m", namespace: "ns", uid: "u-1" },
      spec: {
        model: { preset: "tiny-v2", source },
        experts: { shards: 2, weightsRollout: "BlueGreen" },
        ...extra,
      },
    }),
  );
}

/** The model's Deployments as rendered, each with a status: rolled out, or not. */
function deployments(m: DeepSeekModel, ready = true): V1Deployment[] {
  const plan = planPlacement({ architecture: architectureOf(m), numShards: 2 });
  return desiredObjects(m, plan, { gateway: 1, shards: [1, 1] })
    .filter((o): o is V1Deployment => o.kind === "Deployment")
    .map((d) => ({
      ...d,
      metadata: { ...d.metadata, generation: 2 },
      status: ready
        ? { observedGeneration: 2, replicas: 1, updatedReplicas: 1, availableReplicas: 1 }
        : { observedGeneration: 2, replicas: 2, updatedReplicas: 1, availableReplicas: 1 },
    }));
}

const pvc = (claimName: string, path = "") => ({ pvc: { claimName, path } });
const hf = (revision: string) => ({ huggingFace: { repo: "deepseek-ai/DeepSeek-V3", revision } });

describe("weightsSourceOf and shardsChangingWeights", () => {
  it.each<[string, Record<string, unknown>, Record<string, unknown>, string[]]>([
    ["the same source", pvc("weights"), pvc("weights"), []],
    ["another claim", pvc("weights"), pvc("weights-r1"), SHARDS],
    ["another path on the claim", pvc("weights", "v3"), pvc("weights", "r1"), SHARDS],
    ["another revision to download", hf("main"), hf("abc123"), SHARDS],
    ["from a claim to a download", pvc("weights"), hf("main"), SHARDS],
  ])("%s", (_, from, to, changing) => {
    const [a, b] = [deployments(model(from)), deployments(model(to))];
    expect(shardsChangingWeights(a, b, SHARDS)).toEqual(changing);
    expect(
      weightsSourceOf(a[0]!.spec!.template.spec) === weightsSourceOf(b[0]!.spec!.template.spec),
    ).toBe(changing.length === 0);
  });

  it("does not see a change in what does not name the weights (image, resources)", () => {
    const a = deployments(model(pvc("weights")));
    const b = deployments(model(pvc("weights"), { image: "expertmesh/expertmesh:9.9.9" }));
    expect(shardsChangingWeights(a, b, SHARDS)).toEqual([]);
  });

  it("has nothing to say of a template without the model volume or --model", () => {
    expect(weightsSourceOf(undefined)).toBeUndefined();
    expect(weightsSourceOf({ containers: [{ name: "x", args: ["--model=/m"] }] })).toBeUndefined();
  });
});

describe("previousCopy", () => {
  it("keeps the running template under its own name and label, owned as the original", () => {
    const [d] = deployments(model(pvc("weights"))).filter((x) => x.metadata?.name === "m-shard-0");
    const copy = previousCopy(d!);
    expect(copy.metadata?.name).toBe("m-shard-0-prev");
    expect(copy.metadata?.ownerReferences).toEqual(d!.metadata?.ownerReferences);
    expect(isPreviousCopy(copy)).toBe(true);
    expect(isPreviousCopy(d!)).toBe(false);
    expect(copy.spec?.selector.matchLabels).toEqual({
      ...d!.spec?.selector.matchLabels,
      [LABEL_PREVIOUS_WEIGHTS]: "true",
    });
    expect(copy.spec?.template.metadata?.labels?.[LABEL_PREVIOUS_WEIGHTS]).toBe("true");
    // The same pods, whose shards say in their load reports that they are a copy.
    const [shard, ...others] = copy.spec!.template.spec!.containers;
    const [original, ...originalOthers] = d!.spec!.template.spec!.containers;
    expect(shard!.env).toEqual([
      ...(original!.env ?? []),
      { name: PREVIOUS_WEIGHTS_ENV, value: "1" },
    ]);
    expect({ ...shard, env: original!.env }).toEqual(original);
    expect(others).toEqual(originalOthers);
    expect({ ...copy.spec?.template.spec, containers: [] }).toEqual({
      ...d!.spec?.template.spec,
      containers: [],
    });
    // The original is left alone, and a copy of a copy does not repeat the variable.
    expect(original!.env ?? []).not.toContainEqual({ name: PREVIOUS_WEIGHTS_ENV, value: "1" });
    expect(previousCopy(copy).spec!.template.spec!.containers[0]!.env).toEqual(shard!.env);
    expect(copy.spec?.replicas).toBe(d!.spec?.replicas);
    expect(copy).not.toHaveProperty("status");
  });
});

describe("rollWithoutCopies", () => {
  const at = (s: number) => new Date(Date.UTC(2026, 11, 4, 9, 0, s)).toISOString();
  const pod = (reason: string | undefined, since?: string): V1Pod => ({
    metadata: { name: "m-shard-0-prev-5c8d7f9b6-xk2v9" },
    status: {
      conditions: [
        reason
          ? { type: "PodScheduled", status: "False", reason, lastTransitionTime: since as never }
          : { type: "PodScheduled", status: "True" },
      ],
    },
  });
  const now = new Date(at(30)).getTime();
  it.each<[string, V1Pod[], number, boolean]>([
    ["no copy pod yet", [], 10_000, false],
    ["copies scheduled (loading their weights)", [pod(undefined), pod(undefined)], 0, false],
    ["Unschedulable for 20 s of 30", [pod("Unschedulable", at(10))], 30_000, false],
    ["Unschedulable for 30 s of 30", [pod("Unschedulable", at(0))], 30_000, true],
    [
      "the longest-waiting pod counts",
      [pod("Unschedulable", at(25)), pod("Unschedulable", at(0))],
      30_000,
      true,
    ],
    ["no wait: at once", [pod("Unschedulable", at(30))], 0, true],
    ["no transition time: from now", [pod("Unschedulable")], 1, false],
    ["not scheduled for another reason", [pod("SchedulingGated", at(0))], 1, false],
  ])("%s", (_what, pods, waitMs, roll) => {
    expect(rollWithoutCopies(pods, waitMs, now)).toBe(roll);
  });

  // A copy the API server refuses pods (a ResourceQuota with no room for a second set):
  // its Deployment's ReplicaFailure condition, from when the ReplicaSet controller said so.
  const copy = (reason: string | undefined, since?: string): V1Deployment => ({
    metadata: { name: "m-shard-0-prev", labels: { [LABEL_PREVIOUS_WEIGHTS]: "true" } },
    spec: { selector: {}, template: {} },
    status: {
      conditions: reason
        ? [{ type: "ReplicaFailure", status: "True", reason, lastTransitionTime: since as never }]
        : [],
    },
  });
  it.each<[string, V1Pod[], V1Deployment[], number, boolean, boolean]>([
    ["pods refused for 20 s of 30", [], [copy("FailedCreate", at(10))], 30_000, false, true],
    ["pods refused for 30 s of 30", [], [copy("FailedCreate", at(0))], 30_000, true, true],
    ["pods made", [], [copy(undefined)], 0, false, false],
    ["a failed delete is no reason", [], [copy("FailedDelete", at(0))], 0, false, false],
    [
      "the earlier of a refusal and an Unschedulable pod",
      [pod("Unschedulable", at(20))],
      [copy("FailedCreate", at(0))],
      30_000,
      true,
      true,
    ],
  ])("%s", (_what, pods, copies, waitMs, roll, stuck) => {
    expect(rollWithoutCopies(pods, waitMs, now, copies)).toBe(roll);
    expect(copiesStuck(pods, copies)).toBe(stuck);
  });
  it("copiesStuck: only copies count", () => {
    const own = { ...copy("FailedCreate", at(0)), metadata: { name: "m-shard-0" } };
    expect(copiesStuck([], [own])).toBe(false);
    const copyPod: V1Pod = {
      ...pod("Unschedulable", at(0)),
      metadata: { name: "m-shard-0-prev-x", labels: { [LABEL_PREVIOUS_WEIGHTS]: "true" } },
    };
    expect(copiesStuck([copyPod], [])).toBe(true);
    expect(copiesStuck([pod("Unschedulable", at(0))], [])).toBe(false);
  });
});

describe("reportOfPreviousCopy", () => {
  // A shard's report id is `<hostname>-<pid>`; a pod's hostname is its name.
  it.each([
    ["a copy's pod", "m-shard-0", "m-shard-0-prev-5c8d7f9b6-klmno-7", true],
    ["the Deployment's own pod", "m-shard-0", "m-shard-0-5c8d7f9b6-klmno-7", false],
    ["another shard's copy", "m-shard-1", "m-shard-10-prev-5c8d7f9b6-klmno-7", false],
    ["shard 1's copy, not shard 10's", "m-shard-1", "m-shard-1-prev-5c8d7f9b6-klmno-7", true],
    ["another model's copy", "m-shard-0", "mm-shard-0-prev-5c8d7f9b6-klmno-7", false],
    ["a process outside Kubernetes", "m-shard-0", "laptop-4242", false],
  ])("%s", (_what, shardName, id, expected) => {
    expect(reportOfPreviousCopy(shardName, { id })).toBe(expected);
  });

  // A copy's shard says so (PREVIOUS_WEIGHTS_ENV), whatever its id: a long model name's pod
  // hostname is cut at 63 characters, before `-prev-`.
  const long = `${"a".repeat(50)}-shard-0`;
  it.each([
    ["a copy's pod of a long model name, flagged", long, long.slice(0, 55), true, true],
    ["the same, from a copy made before the flag", long, long.slice(0, 55), undefined, false],
    ["a flag that is not true", "m-shard-0", "m-shard-0-5c8d7f9b6-klmno-7", "yes", false],
    ["a flagged process outside Kubernetes", "m-shard-0", "laptop-4242", true, true],
  ])("%s", (_what, shardName, id, previousWeights, expected) => {
    expect(reportOfPreviousCopy(shardName, { id, previousWeights })).toBe(expected);
  });
});

describe("previousShardsStep and previousCopiesDone, through a rollout", () => {
  const old = deployments(model(pvc("weights", "v3")));
  const spec = deployments(model(pvc("weights", "r1")));
  const copies = old.filter((d) => SHARDS.includes(d.metadata!.name!)).map(previousCopy);
  const withStatus = (ds: V1Deployment[], ready: boolean) =>
    ds.map((d) => ({
      ...d,
      metadata: { ...d.metadata, generation: 1 },
      status: ready
        ? { observedGeneration: 1, replicas: 1, updatedReplicas: 1, availableReplicas: 1 }
        : { observedGeneration: 1, replicas: 1, updatedReplicas: 0, availableReplicas: 0 },
    }));

  it.each<[string, V1Deployment[], { create: string[]; hold: boolean; done: string[] }]>([
    ["nothing changes weights", spec, { create: [], hold: false, done: [] }],
    [
      "the spec names other weights, no copy yet: copy both shards, hold",
      old,
      { create: ["m-shard-0-prev", "m-shard-1-prev"], hold: true, done: [] },
    ],
    [
      "copies made, not yet serving: hold",
      [...old, ...withStatus(copies, false)],
      { create: [], hold: true, done: [] },
    ],
    [
      "one copy serving, the other not: hold",
      [...old, ...withStatus(copies.slice(0, 1), true), ...withStatus(copies.slice(1), false)],
      { create: [], hold: true, done: [] },
    ],
    [
      "copies serving: apply the spec (no hold), keep the copies",
      [...old, ...withStatus(copies, true)],
      { create: [], hold: false, done: [] },
    ],
    [
      "spec applied, still rolling: keep the copies",
      [...deployments(model(pvc("weights", "r1")), false), ...withStatus(copies, true)],
      { create: [], hold: false, done: [] },
    ],
    [
      "spec applied and rolled out: the copies go",
      [...spec, ...withStatus(copies, true)],
      { create: [], hold: false, done: ["m-shard-0-prev", "m-shard-1-prev"] },
    ],
  ])("%s", (_, cluster, want) => {
    const step = previousShardsStep(cluster, spec, SHARDS);
    expect(step.create.map((d) => d.metadata?.name)).toEqual(want.create);
    expect(step.hold).toBe(want.hold);
    expect(previousCopiesDone(cluster, spec, SHARDS).map((d) => d.metadata?.name)).toEqual(
      want.done,
    );
  });

  // No room for the copies: the spec is applied without them (the reconciler's fallback).
  it.each<[string, V1Deployment[], string[]]>([
    [
      "spec not applied yet: the copies stay (the spec waits for them, or for the fallback)",
      [...old, ...withStatus(copies, false)],
      [],
    ],
    [
      "spec applied, still rolling: the copies go at once (their pending pods would take the room)",
      [...deployments(model(pvc("weights", "r1")), false), ...withStatus(copies, false)],
      ["m-shard-0-prev", "m-shard-1-prev"],
    ],
  ])("copies unschedulable, %s", (_, cluster, done) => {
    expect(previousCopiesDone(cluster, spec, SHARDS, true).map((d) => d.metadata?.name)).toEqual(
      done,
    );
  });
});
