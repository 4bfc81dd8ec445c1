// The DeepSeekModel's status, computed from what the cluster reports: a pure function of
// the model, its Deployments and Pods, and the problems the reconciler met.
import type { V1Deployment, V1Pod } from "@kubernetes/client-node";
import type { DeepSeekModel, DeepSeekModelStatus, ModelCondition } from "../api/schema.ts";
import { LABEL_COMPONENT, labelsFor } from "./labels.ts";
import { isPreviousCopy } from "./weights-rollout.ts";

/**
 * A problem that makes the model Degraded: a stable reason and a precise message;
 * servingUnaffected ones (a PodMonitor that cannot be made) leave Ready alone.
 */
export interface Problem {
  reason:
    | "PVCNotFound"
    | "SecretNotFound"
    | "SecretKeyMissing"
    | "ConfigMapNotFound"
    | "ConfigMapKeyMissing"
    | "NATSAuthInvalid"
    | "NATSAuthRefused"
    | "NATSTLSInvalid"
    | "NATSTLSFailed"
    | "GatewayTLSInvalid"
    | "GatewayAPIKeysInvalid"
    | "PlanInvalid"
    | "MemoryLimitTooLow"
    | "Unschedulable"
    | "PodsNotCreated"
    | "VolumeMountFailed"
    | "ImagePullFailed"
    | "ContainerConfigInvalid"
    | "ContainerCrashing"
    | "ProgressDeadlineExceeded"
    | "ApplyFailed"
    | "PodMonitorCRDNotFound"
    | "PodMonitorApplyFailed"
    | "NetworkPolicyApplyFailed"
    | "SharedPVCNotReadWriteMany"
    | "SharedPVCApplyFailed"
    | "PVCPending"
    | "NATSJetStreamMissing";
  message: string;
  servingUnaffected?: boolean;
}

export interface Observed {
  deployments: V1Deployment[];
  pods: V1Pod[];
  problems: Problem[];
  planVersion: number | undefined;
  endpoint: string;
  /** Mean queue depths per role, when load reports exist. */
  queueDepth?: { gateway?: number; shard?: number };
}

/** A pod's PodScheduled condition when the scheduler could not place it. */
export const unschedulable = (pod: V1Pod) =>
  pod.status?.conditions?.find(
    (c) => c.type === "PodScheduled" && c.status === "False" && c.reason === "Unschedulable",
  );

/** The spec field of a pod's or Deployment's role: spec.experts for shards, else spec.gateway. */
const roleField = (o: { metadata?: { labels?: Record<string, string> } }) =>
  o.metadata?.labels?.[LABEL_COMPONENT] === "shard" ? "spec.experts" : "spec.gateway";

/**
 * The Deployment of a pod (a Deployment's pods are owned by its ReplicaSet
 * `<deployment>-<pod-template-hash>`), among `deployments`.
 */
function deploymentOf(pod: V1Pod, deployments: readonly V1Deployment[]): V1Deployment | undefined {
  const rs = pod.metadata?.ownerReferences?.find((o) => o.kind === "ReplicaSet")?.name;
  const hash = pod.metadata?.labels?.["pod-template-hash"];
  if (!rs || !hash || !rs.endsWith(`-${hash}`)) return undefined;
  const name = rs.slice(0, -hash.length - 1);
  return deployments.find((d) => d.metadata?.name === name);
}

/**
 * Pods the scheduler could not place, as one Problem (or none). When one is the surge pod of
 * a rollout (its Deployment has more pods than replicas), the message says how to roll in
 * place: with no GPU to spare, that rollout would wait for ever.
 */
