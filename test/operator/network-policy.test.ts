// spec.networkPolicy against the real control plane: the operator (a process under the
// chart's ServiceAccount, so under the chart's RBAC) applies a NetworkPolicy per role whose
// selector names exactly that role's pods, reports a peer the API server refuses as Degraded
// while the model serves on, and deletes the policies when it is turned off. No CNI runs
// here to enforce them: what is checked is what they say and whom they select.
import { CustomObjectsApi, NetworkingV1Api, type V1NetworkPolicy } from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { kubectl } from "../support/cli.ts";
import { adminKubeConfig, uniqueName, waitFor } from "../support/env.ts";
import {
  condition,
  getModel,
  model,
  operatorForNamespaces,
  type RunningOperator,
} from "../support/operator.ts";

const kc = adminKubeConfig();
const custom = kc.makeApiClient(CustomObjectsApi);
const networking = kc.makeApiClient(NetworkingV1Api);
const G = { group: "expertmesh.io", version: "v1alpha1", plural: "deepseekmodels" };

/** Applies JSON Patch `ops` to the model `name` in `ns`. */
function patchModel(ns: string, name: string, ops: object[]) {
  return custom.patchNamespacedCustomObject({ ...G, namespace: ns, name, body: ops });
}

/** The components of the pods in `ns` that `policy`'s podSelector (matchLabels) selects. */
async function selectedComponents(ns: string, policy: V1NetworkPolicy): Promise<string[]> {
  const selector = Object.entries(policy.spec?.podSelector?.matchLabels ?? {})
    .map(([k, v]) => `${k}=${v}`)
    .join(",");
  expect(selector).not.toBe("");
  const pods = await kubectl([
    "get",
    "pods",
    "-n",
    ns,
    "-l",
    selector,
    "-o",
    "jsonpath={.items[*].metadata.labels.app\\.kubernetes\\.io/component}",
  ]);
  return pods.stdout.trim().split(" ").sort();
}

