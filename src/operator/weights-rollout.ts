// Blue/green for a change of weights (spec.experts.weightsRollout: BlueGreen, ADR 0035).
// Shards and gateways meet only with the same weights (their subjects carry the weights'
// digest), so while a model rolls from one checkpoint to another, old gateways need old
// shards. Rolling, they lose them as the shard Deployments roll. Blue/green keeps them:
//
// 1. A shard Deployment whose pod template names other weights than the spec now does (the
//    model volume's claim, the --model path, the download's repo and revision) is first
//    copied as `<name>-prev`: its pods, with the old template, a label of their own in the
//    selector, serve the old weights. The new templates wait until every copy is rolled out.
// 2. Then the spec is applied: shards and gateways roll to the new weights; old gateways use
//    the copies meanwhile, new gateways turn ready once the new shards serve.
// 3. Once every other Deployment of the model is rolled out (new pods available, old ones
//    gone), the copies are deleted.
//
// Pure functions here; the reconciler does the calls.
import type { V1Deployment, V1Pod, V1PodSpec } from "@kubernetes/client-node";
import { PREVIOUS_WEIGHTS_ENV } from "../moe/subjects.ts";
import { failedCreate, rolledOut, unschedulable } from "./status.ts";

/** The label (in selector and template) of a copy's pods, and of the copy. */
export const LABEL_PREVIOUS_WEIGHTS = "expertmesh.io/previous-weights";
export const PREVIOUS_SUFFIX = "-prev";

/** Whether a Deployment is a copy made by `previousCopy`. */
export function isPreviousCopy(d: { metadata?: { labels?: Record<string, string> } }): boolean {
  return d.metadata?.labels?.[LABEL_PREVIOUS_WEIGHTS] === "true";
}

/**
 * Whether a shard's load report comes from a pod of the copy of shard Deployment
 * `shardName`: it says so (`previousWeights`, from PREVIOUS_WEIGHTS_ENV), or, from a shard
 * of a copy made before the operator set that variable, its id does. A shard reports as
 * `<hostname>-<pid>`, and a pod's hostname is its name (cut to 63 characters):
 * `<deployment>-<template hash>-<suffix>`. A template hash has no vowels, so
 * `<shardName>-prev-` starts the names of the copy's pods only (unless a long model name
 * pushes that prefix past 63 characters: the reason for the flag).
 */
export const reportOfPreviousCopy = (
  shardName: string,
  report: { id: string; previousWeights?: unknown },
): boolean =>
  report.previousWeights === true || report.id.startsWith(`${shardName}${PREVIOUS_SUFFIX}-`);

/**
 * What in a pod template names the weights the pod loads: the claim of the `model` volume,
 * the `--model=` path, and the download's repo and revision. Undefined when the template has
 * no `model` volume or no `--model=` argument (not a pod of ours).
 */
export function weightsSourceOf(spec: V1PodSpec | undefined): string | undefined {
  const volume = spec?.volumes?.find((v) => v.name === "model");
  const modelArg = spec?.containers?.[0]?.args?.find((a) => a.startsWith("--model="));
  if (!volume || !modelArg) return undefined;
  const download = spec?.initContainers?.find((c) => c.name === "download-weights");
  const env = (name: string) => download?.env?.find((e) => e.name === name)?.value ?? null;
  return JSON.stringify({
    claim: volume.persistentVolumeClaim?.claimName ?? null,
    model: modelArg,
    repo: env("HF_REPO"),
    revision: env("HF_REVISION"),
  });
}

/**
 * The shard Deployments (by name) whose pods `existing` runs with other weights than
 * `desired` names: those a copy keeps serving. Only Deployments in both, both readable.
 */
export function shardsChangingWeights(
  existing: readonly V1Deployment[],
  desired: readonly V1Deployment[],
  shardNames: readonly string[],
): string[] {
  return shardNames.filter((name) => {
    const before = weightsSourceOf(
      existing.find((d) => d.metadata?.name === name)?.spec?.template.spec,
    );
    const after = weightsSourceOf(
      desired.find((d) => d.metadata?.name === name)?.spec?.template.spec,
    );
    return before !== undefined && after !== undefined && before !== after;
  });
}