export function unschedulableProblem(
  pods: V1Pod[],
  deployments: readonly V1Deployment[] = [],
): Problem | undefined {
  const stuck = pods.filter((p) => unschedulable(p));
  if (!stuck.length) return undefined;
  stuck.sort((a, b) => (a.metadata?.name ?? "").localeCompare(b.metadata?.name ?? ""));
  const first = stuck[0]!;
  const why = unschedulable(first)?.message ?? "no node fits";
  // A surge pod of a rollout (its Deployment has more pods than replicas, and may surge).
  const surge = stuck
    .map((pod) => ({ pod, d: deploymentOf(pod, deployments) }))
    .find(
      ({ d }) =>
        d &&
        (d.status?.replicas ?? 0) > (d.spec?.replicas ?? 1) &&
        (d.spec?.strategy?.rollingUpdate?.maxSurge ?? 0) !== 0,
    );
  const field = surge ? roleField(surge.pod) : "";
  const hint = surge
    ? `; ${surge.d!.metadata?.name}'s rollout waits until its surge pod fits: ${field}.rollingUpdate {maxSurge: 0, maxUnavailable: 1} replaces the pods in place instead`
    : "";
  return {
    reason: "Unschedulable",
    message: `${stuck.length} pod(s) cannot be scheduled, e.g. ${first.metadata?.name}: ${why}${hint}`,
  };
}

/** Container waiting reasons that need a change (of the image, the spec, the weights). */
const FAILING: Record<string, "ImagePullFailed" | "ContainerConfigInvalid" | "ContainerCrashing"> =
  {
    ErrImagePull: "ImagePullFailed",
    ImagePullBackOff: "ImagePullFailed",
    InvalidImageName: "ImagePullFailed",
    ErrImageNeverPull: "ImagePullFailed",
    CreateContainerConfigError: "ContainerConfigInvalid",
    CreateContainerError: "ContainerConfigInvalid",
    CrashLoopBackOff: "ContainerCrashing",
  };

/** A message cut to one line of at most `max` characters. */
const oneLine = (text: string, max = 500) => {
  const line = text.replace(/\s+/g, " ").trim();
  return line.length > max ? `${line.slice(0, max - 3)}...` : line;
};

/**
 * A Deployment's ReplicaFailure condition when its ReplicaSet could not create a pod: the
 * API server refused it (a ResourceQuota with no room left, a RuntimeClass that does not
 * exist, a LimitRange's bounds, a policy's admission webhook). The Deployment controller
 * copies it from the ReplicaSet and clears it once a create succeeds.
 */
export const failedCreate = (d: V1Deployment) =>
  d.status?.conditions?.find(
    (c) => c.type === "ReplicaFailure" && c.status === "True" && c.reason === "FailedCreate",
  );

/** Whether a Deployment has more pods than replicas to make and may surge: a rollout. */
const surging = (d: V1Deployment) =>
  (d.status?.replicas ?? 0) >= (d.spec?.replicas ?? 1) &&
  (d.spec?.strategy?.rollingUpdate?.maxSurge ?? 0) !== 0;

/**
 * Deployments whose pods the API server refuses to create, as one Problem (or none): no pod
 * exists to be unschedulable or to fail, so without this the model would only be "not
 * ready". The example (the first by name) gives the API server's words and what to change
 * where the refusal names it.
 */
export function podsNotCreatedProblem(deployments: readonly V1Deployment[]): Problem | undefined {
  const refused = deployments
    .filter((d) => failedCreate(d))
    .sort((a, b) => (a.metadata?.name ?? "").localeCompare(b.metadata?.name ?? ""));
  const first = refused[0];
  if (!first) return undefined;
  const why = oneLine(failedCreate(first)?.message ?? "no reason given");
  const field = roleField(first);
  const shard = field === "spec.experts";
  const hint = /exceeded quota/.test(why)
    ? surging(first)
      ? `; its rollout's surge pod counts against the quota too: ${field}.rollingUpdate {maxSurge: 0, maxUnavailable: 1} replaces the pods in place instead`
      : `; raise the namespace's ResourceQuota, or ask for less in ${field} (${shard ? "shards, replicas, gpusPerShard" : "replicas, gpus"}, resources)`
    : /RuntimeClass .* not found/.test(why)
      ? "; spec.scheduling.runtimeClassName names a RuntimeClass this cluster does not have (kubectl get runtimeclass)"
      : "";
  return {
    reason: "PodsNotCreated",
    message: `${refused.length} Deployment(s) cannot create their pods, e.g. ${first.metadata?.name}: ${why}${hint}`,
  };
}