describe("NetworkPolicies (spec.networkPolicy)", () => {
  const ns = uniqueName("em-netpol");
  const releaseNs = uniqueName("em-netpol-system");
  const name = "np";
  let op: RunningOperator;

  beforeAll(async () => {
    op = await operatorForNamespaces({
      release: "expertmesh-netpol",
      releaseNs,
      identity: "op-netpol",
      namespaces: [ns],
    });
  });

  afterAll(async () => {
    await op?.process.stop();
  });

  it("selects each role's pods and admits what the spec says; a refused peer is Degraded while serving; off deletes them", async () => {
    const prometheus = {
      namespaceSelector: { matchLabels: { "kubernetes.io/metadata.name": "monitoring" } },
      podSelector: { matchLabels: { "app.kubernetes.io/name": "prometheus" } },
    };
    await custom.createNamespacedCustomObject({
      ...G,
      namespace: ns,
      body: model(name, ns, {
        gateway: { disaggregation: { replicas: 1 }, kvCache: { remoteBytes: 2 ** 30 } },
        networkPolicy: { enabled: true, metricsFrom: [prometheus] },
      }),
    });
    const policies = await waitFor(
      "three NetworkPolicies, and the pods of every role",
      async () => {
        const list = (await networking.listNamespacedNetworkPolicy({ namespace: ns })).items;
        const pods = await kubectl(["get", "pods", "-n", ns, "-o", "name"]);
        return list.length === 3 && pods.stdout.trim().split("\n").length === 4
          ? new Map(list.map((p) => [p.metadata!.name!, p]))
          : undefined;
      },
      90_000,
    );
    expect([...policies.keys()].sort()).toEqual([
      `${name}-gateway`,
      `${name}-prefill`,
      `${name}-shard`,
    ]);
    for (const [policyName, p] of policies) {
      expect(
        p.metadata?.ownerReferences?.map((o) => o.name),
        policyName,
      ).toEqual([name]);
      expect(p.spec?.policyTypes).toEqual(["Ingress"]);
    }
    // Whom each selects, among the model's real pods (a gateway, a prefill gateway, 2 shards).
    expect(await selectedComponents(ns, policies.get(`${name}-gateway`)!)).toEqual(["gateway"]);
    expect(await selectedComponents(ns, policies.get(`${name}-prefill`)!)).toEqual(["prefill"]);
    expect(await selectedComponents(ns, policies.get(`${name}-shard`)!)).toEqual([
      "shard",
      "shard",
    ]);
    // The gateway: its API ports from anyone (gatewayFrom absent), metrics from Prometheus.
    expect(policies.get(`${name}-gateway`)!.spec?.ingress).toEqual([
      {
        ports: [
          { port: "http", protocol: "TCP" },
          { port: "grpc", protocol: "TCP" },
        ],
      },
      { ports: [{ port: "metrics", protocol: "TCP" }], _from: [prometheus] },
    ]);
    // Shards and prefill gateways: their metrics port only.
    for (const role of ["shard", "prefill"])
      expect(policies.get(`${name}-${role}`)!.spec?.ingress, role).toEqual([
        { ports: [{ port: "metrics", protocol: "TCP" }], _from: [prometheus] },
      ]);

    // A peer the API server refuses (the CRD cannot say an except must lie inside its
    // cidr): reported, and the model serves on.
    await patchModel(ns, name, [
      {
        op: "add",
        path: "/spec/networkPolicy/gatewayFrom",
        value: [{ ipBlock: { cidr: "10.0.0.0/8", except: ["11.0.0.0/16"] } }],
      },
    ]);
    const m = await waitFor(
      "Degraded NetworkPolicyApplyFailed with Ready True",
      async () => {
        const got = await getModel(ns, name);
        return condition(got, "Degraded")?.reason === "NetworkPolicyApplyFailed" &&
          condition(got, "Ready")?.status === "True"
          ? got
          : undefined;
      },
      60_000,
    );
    expect(condition(m, "Degraded")?.message).toMatch(
      new RegExp(`^NetworkPolicy ${ns}/${name}-gateway \\(spec\\.networkPolicy\\): .*cidr`),
    );
    // Fixed: applied (only those addresses reach the API ports), and no longer Degraded.
    await patchModel(ns, name, [
      {
        op: "replace",
        path: "/spec/networkPolicy/gatewayFrom",
        value: [{ ipBlock: { cidr: "10.0.0.0/8", except: ["10.1.0.0/16"] } }],
      },
    ]);
    await waitFor("the gateway's API ports for 10.0.0.0/8 only, Degraded False", async () => {
      const got = await getModel(ns, name);
      const p = await networking.readNamespacedNetworkPolicy({
        name: `${name}-gateway`,
        namespace: ns,
      });
      return condition(got, "Degraded")?.status === "False" &&
        JSON.stringify(p.spec?.ingress?.[0]?._from) ===
          JSON.stringify([{ ipBlock: { cidr: "10.0.0.0/8", except: ["10.1.0.0/16"] } }])
        ? true
        : undefined;
    });

    // Egress too: every policy restricts what its pods connect to, as the API server takes it.
    const natsTo = [
      { namespaceSelector: { matchLabels: { "kubernetes.io/metadata.name": "nats" } } },
    ];
    await patchModel(ns, name, [
      {
        op: "add",
        path: "/spec/networkPolicy/egress",
        value: { enabled: true, natsTo, extraRules: [{ ports: [{ port: 3128 }] }] },
      },
    ]);
    const egress = await waitFor("Ingress and Egress in every policy", async () => {
      const list = (await networking.listNamespacedNetworkPolicy({ namespace: ns })).items;
      return list.length === 3 && list.every((p) => p.spec?.policyTypes?.includes("Egress"))
        ? new Map(list.map((p) => [p.metadata!.name!, p.spec!.egress]))
        : undefined;
    });
    const dns = {
      ports: [
        { port: 53, protocol: "UDP" },
        { port: 53, protocol: "TCP" },
      ],
    };
    const nats = { ports: [{ port: 4222, protocol: "TCP" }], to: natsTo };
    const proxy = { ports: [{ port: 3128, protocol: "TCP" }] };
    for (const role of ["gateway", "prefill", "shard"])
      expect(egress.get(`${name}-${role}`), role).toEqual([dns, nats, proxy]);
    expect(condition(await getModel(ns, name), "Degraded")?.status).toBe("False");

    // Off: deleted.
    await patchModel(ns, name, [
      { op: "replace", path: "/spec/networkPolicy/enabled", value: false },
    ]);
    await waitFor("no NetworkPolicy left", async () =>
      (await networking.listNamespacedNetworkPolicy({ namespace: ns })).items.length === 0
        ? true
        : undefined,
    );
  });
});
