import type { V1Deployment, V1Pod } from "@kubernetes/client-node";
import { describe, expect, it } from "vitest";
import { parseManifest } from "../../src/api/manifest.ts";
import {
  computeStatus,
  containerProblems,
  idleGpusMessage,
  type Problem,
  podsNotCreatedProblem,
  pollAfterMs,
  stalledRolloutProblem,
  statusChanged,
  unschedulableProblem,
  volumeMountProblem,
  waitingOnNode,
} from "../../src/operator/status.ts";

const model = parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m, namespace: ns, generation: 3 }
spec:
  model: { preset: tiny-v2, source: { pvc: { claimName: w } } }
  experts: { shards: 2 }
`);

function deployment(
  role: string,
  name: string,
  want: number,
  ready: number,
  generation = 1,
  observed = 1,
): V1Deployment {
  return {
    metadata: { name, generation, labels: { "app.kubernetes.io/component": role } },
    spec: { replicas: want, selector: {}, template: {} },
    status: {
      observedGeneration: observed,
      replicas: want,
      updatedReplicas: ready,
      availableReplicas: ready,
      readyReplicas: ready,
    },
  };
}

/** A Deployment whose controller gave up waiting on its rollout (after `deadline` s). */
function stalled(d: V1Deployment, deadline = 1800): V1Deployment {
  return {
    ...d,
    spec: { ...d.spec!, progressDeadlineSeconds: deadline },
    status: {
      ...d.status,
      conditions: [
        {
          type: "Progressing",
          status: "False",
          reason: "ProgressDeadlineExceeded",
          message: `ReplicaSet "${d.metadata?.name}-5d9c" has timed out progressing.`,
        },
      ],
    },
  };
}

const healthy = [
  deployment("gateway", "m-gateway", 1, 1),
  deployment("shard", "m-shard-0", 2, 2),
  deployment("shard", "m-shard-1", 1, 1),
];
const now = "2026-11-28T12:00:00Z";
const obs = {
  pods: [] as V1Pod[],
  problems: [],
  planVersion: 1,
  endpoint: "http://m.ns.svc:8000/v1",
};

function cond(s: ReturnType<typeof computeStatus>, type: string) {
  return s.conditions!.find((c) => c.type === type)!;
}

describe("computeStatus", () => {
  it.each([
    [
      "all rolled out",
      healthy,
      [],
      ["True", "AllReplicasReady"],
      ["False", "RolloutComplete"],
      ["False", "AsExpected"],
    ],
    [
      "a shard not ready",
      [healthy[0]!, deployment("shard", "m-shard-0", 2, 1), healthy[2]!],
      [],
      ["False", "ReplicasNotReady"],
      ["True", "RollingOut"],
      ["False", "AsExpected"],
    ],
    [
      "a Deployment missing",
      healthy.slice(0, 2),
      [],
      ["False", "ReplicasNotReady"],
      ["True", "RollingOut"],
      ["False", "AsExpected"],
    ],
    [
      "a stale Deployment generation",
      [healthy[0]!, deployment("shard", "m-shard-0", 2, 2, 2, 1), healthy[2]!],
      [],
      ["False", "ReplicasNotReady"],
      ["True", "RollingOut"],
      ["False", "AsExpected"],
    ],
    [
      "a missing PVC",
      [],
      [{ reason: "PVCNotFound" as const, message: "no pvc" }],
      ["False", "PVCNotFound"],
      ["True", "RollingOut"],
      ["True", "PVCNotFound"],
    ],
    [
      "no PodMonitor CRD (serving is not affected)",
      healthy,
      [
        {
          reason: "PodMonitorCRDNotFound" as const,
          message: "no crd",
          servingUnaffected: true,
        },
      ],
      ["True", "AllReplicasReady"],
      ["False", "RolloutComplete"],
      ["True", "PodMonitorCRDNotFound"],
    ],
    [
      "no PodMonitor CRD, and pods that cannot be scheduled: the blocking one leads",
      healthy,
      [
        {
          reason: "PodMonitorCRDNotFound" as const,
          message: "no crd",
          servingUnaffected: true,
        },
        { reason: "Unschedulable" as const, message: "no gpus" },
      ],
      ["False", "Unschedulable"],
      ["False", "RolloutComplete"],
      ["True", "Unschedulable"],
    ],
    [
      "a shard's rollout stalled: Progressing False, as the Deployment's own condition",
      [healthy[0]!, stalled(deployment("shard", "m-shard-0", 2, 1)), healthy[2]!],
      [],
      ["False", "ReplicasNotReady"],
      ["False", "ProgressDeadlineExceeded"],
      ["False", "AsExpected"],
    ],
    [
      "a stalled rollout with its problem (what the reconciler adds)",
      [healthy[0]!, stalled(deployment("shard", "m-shard-0", 2, 1)), healthy[2]!],
      [stalledRolloutProblem([stalled(deployment("shard", "m-shard-0", 2, 1))])!],
      ["False", "ProgressDeadlineExceeded"],
      ["False", "ProgressDeadlineExceeded"],
      ["True", "ProgressDeadlineExceeded"],
    ],
    [
      "a stalled copy of the previous weights: the BlueGreen wait's, not a stalled rollout",
      [
        ...healthy,
        stalled({
          ...deployment("shard", "m-shard-0-prev-1a2b", 2, 0),
          metadata: {
            name: "m-shard-0-prev-1a2b",
            labels: {
              "app.kubernetes.io/component": "shard",
              "expertmesh.io/previous-weights": "true",
            },
          },
        }),
      ],
      [],
      ["False", "ReplicasNotReady"],
      ["True", "RollingOut"],
      ["False", "AsExpected"],
    ],
  ])("%s", (_name, deployments, problems, ready, progressing, degraded) => {
    const s = computeStatus(model, { ...obs, deployments, problems }, now);
    expect([cond(s, "Ready").status, cond(s, "Ready").reason]).toEqual(ready);
    expect([cond(s, "Progressing").status, cond(s, "Progressing").reason]).toEqual(progressing);
    expect([cond(s, "Degraded").status, cond(s, "Degraded").reason]).toEqual(degraded);
    expect(s.observedGeneration).toBe(3);
    for (const c of s.conditions!) expect(c.observedGeneration).toBe(3);
  });

  it("with disaggregated prefill, waits for the prefill gateways' Deployment too", () => {
    const disagg = parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m, namespace: ns, generation: 3 }
spec:
  model: { preset: tiny-v2, source: { pvc: { claimName: w } } }
  experts: { shards: 2 }
  gateway: { kvCache: { remoteBytes: 1048576 }, disaggregation: { replicas: 2 } }
`);
    const status = (deployments: V1Deployment[]) =>
      computeStatus(disagg, { ...obs, deployments, problems: [] }, now);
    const missing = status(healthy);
    expect(cond(missing, "Ready").status).toBe("False");
    expect(cond(missing, "Progressing").message).toBe(
      "3/4 Deployments rolled out; pods ready: gateway 1/1, prefill 0/0, shards 3/3",
    );
    const starting = status([...healthy, deployment("prefill", "m-prefill", 2, 1)]);
    expect(cond(starting, "Progressing").message).toContain("prefill 1/2");
    const all = status([...healthy, deployment("prefill", "m-prefill", 2, 2)]);
    expect([cond(all, "Ready").status, cond(all, "Progressing").reason]).toEqual([
      "True",
      "RolloutComplete",
    ]);
    // The gateways' counts are the serving gateways' alone.
    expect(all.gateways).toBe("1/1");
  });

  it("counts replicas per role for the printer columns", () => {
    const s = computeStatus(
      model,
      { ...obs, deployments: [healthy[0]!, deployment("shard", "m-shard-0", 2, 1), healthy[2]!] },
      now,
    );
    expect(s.gateways).toBe("1/1");
    expect(s.shardPods).toBe("2/3");
    expect(s.shards).toEqual({ desiredReplicas: 3, readyReplicas: 2 });
  });

  it("keeps lastTransitionTime while a condition's status holds, so a restart writes nothing", () => {
    const first = computeStatus(model, { ...obs, deployments: healthy }, now);
    const again = computeStatus(
      { ...model, status: first },
      { ...obs, deployments: healthy },
      "2026-11-28T13:00:00Z",
    );
    expect(again.conditions).toEqual(first.conditions);
    expect(statusChanged(first, again)).toBe(false);
    const worse = computeStatus(
      { ...model, status: first },
      { ...obs, deployments: healthy.slice(0, 2) },
      "2026-11-28T13:00:00Z",
    );
    expect(cond(worse, "Ready").lastTransitionTime).toBe("2026-11-28T13:00:00Z");
    expect(statusChanged(first, worse)).toBe(true);
  });
});