/**
 * Whether a pod has waited on its node for `graceMs` or more without starting any container,
 * init containers included: what a pod whose volumes cannot be attached or mounted looks like
 * (its containers ContainerCreating). One running its weights' download is not; nor is one
 * being deleted.
 */
export function waitingOnNode(pod: V1Pod, now: number, graceMs: number): boolean {
  if (pod.status?.phase !== "Pending" || !pod.spec?.nodeName || pod.metadata?.deletionTimestamp)
    return false;
  const scheduled = pod.status.conditions?.find(
    (c) => c.type === "PodScheduled" && c.status === "True",
  );
  const since = scheduled?.lastTransitionTime
    ? new Date(scheduled.lastTransitionTime).getTime()
    : now;
  if (now - since < graceMs) return false;
  const containers = [
    ...(pod.status.initContainerStatuses ?? []),
    ...(pod.status.containerStatuses ?? []),
  ];
  return containers.every(
    (c) => !c.state?.running && !c.state?.terminated && !c.lastState?.terminated,
  );
}

/** The weights' claim, as the Multi-Attach hint needs it. */
export interface WeightsClaim {
  namespace: string;
  claimName: string;
  /** The PersistentVolume it is bound to (the name attach errors give). */
  volumeName?: string;
  accessModes: readonly string[];
}

/**
 * Pods waiting on their nodes for volumes they cannot attach or mount (`why`: the newest
 * such Warning Event), as one Problem (or none). A Multi-Attach error for the weights'
 * volume, when its claim is ReadWriteOnce, says what to change: the pods of a model spread
 * over nodes and all mount the weights.
 */
export function volumeMountProblem(
  stuck: readonly { pod: V1Pod; why: string }[],
  weights?: WeightsClaim,
): Problem | undefined {
  const sorted = [...stuck].sort((a, b) =>
    (a.pod.metadata?.name ?? "").localeCompare(b.pod.metadata?.name ?? ""),
  );
  const first = sorted[0];
  if (!first) return undefined;
  const why = oneLine(first.why);
  const shared = weights?.accessModes.some((m) => m === "ReadOnlyMany" || m === "ReadWriteMany");
  const hint =
    weights?.volumeName &&
    !shared &&
    /Multi-Attach/.test(why) &&
    why.includes(`"${weights.volumeName}"`)
      ? `; the weights' PersistentVolumeClaim ${weights.namespace}/${weights.claimName} (spec.model.source.pvc.claimName) is ${weights.accessModes.join(", ") || "of no access mode"}: its volume attaches to one node at a time, and every pod of the model mounts it; give the weights a ReadOnlyMany or ReadWriteMany claim (examples/fetch-weights-job.yaml fills one), or keep every pod on one node (spec.scheduling.nodeSelector)`
      : "";
  return {
    reason: "VolumeMountFailed",
    message: `${sorted.length} pod(s) cannot mount their volumes, e.g. ${first.pod.metadata?.name} on ${first.pod.spec?.nodeName}: ${why}${hint}`,
  };
}

/**
 * What to change for a container killed for memory: its limit, when it has one (the process
 * keeps more than that), else its request (the node ran out: the scheduler placed it by a
 * request below what it uses). Only the roles' own containers, whose resources the manifest
 * sets.
 */
function oomHint(pod: V1Pod, container: string): string {
  const field =
    container === "shard"
      ? "spec.experts.resources"
      : container === "gateway" || container === "prefill"
        ? "spec.gateway.resources"
        : undefined;
  if (!field) return "";
  const limit = pod.spec?.containers?.find((c) => c.name === container)?.resources?.limits?.[
    "memory"
  ];
  return limit !== undefined
    ? `; it keeps more memory than its limit, ${limit}: raise ${field}.limits.memory`
    : `; its node ran out of memory: raise ${field}.requests.memory to what it keeps, so that it is placed where that is free`;
}

