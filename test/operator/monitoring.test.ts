// spec.monitoring.podMonitor against the real control plane: the operator (a process under
// the chart's ServiceAccount, so under the chart's RBAC) applies a PodMonitor of the
// Prometheus Operator's own CRD (fetched by test/env/crd.sh at the pinned version from the
// Go module proxy), reports a cluster without that CRD as Degraded while the model serves
// on, and deletes the PodMonitor when it is turned off.
import { CoreV1Api, CustomObjectsApi, RbacAuthorizationV1Api } from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KubeClient } from "../../src/operator/kube.ts";
import { kubectl } from "../support/cli.ts";
import { deleteCrd, fetchCrd, installCrd } from "../support/crd.ts";
import { adminKubeConfig, tokenKubeConfig, uniqueName, waitFor } from "../support/env.ts";
import {
  condition,
  getModel,
  model,
  operatorForNamespaces,
  type RunningOperator,
} from "../support/operator.ts";

const custom = adminKubeConfig().makeApiClient(CustomObjectsApi);
const G = { group: "expertmesh.io", version: "v1alpha1", plural: "deepseekmodels" };
const PM = { group: "monitoring.coreos.com", version: "v1", plural: "podmonitors" };
const CRD = "podmonitors.monitoring.coreos.com";

describe("PodMonitor (spec.monitoring.podMonitor)", () => {
  const ns = uniqueName("em-mon");
  const releaseNs = uniqueName("em-mon-system");
  const name = "mon";
  let op: RunningOperator;

  beforeAll(async () => {
    await fetchCrd("podmonitor"); // fetched now, not while the model waits
    // Whatever an earlier run left: this test starts from a cluster without the CRD.
    await deleteCrd(CRD, true);
    op = await operatorForNamespaces({
      release: "expertmesh-mon",
      releaseNs,
      identity: "op-mon",
      namespaces: [ns],
    });
  });

  afterAll(async () => {
    await op?.process.stop();
    await deleteCrd(CRD);
  });

  it("is Degraded without the CRD but serves; applies the PodMonitor once it exists; deletes it when off", async () => {
    await custom.createNamespacedCustomObject({
      ...G,
      namespace: ns,
      body: model(name, ns, {
        monitoring: { podMonitor: { enabled: true, interval: "20s", labels: { release: "kps" } } },
      }),
    });
    // No CRD: Degraded says why, and Ready is still the pods' (the model serves).
    let m = await waitFor(
      "Degraded PodMonitorCRDNotFound with Ready True",
      async () => {
        const got = await getModel(ns, name);
        return condition(got, "Degraded")?.reason === "PodMonitorCRDNotFound" &&
          condition(got, "Ready")?.status === "True"
          ? got
          : undefined;
      },
      90_000,
    );
    expect(condition(m, "Degraded")?.message).toMatch(/does not serve monitoring.coreos.com\/v1/);

    await installCrd("podmonitor");
    // The operator retries on its own, and the Prometheus Operator's schema accepts it.
    const pm = (await waitFor(
      "the PodMonitor",
      async () => {
        try {
          return await custom.getNamespacedCustomObject({ ...PM, namespace: ns, name });
        } catch {
          return undefined;
        }
      },
      60_000,
    )) as {
      metadata: { labels: Record<string, string>; ownerReferences: { name: string }[] };
      spec: Record<string, unknown>;
    };
    expect(pm.metadata.labels).toMatchObject({ release: "kps", "expertmesh.io/model": name });
    expect(pm.metadata.ownerReferences.map((o) => o.name)).toEqual([name]);
    expect(pm.spec).toMatchObject({
      selector: { matchLabels: { "expertmesh.io/model": name } },
      podTargetLabels: ["expertmesh.io/model", "app.kubernetes.io/component"],
      podMetricsEndpoints: [
        { port: "metrics", path: "/metrics", honorLabels: true, interval: "20s" },
      ],
    });
    // Its own selector finds the model's pods: the gateway and both shards.
    const selector = Object.entries(
      (pm.spec as { selector: { matchLabels: Record<string, string> } }).selector.matchLabels,
    )
      .map(([k, v]) => `${k}=${v}`)
      .join(",");
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
    expect(pods.stdout.trim().split(" ").sort()).toEqual(["gateway", "shard", "shard"]);
    m = await waitFor("Degraded False", async () => {
      const got = await getModel(ns, name);
      return condition(got, "Degraded")?.status === "False" ? got : undefined;
    });
    expect(condition(m, "Ready")?.status).toBe("True");

    // A policy refuses the PodMonitor (as an older chart's RBAC or a webhook could): that is
    // reported, the model serves on, and the rest of the spec still converges (a shard fewer).
    const policy = `${ns}-no-45s`;
    const vap = {
      apiVersion: "admissionregistration.k8s.io/v1",
      kind: "ValidatingAdmissionPolicy",
      metadata: { name: policy },
      spec: {
        failurePolicy: "Fail",
        matchConstraints: {
          resourceRules: [
            {
              apiGroups: ["monitoring.coreos.com"],
              apiVersions: ["v1"],
              operations: ["CREATE", "UPDATE"],
              resources: ["podmonitors"],
            },
          ],
        },
        validations: [
          {
            expression:
              "object.spec.podMetricsEndpoints.all(e, !has(e.interval) || e.interval != '45s')",
            message: "45s scrapes are not allowed here",
          },
        ],
      },
    };
    const binding = {
      apiVersion: "admissionregistration.k8s.io/v1",
      kind: "ValidatingAdmissionPolicyBinding",
      metadata: { name: policy },
      spec: {
        policyName: policy,
        validationActions: ["Deny"],
        matchResources: {
          namespaceSelector: { matchLabels: { "kubernetes.io/metadata.name": ns } },
        },
      },
    };
    try {
      for (const o of [vap, binding]) {
        const r = await kubectl(["apply", "--server-side", "-f", "-"], JSON.stringify(o));
        expect(r.code, r.stderr).toBe(0);
      }
      // In force once a PodMonitor of 45s is refused (policies load within a second or two).
      const probe = {
        apiVersion: "monitoring.coreos.com/v1",
        kind: "PodMonitor",
        metadata: { name: "probe", namespace: ns },
        spec: {
          selector: { matchLabels: { none: "none" } },
          podMetricsEndpoints: [{ port: "metrics", interval: "45s" }],
        },
      };
      await waitFor("the policy in force", async () => {
        const r = await kubectl(["apply", "--dry-run=server", "-f", "-"], JSON.stringify(probe));
        return r.code !== 0 && /45s scrapes are not allowed/.test(r.stderr) ? true : undefined;
      });
      await custom.patchNamespacedCustomObject({
        ...G,
        namespace: ns,
        name,
        body: [
          { op: "replace", path: "/spec/monitoring/podMonitor/interval", value: "45s" },
          { op: "replace", path: "/spec/experts/shards", value: 1 },
        ],
      });
      m = await waitFor(
        "Degraded PodMonitorApplyFailed, a shard fewer",
        async () => {
          const got = await getModel(ns, name);
          const shards = await kubectl(["get", "deployment", `${name}-shard-1`, "-n", ns]);
          return condition(got, "Degraded")?.reason === "PodMonitorApplyFailed" &&
            shards.code !== 0 &&
            /NotFound/.test(shards.stderr)
            ? got
            : undefined;
        },
        90_000,
      );
      expect(condition(m, "Degraded")?.message).toMatch(/45s scrapes are not allowed here/);
      await waitFor("Ready True with one shard", async () => {
        const got = await getModel(ns, name);
        return condition(got, "Ready")?.status === "True" ? true : undefined;
      });
    } finally {
      await kubectl(["delete", "validatingadmissionpolicybinding", policy, "--ignore-not-found"]);
      await kubectl(["delete", "validatingadmissionpolicy", policy, "--ignore-not-found"]);
    }

    // Turned off: deleted.
    await custom.patchNamespacedCustomObject({
      ...G,
      namespace: ns,
      name,
      body: [{ op: "replace", path: "/spec/monitoring/podMonitor/enabled", value: false }],
    });
    await waitFor("the PodMonitor deleted", async () => {
      try {
        await custom.getNamespacedCustomObject({ ...PM, namespace: ns, name });
        return undefined;
      } catch (err) {
        return (err as { code?: number }).code === 404 ? true : undefined;
      }
    });
  });

  it("under RBAC without podmonitors (an older chart), lists none and says so once per namespace", async () => {
    await installCrd("podmonitor");
    const admin = adminKubeConfig();
    const core = admin.makeApiClient(CoreV1Api);
    const rbac = admin.makeApiClient(RbacAuthorizationV1Api);
    const oldNs = uniqueName("em-mon-old");
    const sa = "old-operator";
    await core.createNamespace({ body: { metadata: { name: oldNs } } });
    try {
      await core.createNamespacedServiceAccount({
        namespace: oldNs,
        body: { metadata: { name: sa } },
      });
      // What the operator's Role granted before PodMonitors: the kinds it made then.
      await rbac.createNamespacedRole({
        namespace: oldNs,
        body: {
          metadata: { name: sa },
          rules: [
            { apiGroups: [""], resources: ["configmaps", "services"], verbs: ["list"] },
            { apiGroups: ["apps"], resources: ["deployments"], verbs: ["list"] },
            { apiGroups: ["policy"], resources: ["poddisruptionbudgets"], verbs: ["list"] },
          ],
        },
      });
      await rbac.createNamespacedRoleBinding({
        namespace: oldNs,
        body: {
          metadata: { name: sa },
          roleRef: { apiGroup: "rbac.authorization.k8s.io", kind: "Role", name: sa },
          subjects: [{ kind: "ServiceAccount", name: sa, namespace: oldNs }],
        },
      });
      const token = await core.createNamespacedServiceAccountToken({
        name: sa,
        namespace: oldNs,
        body: { spec: { audiences: [], expirationSeconds: 600 } },
      });
      const said: string[] = [];
      const kube = new KubeClient(tokenKubeConfig(token.status!.token!), "op-old", (m) =>
        said.push(m),
      );
      const owned = await waitFor("RBAC in force", async () => {
        try {
          return await kube.listOwned(oldNs, name);
        } catch {
          return undefined; // the binding not yet seen by the authorizer
        }
      });
      expect(owned).toEqual([]);
      await kube.listOwned(oldNs, name);
      // Once per kind it may not list (NetworkPolicies came after PodMonitors, the claims it
      // makes after both).
      expect(said).toHaveLength(3);
      for (const [i, kind] of ["NetworkPolicy", "PersistentVolumeClaim", "PodMonitor"].entries())
        expect(said.toSorted()[i]).toMatch(
          new RegExp(
            `cannot list ${kind} objects in ${oldNs} \\(403 Forbidden\\).*upgrade the chart`,
          ),
        );
      // A kind it must see, forbidden, is an error (not an empty list).
      await rbac.deleteNamespacedRole({ namespace: oldNs, name: sa });
      await waitFor("the Role's removal in force", async () =>
        kube.listOwned(oldNs, name).then(
          () => undefined,
          (err: { code?: number }) => (err.code === 403 ? true : undefined),
        ),
      );
    } finally {
      await core.deleteNamespace({ name: oldNs });
    }
  });
});