describe("unschedulableProblem", () => {
  const pod = (
    name: string,
    reason?: string,
    message = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
  ): V1Pod => ({
    metadata: { name },
    status: {
      conditions: reason
        ? [{ type: "PodScheduled", status: "False", reason, message }]
        : [{ type: "PodScheduled", status: "True" }],
    },
  });
  it.each([
    [[pod("a")], undefined],
    [[pod("a", "SchedulerError")], undefined],
    [
      [pod("b", "Unschedulable"), pod("a", "Unschedulable")],
      "2 pod(s) cannot be scheduled, e.g. a: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
    ],
  ])("%#", (pods, message) => {
    expect(unschedulableProblem(pods)?.message).toBe(message);
  });

  // A rollout's surge pod: the message says how to roll in place.
  const owned = (p: V1Pod, deployment: string, component: string): V1Pod => ({
    ...p,
    metadata: {
      ...p.metadata,
      labels: { "pod-template-hash": "5c8d7f9b6", "app.kubernetes.io/component": component },
      ownerReferences: [
        { apiVersion: "apps/v1", kind: "ReplicaSet", name: `${deployment}-5c8d7f9b6`, uid: "u" },
      ],
    },
  });
  const dep = (name: string, replicas: number, pods: number, maxSurge = 1): V1Deployment => ({
    metadata: { name },
    spec: {
      replicas,
      selector: {},
      strategy: { type: "RollingUpdate", rollingUpdate: { maxSurge, maxUnavailable: 0 } },
      template: {},
    },
    status: { replicas: pods },
  });
  const stuckShard = owned(pod("m-shard-1-5c8d7f9b6-xk2v9", "Unschedulable"), "m-shard-1", "shard");
  const stuckGateway = owned(
    pod("m-gateway-5c8d7f9b6-q8w4z", "Unschedulable"),
    "m-gateway",
    "gateway",
  );
  const inPlace = (d: string, field: string) =>
    `; ${d}'s rollout waits until its surge pod fits: spec.${field}.rollingUpdate {maxSurge: 0, maxUnavailable: 1} replaces the pods in place instead`;
  it.each([
    [
      "a shard's surge pod",
      [stuckShard],
      [dep("m-shard-1", 1, 2)],
      inPlace("m-shard-1", "experts"),
    ],
    [
      "a gateway's surge pod",
      [stuckGateway],
      [dep("m-gateway", 2, 3)],
      inPlace("m-gateway", "gateway"),
    ],
    ["no rollout: as many pods as replicas", [stuckShard], [dep("m-shard-1", 2, 2)], ""],
    ["a strategy without surge", [stuckShard], [dep("m-shard-1", 1, 2, 0)], ""],
    ["its Deployment unknown", [stuckShard], [dep("m-shard-0", 1, 2)], ""],
    [
      "not the example pod",
      [pod("a-first", "Unschedulable"), stuckShard],
      [dep("m-shard-1", 1, 2)],
      inPlace("m-shard-1", "experts"),
    ],
  ])("%s", (_what, pods, deployments, hint) => {
    const p = unschedulableProblem(pods, deployments)!;
    expect(p.reason).toBe("Unschedulable");
    expect(p.message.endsWith("nvidia.com/gpu." + hint)).toBe(true);
  });
});