/**
 * Containers that cannot run, as one Problem per kind: an image that cannot be pulled, a
 * container the runtime cannot create (a missing Secret or key), one that keeps exiting
 * (CrashLoopBackOff). The example (the first pod by name) says why: the waiting message, or
 * the last exit's code, reason and termination message, where the expertmesh processes write
 * their error (`[EM_CKPT_READ] ...`; src/cli/termination-log.ts). Init containers (the
 * weights' download) count too.
 */
export function containerProblems(pods: readonly V1Pod[]): Problem[] {
  const found = new Map<Problem["reason"], { count: number; example: string }>();
  const sorted = [...pods].sort((a, b) =>
    (a.metadata?.name ?? "").localeCompare(b.metadata?.name ?? ""),
  );
  for (const pod of sorted) {
    const statuses = [
      ...(pod.status?.initContainerStatuses ?? []),
      ...(pod.status?.containerStatuses ?? []),
    ];
    for (const c of statuses) {
      const waiting = c.state?.waiting;
      const reason = waiting?.reason ? FAILING[waiting.reason] : undefined;
      if (!reason) continue;
      const entry = found.get(reason);
      if (entry) {
        entry.count++;
        break;
      }
      const last = c.lastState?.terminated;
      const why = last
        ? `, last exit ${last.exitCode}${last.reason && last.reason !== "Error" ? ` (${last.reason})` : ""}${last.message ? `: ${oneLine(last.message)}` : ""}${last.reason === "OOMKilled" ? oomHint(pod, c.name) : ""}`
        : waiting?.message
          ? `: ${oneLine(waiting.message)}`
          : "";
      const restarts = c.restartCount ? ` (${c.restartCount} restarts)` : "";
      found.set(reason, {
        count: 1,
        example: `${pod.metadata?.name}: container ${c.name} ${waiting!.reason}${why}${restarts}`,
      });
      break;
    }
  }
  return [...found].map(([reason, { count, example }]) => ({
    reason,
    message: `${count} pod(s) cannot run, e.g. ${example}`,
  }));
}

/**
 * Whether the Deployment controller gave up waiting on a Deployment's rollout: no pod created
 * or made ready for its progressDeadlineSeconds (spec.<role>.rollingUpdate). It keeps
 * trying; nothing is rolled back.
 */
export const stalledRollout = (d: V1Deployment) =>
  d.status?.conditions?.some(
    (c) =>
      c.type === "Progressing" && c.status === "False" && c.reason === "ProgressDeadlineExceeded",
  ) ?? false;

/** Which field sets a Deployment's deadline, by its component. */
const deadlineField = (d: V1Deployment) => `${roleField(d)}.rollingUpdate.progressDeadlineSeconds`;

/**
 * What the spec asks for and leaves unused: a gateway or shard process runs on one GPU
 * (`--device=cuda:0`), so a pod given more than one keeps the rest idle. The message of the
 * reconciler's Warning Event GPUsIdle (once per spec change); undefined when nothing is idle.
 * Several GPUs per process: ADR 0037.
 */
export function idleGpusMessage(model: DeepSeekModel): string | undefined {
  const roles = [
    ["spec.gateway.gpus", model.spec.gateway.gpus, "gateway", "more gateway replicas"],
    ["spec.experts.gpusPerShard", model.spec.experts.gpusPerShard, "shard", "more shards"],
  ] as const;
  const parts = roles
    .filter(([, gpus]) => gpus > 1)
    .map(
      ([field, gpus, role, instead]) =>
        `${field} is ${gpus}, but a ${role} process runs on one GPU (cuda:0): ${gpus - 1} of each ${role} pod's ${gpus} stay${gpus - 1 === 1 ? "s" : ""} idle; ${instead} of one GPU each put every GPU to work`,
    );
  return parts.length ? parts.join("; ") : undefined;
}

/**
 * The stalled rollouts among the model's Deployments (copies of the previous weights aside:
 * the BlueGreen wait has its own deadline), as one problem. The pods' own problems
 * (Unschedulable, ContainerCrashing, ...) say why, where there are any.
 */
