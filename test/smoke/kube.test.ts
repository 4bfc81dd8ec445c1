// Proves the Kubernetes side of the test environment is a real control plane: the API
// server stores objects in etcd, the controller-manager makes ReplicaSets and Pods, the
// scheduler binds GPU pods to fake GPU nodes, kwok reports them Running, RBAC is enforced.
import {
  AppsV1Api,
  CoreV1Api,
  RbacAuthorizationV1Api,
  type V1Pod,
  VersionApi,
} from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { adminKubeConfig, testEnv, tokenKubeConfig, uniqueName, waitFor } from "../support/env.ts";

function statusOf(err: unknown): number | undefined {
  return (err as { code?: number })?.code;
}

describe("Kubernetes control plane", () => {
  const kc = adminKubeConfig();
  const core = kc.makeApiClient(CoreV1Api);
  const apps = kc.makeApiClient(AppsV1Api);
  const rbac = kc.makeApiClient(RbacAuthorizationV1Api);
  const namespace = uniqueName("smoke");

  beforeAll(async () => {
    await core.createNamespace({ body: { metadata: { name: namespace } } });
    await waitFor("default service account", async () =>
      core.readNamespacedServiceAccount({ name: "default", namespace }),
    );
  });
  afterAll(async () => {
    await core.deleteNamespace({ name: namespace }).catch(() => {});
  });

  it("reports the pinned Kubernetes version", async () => {
    const version = await kc.makeApiClient(VersionApi).getCode();
    expect(version.gitVersion).toBe(testEnv().binaries.kubectl.match(/kubernetes-(v[\d.]+)/)?.[1]);
  });

  it("has at least two Ready fake GPU nodes with 8 GPUs each", async () => {
    const nodes = (await core.listNode({ labelSelector: "nvidia.com/gpu.present=true" })).items;
    expect(nodes.length).toBeGreaterThanOrEqual(2);
    for (const n of nodes) {
      expect(n.status?.allocatable?.["nvidia.com/gpu"]).toBe("8");
      expect(n.status?.conditions?.find((c) => c.type === "Ready")?.status).toBe("True");
    }
  });

  it("runs a Deployment that requests nvidia.com/gpu on the GPU nodes", async () => {
    const labels = { app: "gpu-smoke" };
    await apps.createNamespacedDeployment({
      namespace,
      body: {
        metadata: { name: "gpu-smoke" },
        spec: {
          replicas: 3,
          selector: { matchLabels: labels },
          template: {
            metadata: { labels },
            spec: {
              nodeSelector: { "nvidia.com/gpu.present": "true" },
              containers: [
                {
                  name: "shard",
                  image: "registry.invalid/expertmesh:smoke",
                  resources: { limits: { "nvidia.com/gpu": "1" }, requests: { cpu: "100m" } },
                },
              ],
            },
          },
        },
      },
    });
    const pods = await waitFor(
      "3 Running pods",
      async () => {
        const list = await core.listNamespacedPod({ namespace, labelSelector: "app=gpu-smoke" });
        const running = list.items.filter((p: V1Pod) => p.status?.phase === "Running");
        return running.length === 3 ? running : undefined;
      },
      90_000,
    );
    const gpuNodes = new Set(testEnv().kube.nodeNames);
    for (const pod of pods) {
      // Created by the controller-manager (through a ReplicaSet), bound by the scheduler.
      expect(pod.metadata?.ownerReferences?.[0]?.kind).toBe("ReplicaSet");
      expect(gpuNodes.has(pod.spec?.nodeName ?? "")).toBe(true);
      expect(pod.status?.conditions?.find((c) => c.type === "PodScheduled")?.status).toBe("True");
    }
    const deployment = await waitFor("deployment available", async () => {
      const d = await apps.readNamespacedDeployment({ name: "gpu-smoke", namespace });
      return d.status?.availableReplicas === 3 ? d : undefined;
    });
    expect(deployment.status?.readyReplicas).toBe(3);
  });

  it("leaves a pod Pending when no node has the GPUs it asks for", async () => {
    await core.createNamespacedPod({
      namespace,
      body: {
        metadata: { name: "too-many-gpus" },
        spec: {
          containers: [
            {
              name: "c",
              image: "registry.invalid/x",
              resources: { limits: { "nvidia.com/gpu": "9" } },
            },
          ],
        },
      },
    });
    const reason = await waitFor("scheduler verdict", async () => {
      const p = await core.readNamespacedPod({ name: "too-many-gpus", namespace });
      const cond = p.status?.conditions?.find((c) => c.type === "PodScheduled");
      return cond?.status === "False" ? cond : undefined;
    });
    expect(reason.reason).toBe("Unschedulable");
    expect(reason.message).toContain("nvidia.com/gpu");
  });

  it("enforces RBAC: a ServiceAccount gets only what its Role grants", async () => {
    await core.createNamespacedServiceAccount({
      namespace,
      body: { metadata: { name: "reader" } },
    });
    await rbac.createNamespacedRole({
      namespace,
      body: {
        metadata: { name: "pod-reader" },
        rules: [{ apiGroups: [""], resources: ["pods"], verbs: ["get", "list"] }],
      },
    });
    await rbac.createNamespacedRoleBinding({
      namespace,
      body: {
        metadata: { name: "reader-pods" },
        roleRef: { apiGroup: "rbac.authorization.k8s.io", kind: "Role", name: "pod-reader" },
        subjects: [{ kind: "ServiceAccount", name: "reader", namespace }],
      },
    });
    const tokenRequest = await core.createNamespacedServiceAccountToken({
      name: "reader",
      namespace,
      body: { spec: { audiences: [], expirationSeconds: 600 } },
    });
    const token = tokenRequest.status?.token;
    expect(token).toBeTruthy();
    const asReader = tokenKubeConfig(token!, "reader");
    const readerCore = asReader.makeApiClient(CoreV1Api);
    const readerApps = asReader.makeApiClient(AppsV1Api);

    const pods = await readerCore.listNamespacedPod({ namespace });
    expect(pods.items.length).toBeGreaterThan(0);

    const denied = [
      () => readerCore.listNamespacedSecret({ namespace }),
      () => readerCore.listNamespacedPod({ namespace: "kube-system" }),
      () => readerCore.deleteNamespacedPod({ name: "too-many-gpus", namespace }),
      () => readerApps.createNamespacedDeployment({ namespace, body: { metadata: { name: "x" } } }),
    ];
    for (const call of denied) {
      let status: number | undefined;
      try {
        await call();
      } catch (err) {
        status = statusOf(err);
      }
      expect(status).toBe(403);
    }
    // The pod the reader tried to delete is still there.
    await core.readNamespacedPod({ name: "too-many-gpus", namespace });
  });

  it("refuses an authenticated identity without any grants, and an unknown token", async () => {
    let status: number | undefined;
    try {
      const kc2 = adminKubeConfig();
      kc2.loadFromFile(testEnv().kube.nobodyKubeconfig);
      await kc2.makeApiClient(CoreV1Api).listNamespacedPod({ namespace });
    } catch (err) {
      status = statusOf(err);
    }
    expect(status).toBe(403);
    status = undefined;
    try {
      await tokenKubeConfig("not-a-token")
        .makeApiClient(CoreV1Api)
        .listNamespacedPod({ namespace });
    } catch (err) {
      status = statusOf(err);
    }
    expect(status).toBe(401);
  });
});