describe("pollAfterMs", () => {
  type S = "True" | "False";
  const cond = (ready: S, progressing: S, degraded: S) =>
    (
      [
        ["Ready", ready],
        ["Progressing", progressing],
        ["Degraded", degraded],
      ] as const
    ).map(([type, status]) => ({
      type,
      status,
      reason: "r",
      message: "m",
      lastTransitionTime: "2026-12-01T00:00:00Z",
      observedGeneration: 1,
    }));
  const monitor: Problem = {
    reason: "PodMonitorCRDNotFound",
    message: "m",
    servingUnaffected: true,
  };
  const rwo: Problem = {
    reason: "SharedPVCNotReadWriteMany",
    message: "m",
    servingUnaffected: true,
  };
  const limit: Problem = { reason: "MemoryLimitTooLow", message: "m" };
  const ms = { progress: 5, degraded: 15 };
  it.each([
    ["settled", cond("True", "False", "False"), [], undefined],
    ["rolling out", cond("False", "True", "False"), [], 5],
    ["serving, a PodMonitor it cannot make", cond("True", "False", "True"), [monitor], 15],
    ["serving, two such problems", cond("True", "False", "True"), [monitor, rwo], 15],
    ["still rolling out with one", cond("True", "True", "True"), [monitor], 5],
    ["a problem that blocks serving", cond("False", "False", "True"), [limit], 5],
    ["a blocking one beside", cond("True", "False", "True"), [monitor, limit], 5],
  ] as const)("%s", (_name, conditions, problems, want) => {
    expect(pollAfterMs(conditions, problems, ms)).toBe(want);
  });
});