export function stalledRolloutProblem(deployments: readonly V1Deployment[]): Problem | undefined {
  const stalled = deployments.filter((d) => !isPreviousCopy(d) && stalledRollout(d));
  if (stalled.length === 0) return undefined;
  const list = stalled
    .map(
      (d) =>
        `${d.metadata?.name} (${d.spec?.progressDeadlineSeconds ?? 600} s, ${deadlineField(d)})`,
    )
    .join(", ");
  return {
    reason: "ProgressDeadlineExceeded",
    message: `${stalled.length} Deployment(s) made no progress within their deadline: ${list}; their pods' problems or events say why`,
  };
}

/** Whether a Deployment's pods are all of its current template and available. */
export function rolledOut(d: V1Deployment): boolean {
  const want = d.spec?.replicas ?? 1;
  const s = d.status ?? {};
  return (
    (s.observedGeneration ?? 0) >= (d.metadata?.generation ?? 0) &&
    (s.updatedReplicas ?? 0) >= want &&
    (s.availableReplicas ?? 0) >= want &&
    (s.replicas ?? 0) <= want
  );
}

function roleCounts(ds: V1Deployment[]) {
  return {
    desiredReplicas: ds.reduce((n, d) => n + (d.spec?.replicas ?? 1), 0),
    readyReplicas: ds.reduce((n, d) => n + (d.status?.readyReplicas ?? 0), 0),
  };
}

/** Carries lastTransitionTime over from the previous condition when status is unchanged. */
function condition(
  prev: ModelCondition[] | undefined,
  now: string,
  generation: number,
  c: Omit<ModelCondition, "lastTransitionTime" | "observedGeneration">,
): ModelCondition {
  const old = prev?.find((p) => p.type === c.type);
  return {
    ...c,
    observedGeneration: generation,
    lastTransitionTime: old && old.status === c.status ? old.lastTransitionTime : now,
  };
}