/** A copy of shard Deployment `d` as it runs now, for server-side apply. */
export function previousCopy(d: V1Deployment): V1Deployment {
  const mark = (labels: Record<string, string> | undefined) => ({
    ...labels,
    [LABEL_PREVIOUS_WEIGHTS]: "true",
  });
  const template = d.spec!.template;
  return {
    apiVersion: "apps/v1",
    kind: "Deployment",
    metadata: {
      name: `${d.metadata!.name}${PREVIOUS_SUFFIX}`,
      namespace: d.metadata!.namespace,
      labels: mark(d.metadata!.labels),
      ...(d.metadata!.ownerReferences ? { ownerReferences: d.metadata!.ownerReferences } : {}),
    },
    spec: {
      ...(d.spec!.replicas === undefined ? {} : { replicas: d.spec!.replicas }),
      selector: { matchLabels: mark(d.spec!.selector.matchLabels) },
      ...(d.spec!.strategy ? { strategy: d.spec!.strategy } : {}),
      template: {
        metadata: {
          labels: mark(template.metadata?.labels),
          ...(template.metadata?.annotations ? { annotations: template.metadata.annotations } : {}),
        },
        // Its shards say so in their load reports (reportOfPreviousCopy).
        spec: {
          ...template.spec!,
          containers: template.spec!.containers.map((c, i) =>
            i === 0
              ? {
                  ...c,
                  env: [
                    ...(c.env ?? []).filter((e) => e.name !== PREVIOUS_WEIGHTS_ENV),
                    { name: PREVIOUS_WEIGHTS_ENV, value: "1" },
                  ],
                }
              : c,
          ),
        },
      },
    },
  };
}

/** What the reconciler does about copies, given the model's Deployments and the spec's. */
export interface PreviousShardsStep {
  /** Copies to create (their shards change weights and have none yet). */
  create: V1Deployment[];
  /** Whether the spec must wait: a shard changes weights and its copy is not serving yet. */
  hold: boolean;
}

/**
 * Before applying `desired` (BlueGreen): the copies to make, and whether to hold the spec.
 * `existing` is what the cluster has (copies included).
 */
export function previousShardsStep(
  existing: readonly V1Deployment[],
  desired: readonly V1Deployment[],
  shardNames: readonly string[],
): PreviousShardsStep {
  const changing = shardsChangingWeights(existing, desired, shardNames);
  const copyOf = (name: string) =>
    existing.find((d) => d.metadata?.name === `${name}${PREVIOUS_SUFFIX}` && isPreviousCopy(d));
  const create = changing
    .filter((name) => !copyOf(name))
    .map((name) => previousCopy(existing.find((d) => d.metadata?.name === name)!));
  const hold = changing.some((name) => {
    const copy = copyOf(name);
    return !copy || !rolledOut(copy);
  });
  return { create, hold };
}

/**
 * While the spec waits for the copies (`previousShardsStep`'s hold): whether to stop waiting
 * and roll without them, because some copy pod has been Unschedulable, or some copy could not
 * create its pods (a ResourceQuota with no room for a second set), for `waitMs` (the time
 * the scheduler or the ReplicaSet controller first said so, from the condition). A cluster
 * autoscaler adds nodes for pending pods within minutes, and a quota may be raised, so
 * neither alone is a reason to give up; the old pods serve on meanwhile.
 */
export function rollWithoutCopies(
  copyPods: readonly V1Pod[],
  waitMs: number,
  now: number,
  copies: readonly V1Deployment[] = [],
): boolean {
  const since = [...copyPods.map(unschedulable), ...copies.map(failedCreate)].flatMap((c) =>
    c ? [c.lastTransitionTime ? new Date(c.lastTransitionTime).getTime() : now] : [],
  );
  return since.length > 0 && now - Math.min(...since) >= waitMs;
}

/** Whether some copy cannot run: a pod the scheduler cannot place, or pods not created. */
export function copiesStuck(pods: readonly V1Pod[], deployments: readonly V1Deployment[]): boolean {
  return (
    pods.some((p) => isPreviousCopy(p) && unschedulable(p)) ||
    deployments.some((d) => isPreviousCopy(d) && failedCreate(d))
  );
}

/**
 * The copies to delete: all of them, once every other Deployment of the model runs the
 * spec's template (`desired` applied: no shard changes weights any more) and is rolled out.
 * Copies whose pods cannot be scheduled or created (`copiesUnschedulable`: no room or quota
 * for a second set, so the spec was applied without them) go as soon as it is applied: they would never serve,
 * and their pending pods could take the room the old shard pods free for the new ones.
 */
export function previousCopiesDone(
  deployments: readonly V1Deployment[],
  desired: readonly V1Deployment[],
  shardNames: readonly string[],
  copiesUnschedulable = false,
): V1Deployment[] {
  const copies = deployments.filter(isPreviousCopy);
  if (copies.length === 0) return [];
  const current = deployments.filter((d) => !isPreviousCopy(d));
  const applied = shardsChangingWeights(current, desired, shardNames).length === 0;
  return applied && (copiesUnschedulable || current.every(rolledOut)) ? copies : [];
}