describe("containerProblems", () => {
  type Status = NonNullable<NonNullable<V1Pod["status"]>["containerStatuses"]>[number];
  const c = (state: Status["state"], extra: Partial<Status> = {}): Status => ({
    name: "shard",
    image: "expertmesh:1",
    imageID: "",
    ready: false,
    restartCount: 0,
    state,
    ...extra,
  });
  const pod = (name: string, containers: Status[], init: Status[] = []): V1Pod => ({
    metadata: { name },
    status: { containerStatuses: containers, initContainerStatuses: init },
  });
  const crash = c(
    {
      waiting: { reason: "CrashLoopBackOff", message: "back-off 40s restarting failed container" },
    },
    {
      restartCount: 4,
      lastState: {
        terminated: {
          exitCode: 1,
          reason: "Error",
          message: "[EM_CKPT_READ] cannot read /models/config.json: ENOENT\n",
        },
      },
    },
  );
  const oom = c(
    { waiting: { reason: "CrashLoopBackOff" } },
    { restartCount: 2, lastState: { terminated: { exitCode: 137, reason: "OOMKilled" } } },
  );
  const pull = c({
    waiting: { reason: "ImagePullBackOff", message: 'Back-off pulling image "expertmesh:nope"' },
  });
  const config = c({
    waiting: {
      reason: "CreateContainerConfigError",
      message: 'secret "keys" not found',
    },
  });
  it.each<[string, V1Pod[], [string, string][]]>([
    [
      "running and starting pods",
      [
        pod("a", [c({ running: { startedAt: new Date() } }, { ready: true })]),
        pod("b", [c({ waiting: { reason: "ContainerCreating" } })]),
        pod("c", [], [c({ waiting: { reason: "PodInitializing" } })]),
        pod("d", []),
      ],
      [],
    ],
    [
      "a crash loop: the process's own message",
      [pod("m-shard-0-x", [crash])],
      [
        [
          "ContainerCrashing",
          "1 pod(s) cannot run, e.g. m-shard-0-x: container shard CrashLoopBackOff, last exit 1: [EM_CKPT_READ] cannot read /models/config.json: ENOENT (4 restarts)",
        ],
      ],
    ],
    [
      "killed for memory",
      [pod("m-gateway-y", [{ ...oom, name: "gateway" }])],
      [
        [
          "ContainerCrashing",
          "1 pod(s) cannot run, e.g. m-gateway-y: container gateway CrashLoopBackOff, last exit 137 (OOMKilled); its node ran out of memory: raise spec.gateway.resources.requests.memory to what it keeps, so that it is placed where that is free (2 restarts)",
        ],
      ],
    ],
    [
      "killed for memory over its limit",
      [
        {
          ...pod("m-shard-2-y", [oom]),
          spec: {
            containers: [{ name: "shard", resources: { limits: { memory: "16Gi", cpu: "4" } } }],
          },
        },
      ],
      [
        [
          "ContainerCrashing",
          "1 pod(s) cannot run, e.g. m-shard-2-y: container shard CrashLoopBackOff, last exit 137 (OOMKilled); it keeps more memory than its limit, 16Gi: raise spec.experts.resources.limits.memory (2 restarts)",
        ],
      ],
    ],
    [
      "killed for memory: a container the manifest does not size gets no hint",
      [
        pod(
          "m-shard-0-w",
          [c({ waiting: { reason: "PodInitializing" } })],
          [{ ...oom, name: "download-weights" }],
        ),
      ],
      [
        [
          "ContainerCrashing",
          "1 pod(s) cannot run, e.g. m-shard-0-w: container download-weights CrashLoopBackOff, last exit 137 (OOMKilled) (2 restarts)",
        ],
      ],
    ],
    [
      "an image that cannot be pulled; the first pod by name is the example",
      [pod("m-shard-1-b", [pull]), pod("m-shard-1-a", [pull])],
      [
        [
          "ImagePullFailed",
          '2 pod(s) cannot run, e.g. m-shard-1-a: container shard ImagePullBackOff: Back-off pulling image "expertmesh:nope"',
        ],
      ],
    ],
    [
      "a container the runtime cannot create",
      [pod("g", [config])],
      [
        [
          "ContainerConfigInvalid",
          '1 pod(s) cannot run, e.g. g: container shard CreateContainerConfigError: secret "keys" not found',
        ],
      ],
    ],
    [
      "the weights' download failing (an init container)",
      [
        pod(
          "m-shard-0-z",
          [c({ waiting: { reason: "PodInitializing" } })],
          [{ ...crash, name: "download-weights" }],
        ),
      ],
      [
        [
          "ContainerCrashing",
          "1 pod(s) cannot run, e.g. m-shard-0-z: container download-weights CrashLoopBackOff, last exit 1: [EM_CKPT_READ] cannot read /models/config.json: ENOENT (4 restarts)",
        ],
      ],
    ],
    [
      "one problem per kind",
      [pod("a", [pull]), pod("b", [crash]), pod("c", [crash])],
      [
        ["ImagePullFailed", expect.stringMatching(/^1 pod\(s\) cannot run, e\.g\. a:/) as never],
        ["ContainerCrashing", expect.stringMatching(/^2 pod\(s\) cannot run, e\.g\. b:/) as never],
      ],
    ],
    [
      "a long message is cut to one line",
      [
        pod("a", [
          c(
            { waiting: { reason: "CrashLoopBackOff" } },
            { lastState: { terminated: { exitCode: 1, message: `x\n${"y".repeat(2000)}` } } },
          ),
        ]),
      ],
      [["ContainerCrashing", expect.stringMatching(/last exit 1: x y{495}\.\.\.$/) as never]],
    ],
  ])("%s", (_what, pods, want) => {
    expect(containerProblems(pods).map((p) => [p.reason, p.message])).toEqual(want);
  });
});

