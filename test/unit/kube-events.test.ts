// Which of a pod's Events say that a volume keeps failing to attach or mount
// (src/operator/kube.ts failingMount, mountFailure): the reason the operator gives for a pod
// waiting on its node (Degraded VolumeMountFailed); and which ReplicaSets whose pods were
// refused are asked to try again (replicaSetsToRetry: Degraded PodsNotCreated).
import type { CoreV1Event, V1Deployment, V1ReplicaSet } from "@kubernetes/client-node";
import { describe, expect, it } from "vitest";
import {
  failingMount,
  mountFailure,
  RETRY_ANNOTATION,
  replicaSetsToRetry,
} from "../../src/operator/kube.ts";

const now = Date.UTC(2026, 11, 6, 9, 10, 0);
const ago = (s: number) => new Date(now - s * 1000);

function event(fields: Partial<CoreV1Event>): CoreV1Event {
  return {
    metadata: { name: "p.1" },
    involvedObject: { kind: "Pod", name: "p" },
    type: "Warning",
    reason: "FailedMount",
    count: 3,
    lastTimestamp: ago(30),
    ...fields,
  };
}

describe("failingMount", () => {
  it.each<[string, Partial<CoreV1Event>, boolean]>([
    ["the kubelet's FailedMount, said 3 times, 30 s ago", {}, true],
    ["the attach/detach controller's FailedAttachVolume", { reason: "FailedAttachVolume" }, true],
    ["said once (a ConfigMap not yet synced at start)", { count: 1 }, false],
    ["no count", { count: undefined }, false],
    ["last said 4 minutes ago (mounted since)", { lastTimestamp: ago(240) }, false],
    ["said 3 minutes ago, the kubelet's longest retry", { lastTimestamp: ago(180) }, true],
    ["another reason", { reason: "FailedScheduling" }, false],
    [
      "the events.k8s.io form: a series' count and last time",
      {
        count: undefined,
        lastTimestamp: undefined,
        eventTime: ago(600) as never,
        series: { count: 5, lastObservedTime: ago(10) as never },
      },
      true,
    ],
    [
      "a series last seen long ago",
      {
        count: undefined,
        lastTimestamp: undefined,
        series: { count: 5, lastObservedTime: ago(600) as never },
      },
      false,
    ],
  ])("%s", (_what, fields, failing) => {
    expect(failingMount(event(fields), now)).toBe(failing);
  });
});

describe("mountFailure: the newest failing mount, unless the kubelet went on to the containers since", () => {
  const normal = (reason: string, s: number): CoreV1Event =>
    event({ type: "Normal", reason, count: 1, lastTimestamp: ago(s) });
  it.each<[string, CoreV1Event[], string | undefined]>([
    ["a failing mount alone", [event({ message: "a" })], "a"],
    [
      "the newest of two",
      [event({ message: "old", lastTimestamp: ago(90) }), event({ message: "new" })],
      "new",
    ],
    [
      "then Pulling (its volumes mounted, its image pulled now)",
      [event({}), normal("Pulling", 10)],
      undefined,
    ],
    ["then Pulled, Created or Started", [event({}), normal("Started", 5)], undefined],
    ["Pulling in the same second", [event({}), normal("Pulling", 30)], undefined],
    [
      "Pulling before it (a container restarted, then a mount fails)",
      [normal("Pulling", 100), event({ message: "a" })],
      "a",
    ],
    [
      "a Normal event of another kind since",
      [event({ message: "a" }), normal("Scheduled", 5)],
      "a",
    ],
    [
      "a Warning named Pulling does not count",
      [event({ message: "a" }), { ...normal("Pulling", 5), type: "Warning" }],
      "a",
    ],
    ["nothing failing", [normal("Pulling", 5), event({ count: 1 })], undefined],
    ["no events", [], undefined],
  ])("%s", (_what, events, message) => {
    expect(mountFailure(events, now)?.message).toBe(message);
  });
});

describe("replicaSetsToRetry: a Deployment's refused ReplicaSets, at most every 30 s", () => {
  const d: V1Deployment = { metadata: { name: "m-gateway", uid: "d1" } };
  const rs = (o: {
    name?: string;
    owner?: string;
    refused?: boolean;
    reason?: string;
    askedAgo?: number;
    asked?: string;
  }): V1ReplicaSet => ({
    metadata: {
      name: o.name ?? "m-gateway-abc",
      ownerReferences: [
        { apiVersion: "apps/v1", kind: "Deployment", name: "x", uid: o.owner ?? "d1" },
      ],
      annotations:
        o.asked !== undefined
          ? { [RETRY_ANNOTATION]: o.asked }
          : o.askedAgo !== undefined
            ? { [RETRY_ANNOTATION]: ago(o.askedAgo).toISOString() }
            : {},
    },
    spec: { selector: {} },
    status: {
      replicas: 0,
      conditions:
        o.refused === false
          ? []
          : [{ type: "ReplicaFailure", status: "True", reason: o.reason ?? "FailedCreate" }],
    },
  });
  it.each<[string, V1ReplicaSet[], string[]]>([
    ["refused, never asked", [rs({})], ["m-gateway-abc"]],
    ["asked 10 s ago: not yet", [rs({ askedAgo: 10 })], []],
    ["asked 30 s ago: again", [rs({ askedAgo: 30 })], ["m-gateway-abc"]],
    ["an annotation that is no time: asked", [rs({ asked: "soon" })], ["m-gateway-abc"]],
    ["not refused", [rs({ refused: false })], []],
    ["another ReplicaFailure reason", [rs({ reason: "FailedDelete" })], []],
    ["another Deployment's", [rs({ owner: "d2" })], []],
    [
      "the refused ones of several",
      [rs({ name: "a" }), rs({ name: "b", refused: false }), rs({ name: "c", askedAgo: 45 })],
      ["a", "c"],
    ],
  ])("%s", (_what, sets, names) => {
    expect(replicaSetsToRetry(d, sets, now).map((r) => r.metadata!.name)).toEqual(names);
  });
});