/** The status to write. `now` is an RFC 3339 timestamp (seconds precision). */
export function computeStatus(model: DeepSeekModel, o: Observed, now: string): DeepSeekModelStatus {
  const generation = model.metadata.generation ?? 0;
  const prev = model.status?.conditions;
  // A copy of a shard on its previous weights (weights-rollout.ts) counts in no role: it
  // only keeps Progressing on until it is gone.
  const byRole = (role: string) =>
    o.deployments.filter(
      (d) => d.metadata?.labels?.[LABEL_COMPONENT] === role && !isPreviousCopy(d),
    );
  const gateway = {
    ...roleCounts(byRole("gateway")),
    selector: Object.entries(labelsFor(model, "gateway"))
      .map(([k, v]) => `${k}=${v}`)
      .join(","),
    ...(o.queueDepth?.gateway !== undefined ? { queueDepth: o.queueDepth.gateway } : {}),
  };
  const shards = {
    ...roleCounts(byRole("shard")),
    ...(o.queueDepth?.shard !== undefined ? { queueDepth: o.queueDepth.shard } : {}),
  };
  const prefill = roleCounts(byRole("prefill"));
  // The gateways', the prefill gateways' (spec.gateway.disaggregation) and each shard's.
  const expectedDeployments =
    1 + (model.spec.gateway.disaggregation ? 1 : 0) + model.spec.experts.shards;
  const copies = o.deployments.filter(isPreviousCopy);
  const current = o.deployments.filter((d) => !isPreviousCopy(d));
  const allRolledOut =
    copies.length === 0 && current.length === expectedDeployments && current.every(rolledOut);
  // Degraded reports every problem, led by the first that keeps the model from serving;
  // Ready only those.
  const blocking = o.problems.find((p) => !p.servingUnaffected);
  const problem = blocking ?? o.problems[0];

  const degraded = problem
    ? {
        type: "Degraded",
        status: "True" as const,
        reason: problem.reason,
        message: [problem, ...o.problems.filter((p) => p !== problem)]
          .map((p) => p.message)
          .join("; "),
      }
    : {
        type: "Degraded",
        status: "False" as const,
        reason: "AsExpected",
        message: "No problems found",
      };
  const stalled = current.filter(stalledRollout);
  const progressing = allRolledOut
    ? {
        type: "Progressing",
        status: "False" as const,
        reason: "RolloutComplete",
        message: `All ${expectedDeployments} Deployments rolled out`,
      }
    : {
        type: "Progressing",
        // As a Deployment's own condition: False once a rollout stopped making progress.
        status: stalled.length > 0 ? ("False" as const) : ("True" as const),
        reason: stalled.length > 0 ? "ProgressDeadlineExceeded" : "RollingOut",
        message:
          (stalled.length > 0
            ? `no progress within the deadline: ${stalled.map((d) => d.metadata?.name).join(", ")}; `
            : "") +
          `${current.filter(rolledOut).length}/${expectedDeployments} Deployments rolled out; pods ready: gateway ${gateway.readyReplicas}/${gateway.desiredReplicas}, ${model.spec.gateway.disaggregation ? `prefill ${prefill.readyReplicas}/${prefill.desiredReplicas}, ` : ""}shards ${shards.readyReplicas}/${shards.desiredReplicas}` +
          (copies.length > 0
            ? `; ${copies.length} shard Deployment(s) of the previous weights serve the old gateways until the new ones are ready`
            : ""),
      };
  const ready =
    allRolledOut && !blocking
      ? {
          type: "Ready",
          status: "True" as const,
          reason: "AllReplicasReady",
          message: `Serving at ${o.endpoint}`,
        }
      : {
          type: "Ready",
          status: "False" as const,
          reason: blocking ? blocking.reason : "ReplicasNotReady",
          message: blocking ? blocking.message : progressing.message,
        };

  return {
    observedGeneration: generation,
    conditions: [ready, progressing, degraded].map((c) => condition(prev, now, generation, c)),
    gateway,
    shards,
    gateways: `${gateway.readyReplicas}/${gateway.desiredReplicas}`,
    shardPods: `${shards.readyReplicas}/${shards.desiredReplicas}`,
    ...(o.queueDepth?.gateway !== undefined
      ? { queueDepth: o.queueDepth.gateway }
      : { queueDepth: 0 }),
    ...(o.planVersion !== undefined ? { planVersion: o.planVersion } : {}),
    endpoint: o.endpoint,
  };
}

/** True when two statuses differ in anything but timestamps' formatting. */
export function statusChanged(a: DeepSeekModelStatus | undefined, b: DeepSeekModelStatus): boolean {
  return JSON.stringify(normalize(a)) !== JSON.stringify(normalize(b));
}

function normalize(s: DeepSeekModelStatus | undefined): unknown {
  if (!s) return undefined;
  const sortKeys = (v: unknown): unknown =>
    Array.isArray(v)
      ? v.map(sortKeys)
      : v && typeof v === "object"
        ? Object.fromEntries(
            Object.keys(v)
              .sort()
              .map((k) => [k, sortKeys((v as Record<string, unknown>)[k])]),
          )
        : v;
  return sortKeys({
    ...s,
    conditions: [...(s.conditions ?? [])].sort((x, y) => x.type.localeCompare(y.type)),
  });
}

/**
 * When to reconcile a model again without an event: never when it is settled (Ready, not
 * Progressing, not Degraded); after `degraded` ms when it serves, rolled out, and only
 * problems that leave serving alone make it Degraded (nothing to wait for but a change the
 * operator does not watch); else after `progress` ms (a rollout under way).
 */
export function pollAfterMs(
  conditions: readonly ModelCondition[],
  problems: readonly Problem[],
  ms: { progress: number; degraded: number },
): number | undefined {
  const state = (type: string) => conditions.find((c) => c.type === type)?.status;
  if (state("Ready") === "True" && state("Progressing") === "False") {
    if (state("Degraded") === "False") return undefined;
    if (problems.every((p) => p.servingUnaffected)) return ms.degraded;
  }
  return ms.progress;
}