describe("stalledRolloutProblem", () => {
  it.each([
    ["none stalled", healthy, undefined],
    [
      "a shard's",
      [healthy[0]!, stalled(healthy[1]!, 900), healthy[2]!],
      "1 Deployment(s) made no progress within their deadline: m-shard-0 (900 s, spec.experts.rollingUpdate.progressDeadlineSeconds); their pods' problems or events say why",
    ],
    [
      "the gateways' and a shard's",
      [stalled(healthy[0]!), healthy[1]!, stalled(healthy[2]!, 60)],
      "2 Deployment(s) made no progress within their deadline: m-gateway (1800 s, spec.gateway.rollingUpdate.progressDeadlineSeconds), m-shard-1 (60 s, spec.experts.rollingUpdate.progressDeadlineSeconds); their pods' problems or events say why",
    ],
  ])("%s", (_name, deployments, message) => {
    const p = stalledRolloutProblem(deployments);
    expect(p?.message).toBe(message);
    if (p) expect([p.reason, p.servingUnaffected]).toEqual(["ProgressDeadlineExceeded", undefined]);
  });
});

describe("podsNotCreatedProblem", () => {
  const quota =
    'pods "m-shard-1-5c8d7f9b6-xk2v9" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=2, limited: requests.nvidia.com/gpu=2';
  const runtime =
    'pods "m-gateway-5c8d7f9b6-q8w4z" is forbidden: pod rejected: RuntimeClass "nvidia" not found';
  /** A Deployment with `pods` of `replicas` made, its ReplicaSet's create refused by `why`. */
  const refused = (
    name: string,
    component: string,
    why: string | undefined,
    pods = 0,
    replicas = 1,
    maxSurge = 1,
    reason = "FailedCreate",
  ): V1Deployment => ({
    metadata: { name, labels: { "app.kubernetes.io/component": component } },
    spec: {
      replicas,
      selector: {},
      strategy: { type: "RollingUpdate", rollingUpdate: { maxSurge, maxUnavailable: 0 } },
      template: {},
    },
    status: {
      replicas: pods,
      conditions: why ? [{ type: "ReplicaFailure", status: "True", reason, message: why }] : [],
    },
  });
  it.each<[string, V1Deployment[], string | undefined]>([
    ["every pod made", [refused("m-shard-0", "shard", undefined)], undefined],
    ["a failed delete", [refused("m-shard-0", "shard", "x", 1, 1, 1, "FailedDelete")], undefined],
    [
      "a quota with no room: raise it or ask for less",
      [refused("m-shard-1", "shard", quota)],
      `1 Deployment(s) cannot create their pods, e.g. m-shard-1: ${quota}; raise the namespace's ResourceQuota, or ask for less in spec.experts (shards, replicas, gpusPerShard, resources)`,
    ],
    [
      "a rollout's surge pod over the quota: roll in place",
      [refused("m-shard-1", "shard", quota, 1, 1)],
      `1 Deployment(s) cannot create their pods, e.g. m-shard-1: ${quota}; its rollout's surge pod counts against the quota too: spec.experts.rollingUpdate {maxSurge: 0, maxUnavailable: 1} replaces the pods in place instead`,
    ],
    [
      "no surge in the strategy",
      [refused("m-gateway", "gateway", quota, 2, 2, 0)],
      `1 Deployment(s) cannot create their pods, e.g. m-gateway: ${quota}; raise the namespace's ResourceQuota, or ask for less in spec.gateway (replicas, gpus, resources)`,
    ],
    [
      "a RuntimeClass the cluster lacks; the first by name is the example",
      [refused("m-shard-0", "shard", runtime), refused("m-gateway", "gateway", runtime)],
      `2 Deployment(s) cannot create their pods, e.g. m-gateway: ${runtime}; spec.scheduling.runtimeClassName names a RuntimeClass this cluster does not have (kubectl get runtimeclass)`,
    ],
    [
      "another refusal: the API server's words alone, on one line",
      [
        refused(
          "m-prefill",
          "prefill",
          'admission webhook "policy.example.com" denied\n the request',
        ),
      ],
      '1 Deployment(s) cannot create their pods, e.g. m-prefill: admission webhook "policy.example.com" denied the request',
    ],
  ])("%s", (_what, deployments, message) => {
    const p = podsNotCreatedProblem(deployments);
    expect(p?.message).toBe(message);
    if (p) expect(p.reason).toBe("PodsNotCreated");
    if (p) expect(p.servingUnaffected).toBeUndefined();
  });
});

describe("waitingOnNode and volumeMountProblem", () => {
  const t = (s: number) => new Date(Date.UTC(2026, 11, 6, 9, 0, s));
  const now = t(90).getTime();
  type Waiting = "waiting" | "running" | "init-running" | "restarted" | "none";
  /** A pod of `phase` on node n1 (or none) since `since` s, its containers in `state`. */
  const pod = (
    name: string,
    state: Waiting = "waiting",
    since = 0,
    phase = "Pending",
    node: string | null = "n1",
  ): V1Pod => ({
    metadata: { name },
    spec: { containers: [], ...(node ? { nodeName: node } : {}) },
    status: {
      phase,
      conditions: [{ type: "PodScheduled", status: "True", lastTransitionTime: t(since) }],
      ...(state === "init-running"
        ? { initContainerStatuses: [{ name: "download-weights", state: { running: {} } } as never] }
        : {}),
      containerStatuses:
        state === "none"
          ? []
          : [
              {
                name: "shard",
                state:
                  state === "running"
                    ? { running: {} }
                    : { waiting: { reason: "ContainerCreating" } },
                ...(state === "restarted" ? { lastState: { terminated: { exitCode: 1 } } } : {}),
              } as never,
            ],
    },
  });
  it.each<[string, V1Pod, boolean]>([
    ["ContainerCreating for 90 s", pod("a"), true],
    ["no container status yet, 90 s", pod("a", "none"), true],
    ["ContainerCreating for 30 s of 60", pod("a", "waiting", 60), false],
    ["running", pod("a", "running", 0, "Running"), false],
    ["its download running (phase Pending)", pod("a", "init-running"), false],
    ["a container that has run before", pod("a", "restarted"), false],
    ["not on a node", pod("a", "waiting", 0, "Pending", null), false],
    ["being deleted", { ...pod("a"), metadata: { name: "a", deletionTimestamp: t(80) } }, false],
  ])("waitingOnNode: %s", (_what, p, waiting) => {
    expect(waitingOnNode(p, now, 60_000)).toBe(waiting);
  });

  const multiAttach =
    'FailedAttachVolume: Multi-Attach error for volume "pv-weights" Volume is already used by pod(s) m-shard-0-5c8d7f9b6-xk2v9';
  const rwo = {
    namespace: "ns",
    claimName: "weights",
    volumeName: "pv-weights",
    accessModes: ["ReadWriteOnce"],
  };
  const hint =
    "; the weights' PersistentVolumeClaim ns/weights (spec.model.source.pvc.claimName) is ReadWriteOnce: its volume attaches to one node at a time, and every pod of the model mounts it; give the weights a ReadOnlyMany or ReadWriteMany claim (examples/fetch-weights-job.yaml fills one), or keep every pod on one node (spec.scheduling.nodeSelector)";
  it.each<[string, { pod: V1Pod; why: string }[], typeof rwo | undefined, string | undefined]>([
    ["none", [], rwo, undefined],
    [
      "the weights' ReadWriteOnce volume attached elsewhere: what to change",
      [{ pod: pod("m-shard-1-x"), why: multiAttach }],
      rwo,
      `1 pod(s) cannot mount their volumes, e.g. m-shard-1-x on n1: ${multiAttach}${hint}`,
    ],
    [
      "a ReadOnlyMany claim: no hint",
      [{ pod: pod("m-shard-1-x"), why: multiAttach }],
      { ...rwo, accessModes: ["ReadOnlyMany", "ReadWriteOnce"] },
      `1 pod(s) cannot mount their volumes, e.g. m-shard-1-x on n1: ${multiAttach}`,
    ],
    [
      "another volume's Multi-Attach error: no hint",
      [{ pod: pod("m-shard-1-x"), why: multiAttach.replace("pv-weights", "pv-other") }],
      rwo,
      `1 pod(s) cannot mount their volumes, e.g. m-shard-1-x on n1: ${multiAttach.replace("pv-weights", "pv-other")}`,
    ],
    [
      "a mount that fails, the first by name as the example, on one line",
      [
        { pod: pod("m-shard-1-x"), why: "FailedMount: b" },
        {
          pod: pod("m-gateway-y"),
          why: 'FailedMount: MountVolume.SetUp failed for volume "model" :\n mount failed: exit status 32',
        },
      ],
      undefined,
      '2 pod(s) cannot mount their volumes, e.g. m-gateway-y on n1: FailedMount: MountVolume.SetUp failed for volume "model" : mount failed: exit status 32',
    ],
  ])("volumeMountProblem: %s", (_what, stuck, weights, message) => {
    const p = volumeMountProblem(stuck, weights);
    expect(p?.message).toBe(message);
    if (p) expect(p.reason).toBe("VolumeMountFailed");
  });
});

describe("idleGpusMessage", () => {
  const withGpus = (gateway: number, shard: number) =>
    parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m, namespace: ns }
spec:
  model: { preset: tiny-v2, source: { pvc: { claimName: w } } }
  gateway: { gpus: ${gateway} }
  experts: { shards: 2, gpusPerShard: ${shard} }
`);
  it.each([
    [1, 1, undefined],
    [0, 0, undefined],
    [0, 1, undefined],
    [
      1,
      2,
      "spec.experts.gpusPerShard is 2, but a shard process runs on one GPU (cuda:0): 1 of each shard pod's 2 stays idle; more shards of one GPU each put every GPU to work",
    ],
    [
      4,
      8,
      "spec.gateway.gpus is 4, but a gateway process runs on one GPU (cuda:0): 3 of each gateway pod's 4 stay idle; more gateway replicas of one GPU each put every GPU to work; " +
        "spec.experts.gpusPerShard is 8, but a shard process runs on one GPU (cuda:0): 7 of each shard pod's 8 stay idle; more shards of one GPU each put every GPU to work",
    ],
  ])("gateway %i, shards %i", (gateway, shard, want) => {
    expect(idleGpusMessage(withGpus(gateway, shard))).toBe(want);
  });
});
