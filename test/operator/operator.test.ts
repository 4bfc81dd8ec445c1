// The operator against the real control plane (kube-apiserver + etcd + controller-manager
// + scheduler + kwok GPU nodes), running as a separate process under the Helm chart's
// RBAC identity, never as admin.
import { mkdtempSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  CoordinationV1Api,
  CoreV1Api,
  type CoreV1Event,
  CustomObjectsApi,
  StorageV1Api,
} from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { quantityValue } from "../../src/api/quantity.ts";
import { CROSS_FIELD_RULES } from "../../src/api/rules.ts";
import type { DeepSeekModel } from "../../src/api/schema.ts";
import { fakeGpuNode } from "../env/cluster.ts";
import { startNats } from "../env/nats.ts";
import { makeNatsPki } from "../env/pki.ts";
import { kubectl } from "../support/cli.ts";
import {
  adminKubeConfig,
  startNatsWithoutJetStream,
  testEnv,
  uniqueName,
  waitFor,
} from "../support/env.ts";
import {
  createWeightsVolume,
  getModel,
  helmInstall,
  model,
  ownedDeployments,
  type RunningOperator,
  serviceAccountKubeconfig,
  startOperator,
  waitForLeadership,
} from "../support/operator.ts";

const root = fileURLToPath(new URL("../../", import.meta.url));
const kc = adminKubeConfig();
const core = kc.makeApiClient(CoreV1Api);
const custom = kc.makeApiClient(CustomObjectsApi);
const coordination = kc.makeApiClient(CoordinationV1Api);
const storage = kc.makeApiClient(StorageV1Api);
const G = { group: "expertmesh.io", version: "v1alpha1", plural: "deepseekmodels" };

function condition(m: DeepSeekModel, type: string) {
  return m.status?.conditions?.find((c) => c.type === type);
}

async function waitForCondition(
  namespace: string,
  name: string,
  type: string,
  status: string,
  reason?: string,
  timeoutMs = 60_000,
) {
  return await waitFor(
    `${namespace}/${name} ${type}=${status}${reason ? ` (${reason})` : ""}`,
    async () => {
      const m = await getModel(namespace, name);
      const c = condition(m, type);
      return c?.status === status &&
        (!reason || c.reason === reason) &&
        m.status?.observedGeneration === m.metadata.generation
        ? m
        : undefined;
    },
    timeoutMs,
  );
}

/** Namespaces this file created; deleted at the end so their GPU pods free the nodes. */
const created: string[] = [];

async function newNamespace(prefix: string): Promise<string> {
  const ns = uniqueName(prefix);
  await core.createNamespace({ body: { metadata: { name: ns } } });
  created.push(ns);
  return ns;
}

afterAll(async () => {
  for (const ns of created) await core.deleteNamespace({ name: ns }).catch(() => {});
});

/** `kubectl patch dsm` with a merge patch of the spec, as a user would; it must succeed. */
async function patchSpec(namespace: string, name: string, spec: Record<string, unknown>) {
  const r = await kubectl([
    "patch",
    "dsm",
    name,
    "-n",
    namespace,
    "--type=merge",
    "-p",
    JSON.stringify({ spec }),
  ]);
  expect(r.code, r.stderr).toBe(0);
}

/**
 * A model `name` of one CPU shard and one CPU gateway in `ns` (its weights on a volume of
 * `mode`), Ready: its shard's pod.
 */
async function servingOneCpuShard(
  ns: string,
  name: string,
  mode: "ReadOnlyMany" | "ReadWriteOnce" = "ReadOnlyMany",
) {
  await createWeightsVolume(ns, "weights", mode);
  await custom.createNamespacedCustomObject({
    ...G,
    namespace: ns,
    body: model(name, ns, { experts: { shards: 1, gpusPerShard: 0 }, gateway: { gpus: 0 } }),
  });
  await waitForCondition(ns, name, "Ready", "True", "AllReplicasReady");
  const pods = await core.listNamespacedPod({
    namespace: ns,
    labelSelector: "app.kubernetes.io/component=shard",
  });
  expect(pods.items).toHaveLength(1);
  return pods.items[0]!;
}

/** The `--model=` argument of a Deployment's pods: which weights they load. */
const modelArg = (d: { spec?: { template: { spec?: { containers: { args?: string[] }[] } } } }) =>
  d.spec?.template.spec?.containers[0]?.args?.find((a) => a.startsWith("--model="));

describe.sequential("expertmesh operator", () => {
  const releaseNs = uniqueName("em-system");
  const operators: RunningOperator[] = [];
  let saKubeconfig = "";
  let leader: RunningOperator;

  beforeAll(async () => {
    await helmInstall("expertmesh", releaseNs);
    saKubeconfig = await serviceAccountKubeconfig(releaseNs, "expertmesh");
    leader = await startOperator({
      kubeconfig: saKubeconfig,
      identity: "op-a",
      leaseNamespace: releaseNs,
      args: ["--env-resync=1"],
    });
    operators.push(leader);
    await waitForLeadership(leader);
  });

  afterAll(async () => {
    for (const op of operators) await op.process.stop();
    await kubectl([
      "delete",
      "-f",
      `${root}examples/tiny.yaml`,
      "--ignore-not-found",
      "--wait=false",
    ]);
  });

  it("serves examples/tiny.yaml: Deployments, Service, GPU pods Running, status Ready", async () => {
    for (const f of ["examples/tiny-storage.yaml", "examples/tiny.yaml"]) {
      const r = await kubectl(["apply", "-f", `${root}${f}`]);
      expect(r.code, r.stderr).toBe(0);
    }
    const m = await waitForCondition(
      "default",
      "tiny",
      "Ready",
      "True",
      "AllReplicasReady",
      90_000,
    );
    expect(m.status?.gateways).toBe("1/1");
    expect(m.status?.shardPods).toBe("4/4");
    expect(m.status?.planVersion).toBe(1);
    expect(m.status?.endpoint).toBe("http://tiny.default.svc:8000/v1");

    const deployments = await ownedDeployments("default", "tiny");
    expect(deployments.map((d) => d.metadata?.name).sort()).toEqual([
      "tiny-gateway",
      "tiny-shard-0",
      "tiny-shard-1",
      "tiny-shard-2",
      "tiny-shard-3",
    ]);
    for (const d of deployments) {
      expect(d.metadata?.ownerReferences?.[0]).toMatchObject({
        kind: "DeepSeekModel",
        name: "tiny",
        controller: true,
      });
      expect(d.spec?.template.spec?.containers[0]?.resources?.limits?.["nvidia.com/gpu"]).toBe("1");
    }
    const svc = await core.readNamespacedService({ name: "tiny", namespace: "default" });
    expect(svc.spec?.ports?.map((p) => p.port)).toEqual([8000, 8001, 9090]);
    const plan = await core.readNamespacedConfigMap({ name: "tiny-plan", namespace: "default" });
    expect(JSON.parse(plan.data!["plan.json"]!).numShards).toBe(4);

    const pods = (
      await core.listNamespacedPod({
        namespace: "default",
        labelSelector: "expertmesh.io/model=tiny",
      })
    ).items;
    expect(pods).toHaveLength(5);
    for (const p of pods) {
      expect(p.status?.phase).toBe("Running");
      expect(testEnv().kube.nodeNames).toContain(p.spec?.nodeName);
    }

    const get = await kubectl(["get", "dsm", "tiny"]);
    expect(get.stdout).toMatch(/^NAME\s+READY\s+REASON\s+GATEWAYS\s+SHARDS\s+QUEUE\s+AGE$/m);
    expect(get.stdout).toMatch(/^tiny\s+True\s+AllReplicasReady\s+1\/1\s+4\/4\s+0\s+\S+$/m);
    const explain = await kubectl(["explain", "dsm.spec.experts"]);
    expect(explain.stdout).toContain("Expert shards: how the routed experts are spread over pods.");
    expect(explain.stdout).toMatch(/shards\s+<integer>\s+Expert shards: each holds a slice/);
    const describe = await kubectl(["describe", "dsm", "tiny"]);
    expect(describe.stdout).toMatch(
      /Normal\s+Created\s+\S+\s+expertmesh-operator\s+created Deployment\/tiny-shard-0/,
    );

    // The scale subresource: kubectl scale (or an HPA aimed at the model) sets the gateway's
    // replicas; its selector finds the gateway pods.
    const scaleTo = async (n: number) => {
      const r = await kubectl(["scale", "dsm", "tiny", `--replicas=${n}`]);
      expect(r.code, r.stderr).toBe(0);
      await waitFor(`${n} gateway pods ready`, async () =>
        (await getModel("default", "tiny")).status?.gateways === `${n}/${n}` ? true : undefined,
      );
    };
    await scaleTo(2);
    const scale = JSON.parse(
      (await kubectl(["get", "dsm", "tiny", "--subresource=scale", "-o", "json"])).stdout,
    );
    expect(scale).toMatchObject({ kind: "Scale", spec: { replicas: 2 }, status: { replicas: 2 } });
    const gatewayPods = await core.listNamespacedPod({
      namespace: "default",
      labelSelector: scale.status.selector,
    });
    expect(
      gatewayPods.items.map((p) => p.metadata?.labels?.["app.kubernetes.io/component"]),
    ).toEqual(["gateway", "gateway"]);
    await scaleTo(1);
  });

  it("rolls out spec edits: a gateway flag rolls the gateways alone; a new image rolls every Deployment; 4 -> 2 shards re-plans and deletes the extra ones; MTP drafts re-plan with the MTP layer", async () => {
    const patch = (spec: Record<string, unknown>) =>
      kubectl(["patch", "dsm", "tiny", "--type=merge", "-p", JSON.stringify({ spec })]);
    // A sampling default reaches the gateways' template alone: the shards' Deployments keep
    // theirs (and their generation), so their pods are not rolled (`up --watch` does the
    // same, ADR 0041).
    const shardsOf = async () =>
      (await ownedDeployments("default", "tiny"))
        .filter((d) => d.metadata?.name?.startsWith("tiny-shard-"))
        .map((d) => ({
          name: d.metadata?.name,
          generation: d.metadata?.generation,
          template: JSON.stringify(d.spec?.template),
        }))
        .sort((a, b) => String(a.name).localeCompare(String(b.name)));
    const shardsBefore = await shardsOf();
    expect(shardsBefore).toHaveLength(4);
    expect((await patch({ gateway: { sampling: { temperature: 0.25 } } })).code).toBe(0);
    await waitFor("the gateways' new sampling flag", async () => {
      const d = (await ownedDeployments("default", "tiny")).find(
        (x) => x.metadata?.name === "tiny-gateway",
      );
      const a = d?.spec?.template.spec?.containers[0]?.args ?? [];
      return a.includes('--override-generation-config={"temperature":0.25}') ? a : undefined;
    });
    expect(await shardsOf()).toEqual(shardsBefore);
    expect((await patch({ image: "expertmesh/expertmesh:0.2.0" })).code).toBe(0);
    await waitFor("new image everywhere", async () => {
      const ds = await ownedDeployments("default", "tiny");
      return ds.length === 5 &&
        ds.every(
          (d) => d.spec?.template.spec?.containers[0]?.image === "expertmesh/expertmesh:0.2.0",
        )
        ? ds
        : undefined;
    });
    expect((await patch({ experts: { shards: 2 } })).code).toBe(0);
    const m = await waitForCondition("default", "tiny", "Ready", "True", "AllReplicasReady");
    expect(m.status?.planVersion).toBe(2);
    expect(m.status?.shardPods).toBe("2/2");
    expect((await ownedDeployments("default", "tiny")).map((d) => d.metadata?.name).sort()).toEqual(
      ["tiny-gateway", "tiny-shard-0", "tiny-shard-1"],
    );
    const pdbs = await kubectl(["get", "pdb", "-l", "expertmesh.io/model=tiny", "-o", "name"]);
    expect(pdbs.stdout.trim().split("\n").sort()).toEqual([
      "poddisruptionbudget.policy/tiny-gateway",
      "poddisruptionbudget.policy/tiny-shard-0",
      "poddisruptionbudget.policy/tiny-shard-1",
    ]);
    const plan = await core.readNamespacedConfigMap({ name: "tiny-plan", namespace: "default" });
    expect(JSON.parse(plan.data!["plan.json"]!)).toMatchObject({ version: 2, numShards: 2 });
    const gw = (await ownedDeployments("default", "tiny")).find(
      (d) => d.metadata?.name === "tiny-gateway",
    )!;
    // Another shard count cannot switch live: the pods restart (their template names the shape).
    expect(gw.spec?.template.metadata?.annotations?.["expertmesh.io/plan-shape"]).toMatch(
      /^2x\d+\//,
    );
    // MTP drafts: the plan places the MTP layer's experts (layer 4 of tiny-v3) too, and the
    // gateway drafts with it.
    const mtp = { speculative: { method: "mtp" } };
    expect((await patch({ gateway: mtp })).code).toBe(0);
    const mtpPlan = await waitFor("a plan with the MTP layer", async () => {
      const cm = await core.readNamespacedConfigMap({ name: "tiny-plan", namespace: "default" });
      const p = JSON.parse(cm.data!["plan.json"]!);
      return p.version === 3 ? p : undefined;
    });
    expect(mtpPlan.moeLayers).toEqual([1, 2, 3, 4]);
    const args = await waitFor("the gateway's MTP flag", async () => {
      const d = (await ownedDeployments("default", "tiny")).find(
        (x) => x.metadata?.name === "tiny-gateway",
      );
      const a = d?.spec?.template.spec?.containers[0]?.args ?? [];
      return a.includes("--speculative-method=mtp") ? a : undefined;
    });
    expect(args).toContain("--speculative-tokens=1");
  });

  it("other weights with weightsRollout BlueGreen: the old shards are copied first, and the copies go once everything runs the new weights", async () => {
    const ns = await newNamespace("bluegreen");
    await createWeightsVolume(ns);
    // No GPUs: the copies would take a second set, which the file's other tests need.
    const spec = {
      experts: { shards: 2, gpusPerShard: 0, weightsRollout: "BlueGreen" },
      gateway: { gpus: 0 },
    };
    await custom.createNamespacedCustomObject({ ...G, namespace: ns, body: model("bg", ns, spec) });
    try {
      await waitForCondition(ns, "bg", "Ready", "True", "AllReplicasReady");
      expect(modelArg((await ownedDeployments(ns, "bg"))[0]!)).toBe("--model=/models");

      // The same claim, another folder: other weights of the same shape (no new plan).
      await patchSpec(ns, "bg", {
        model: { source: { pvc: { claimName: "weights", path: "r1" } } },
      });
      // Every Deployment ends on the new weights, the copies gone, the model ready.
      const final = await waitFor("the new weights everywhere, no copy left", async () => {
        const ds = await ownedDeployments(ns, "bg");
        return ds.length === 3 && ds.every((d) => modelArg(d) === "--model=/models/r1")
          ? ds
          : undefined;
      });
      expect(final.map((d) => d.metadata?.name).sort()).toEqual([
        "bg-gateway",
        "bg-shard-0",
        "bg-shard-1",
      ]);
      const m = await waitForCondition(ns, "bg", "Ready", "True", "AllReplicasReady");
      expect(m.status?.shardPods).toBe("2/2");
      expect(m.status?.planVersion).toBe(1);
      // The copies were made, then deleted (the order within: test/unit/weights-rollout.test.ts).
      const events = (
        await core.listNamespacedEvent({ namespace: ns, fieldSelector: "involvedObject.name=bg" })
      ).items;
      const message = (reason: string) => events.find((e) => e.reason === reason)?.message;
      expect(message("PreviousShardsCreated")).toContain("bg-shard-0-prev, bg-shard-1-prev");
      expect(message("WeightsRollingInPlace")).toBeUndefined(); // Rolling's warning
      expect(message("PreviousShardsDeleted")).toContain(
        "deleted bg-shard-0-prev, bg-shard-1-prev",
      );
    } finally {
      await kubectl(["delete", "dsm", "bg", "-n", ns, "--wait=false"]);
    }
  });

  it("other weights with weightsRollout Rolling (the default): a Warning Event says that old gateways fail requests meanwhile, once", async () => {
    const ns = await newNamespace("rolling");
    await createWeightsVolume(ns);
    const spec = { experts: { shards: 2, gpusPerShard: 0 }, gateway: { gpus: 0 } };
    await custom.createNamespacedCustomObject({ ...G, namespace: ns, body: model("rl", ns, spec) });
    const warnings = async () =>
      (
        await core.listNamespacedEvent({ namespace: ns, fieldSelector: "involvedObject.name=rl" })
      ).items.filter((e) => e.reason === "WeightsRollingInPlace");
    try {
      await waitForCondition(ns, "rl", "Ready", "True", "AllReplicasReady");
      // Another spec change of the same weights says nothing.
      await patchSpec(ns, "rl", { gateway: { gpus: 0, logRequests: true } });
      await waitFor("the gateway's new template", async () =>
        (await ownedDeployments(ns, "rl")).some((d) =>
          d.spec?.template.spec?.containers[0]?.args?.includes("--log-requests"),
        )
          ? true
          : undefined,
      );
      expect(await warnings()).toEqual([]);

      await patchSpec(ns, "rl", {
        model: { source: { pvc: { claimName: "weights", path: "r1" } } },
      });
      const [w] = await waitFor("Event WeightsRollingInPlace", async () => {
        const got = await warnings();
        return got.length > 0 ? got : undefined;
      });
      expect(w!.type).toBe("Warning");
      expect(w!.message).toBe(
        "spec.model.source names other weights and spec.experts.weightsRollout is Rolling: rl-shard-0, rl-shard-1 and the gateways roll at once, so an old gateway fails requests (EM_DISPATCH_UNAVAILABLE) from when one of its shards is replaced until the new gateways are ready; weightsRollout BlueGreen keeps the old weights' shards serving meanwhile (a second set of shard pods for a while)",
      );
      await waitFor("the new weights everywhere", async () =>
        (await ownedDeployments(ns, "rl")).every((d) => modelArg(d) === "--model=/models/r1")
          ? true
          : undefined,
      );
      await waitForCondition(ns, "rl", "Ready", "True", "AllReplicasReady");
      expect(await warnings()).toHaveLength(1);
    } finally {
      await kubectl(["delete", "dsm", "rl", "-n", ns, "--wait=false"]);
    }
  });

  it("GPUs counted as a MIG profile (spec.experts.gpuResource): the shard pods request it and run on the node that has it", async () => {
    // A node of its own whose GPUs are all MIG slices (the device plugin's mixed strategy):
    // no nvidia.com/gpu at all, two nvidia.com/mig-3g.71gb.
    const node = uniqueName("mig-gpu");
    const taint = { key: "expertmesh.io/test-node", value: node, effect: "NoSchedule" };
    const base = fakeGpuNode(node, 0);
    const capacity = { ...base.status!.capacity!, "nvidia.com/mig-3g.71gb": "2" };
    await core.createNode({
      body: {
        ...base,
        spec: { taints: [taint] },
        status: { ...base.status, capacity, allocatable: capacity },
      },
    });
    const ns = await newNamespace("mig");
    await createWeightsVolume(ns);
    try {
      await custom.createNamespacedCustomObject({
        ...G,
        namespace: ns,
        body: model("mig", ns, {
          experts: { shards: 2, gpusPerShard: 1, gpuResource: "nvidia.com/mig-3g.71gb" },
          gateway: { gpus: 0 },
          scheduling: {
            nodeSelector: { "kubernetes.io/hostname": node },
            tolerations: [{ ...taint, operator: "Equal" }],
          },
        }),
      });
      await waitForCondition(ns, "mig", "Ready", "True", "AllReplicasReady", 90_000);
      const shards = (await ownedDeployments(ns, "mig")).filter((d) =>
        d.metadata?.name?.includes("-shard-"),
      );
      expect(shards).toHaveLength(2);
      for (const d of shards) {
        const resources = d.spec?.template.spec?.containers[0]?.resources;
        expect(resources?.limits?.["nvidia.com/mig-3g.71gb"], d.metadata?.name).toBe("1");
        expect(resources?.requests?.["nvidia.com/mig-3g.71gb"], d.metadata?.name).toBe("1");
        expect(resources?.limits, d.metadata?.name).not.toHaveProperty("nvidia.com/gpu");
      }
      const pods = await core.listNamespacedPod({
        namespace: ns,
        labelSelector: "app.kubernetes.io/component=shard",
      });
      expect(pods.items.map((p) => p.spec?.nodeName)).toEqual([node, node]);
    } finally {
      await kubectl(["delete", "dsm", "mig", "-n", ns, "--wait=false"]);
      await core.deleteNode({ name: node }).catch(() => {});
    }
  });

  it("GPUs too small for a shard's experts (the nodes' GPU feature discovery labels): a Warning Event GPUMemoryShort, once", async () => {
    // A node whose GPUs are MIG slices of ~10 GB (nvidia.com/mig-1g.10gb.memory, in MiB, as
    // GPU feature discovery labels them), and DeepSeek-V2-Lite's bf16 experts on 2 shards:
    // ~13 GiB each, more than a slice holds. The pods run all the same (on fake nodes here;
    // on a GPU, what does not fit is copied per batch). A second node offers the resource
    // with room to spare, but the model's nodeSelector leaves it out: it is not counted.
    const node = uniqueName("small-mig");
    const other = uniqueName("other-mig");
    const resource = "nvidia.com/mig-1g.10gb";
    const taint = { key: "expertmesh.io/test-node", value: node, effect: "NoSchedule" };
    for (const [name, mib] of [
      [node, "9856"],
      [other, "200000"],
    ] as const) {
      const base = fakeGpuNode(name, 0);
      const capacity = { ...base.status!.capacity!, [resource]: "4" };
      await core.createNode({
        body: {
          ...base,
          metadata: {
            ...base.metadata,
            labels: { ...base.metadata!.labels, [`${resource}.memory`]: mib },
          },
          spec: { taints: [{ ...taint, value: name }] },
          status: { ...base.status, capacity, allocatable: capacity },
        },
      });
    }
    const ns = await newNamespace("gpumem");
    await createWeightsVolume(ns);
    try {
      await custom.createNamespacedCustomObject({
        ...G,
        namespace: ns,
        body: model("lite", ns, {
          model: { preset: "deepseek-v2-lite", source: { pvc: { claimName: "weights" } } },
          experts: { shards: 2, gpusPerShard: 1, gpuResource: resource },
          gateway: { gpus: 0, limits: { maxModelLen: 4096 } },
          scheduling: {
            nodeSelector: { "kubernetes.io/hostname": node },
            tolerations: [{ ...taint, operator: "Equal" }],
          },
        }),
      });
      const short = async () =>
        (
          await core.listNamespacedEvent({
            namespace: ns,
            fieldSelector: "involvedObject.name=lite",
          })
        ).items.filter((e) => e.reason === "GPUMemoryShort");
      const [event] = await waitFor("Event GPUMemoryShort", async () =>
        (await short()).length > 0 ? await short() : undefined,
      );
      expect(event!.type).toBe("Warning");
      expect(event!.message).toMatch(
        /^shard [01] keeps 1\d\.\d\d GiB of experts \(bf16\) on its GPU, plus ~2\.00 GiB for CUDA: more than one nvidia\.com\/mig-1g\.10gb holds on every node that offers it \(9\.63 GiB at most, nvidia\.com\/mig-1g\.10gb\.memory; 1 node\(s\)\); the experts that do not fit are copied to the GPU for every batch, at PCIe's speed: about \d shards \(spec\.experts\.shards, now 2\) would fit them; fp8 \(spec\.model\.dtype\) halves them$/,
      );
      // Said once for this spec, however often the model is reconciled meanwhile.
      await waitForCondition(ns, "lite", "Ready", "True", "AllReplicasReady", 90_000);
      expect(await short()).toHaveLength(1);
    } finally {
      await kubectl(["delete", "dsm", "lite", "-n", ns, "--wait=false"]);
      for (const name of [node, other]) await core.deleteNode({ name }).catch(() => {});
    }
  });

  it("GPU nodes without room: BlueGreen copies that cannot be scheduled are dropped, a surging rollout says how to roll in place, and rollingUpdate {maxSurge: 0, maxUnavailable: 1} does", async () => {
    // A node of its own, tainted so that no other test's pod lands there, holding exactly
    // the model's two 4-GPU shards: no room for copies, nor for one surge pod.
    const node = uniqueName("tight-gpu");
    const taint = { key: "expertmesh.io/test-node", value: node, effect: "NoSchedule" };
    await core.createNode({ body: { ...fakeGpuNode(node, 8), spec: { taints: [taint] } } });
    const ns = await newNamespace("tight");
    await createWeightsVolume(ns);
    const spec = {
      experts: { shards: 2, gpusPerShard: 4, weightsRollout: "BlueGreen", blueGreenWaitSeconds: 5 },
      gateway: { gpus: 0 },
      scheduling: {
        nodeSelector: { "kubernetes.io/hostname": node },
        tolerations: [{ ...taint, operator: "Equal" }],
      },
    };
    const events = async () =>
      (
        await core.listNamespacedEvent({
          namespace: ns,
          fieldSelector: "involvedObject.name=tight",
        })
      ).items;
    await custom.createNamespacedCustomObject({
      ...G,
      namespace: ns,
      body: model("tight", ns, spec),
    });
    try {
      await waitForCondition(ns, "tight", "Ready", "True", "AllReplicasReady", 90_000);

      // Other weights: the copies are made, cannot be scheduled, and the spec rolls without
      // them; the copies go at once (their pending pods would race the new shards for GPUs).
      await patchSpec(ns, "tight", {
        model: { source: { pvc: { claimName: "weights", path: "r1" } } },
      });
      // (Before the fallback the copies' pods are the unschedulable ones: no hint then.)
      const surgeHint =
        /tight-shard-[01]'s rollout waits until its surge pod fits: spec\.experts\.rollingUpdate \{maxSurge: 0, maxUnavailable: 1\} replaces the pods in place instead$/;
      await waitFor(
        "Degraded: Unschedulable, naming the surging rollout",
        async () => {
          const c = condition(await getModel(ns, "tight"), "Degraded");
          return c?.status === "True" && c.reason === "Unschedulable" && surgeHint.test(c.message)
            ? c
            : undefined;
        },
        90_000,
      );
      const byReason = async (reason: string) =>
        await waitFor(`Event ${reason}`, async () =>
          (await events()).find((e) => e.reason === reason),
        );
      expect((await byReason("PreviousShardsCreated")).message).toContain(
        "tight-shard-0-prev, tight-shard-1-prev",
      );
      // 4-GPU shards: the operator says that a shard process uses one of them.
      expect((await byReason("GPUsIdle")).message).toBe(
        "spec.experts.gpusPerShard is 4, but a shard process runs on one GPU (cuda:0): 3 of each shard pod's 4 stay idle; more shards of one GPU each put every GPU to work",
      );
      expect((await byReason("GPUsIdle")).type).toBe("Warning");
      const fallback = await byReason("PreviousShardsUnschedulable");
      expect(fallback.type).toBe("Warning");
      expect(fallback.message).toMatch(
        /Insufficient nvidia\.com\/gpu.*; for 5 s \(spec\.experts\.blueGreenWaitSeconds\): rolling to the new weights without them/,
      );
      // It waited for blueGreenWaitSeconds (a cluster autoscaler might have added a node);
      // Event times have one-second precision.
      const created = (await byReason("PreviousShardsCreated")).firstTimestamp!;
      expect(
        new Date(fallback.firstTimestamp!).getTime() - new Date(created).getTime(),
      ).toBeGreaterThanOrEqual(4_000);
      expect((await byReason("PreviousShardsDeleted")).message).toBe(
        "the copies cannot be scheduled and the new weights roll without them: deleted tight-shard-0-prev, tight-shard-1-prev",
      );
      await waitFor("no copy left", async () =>
        (await ownedDeployments(ns, "tight")).some((d) => d.metadata?.name?.endsWith("-prev"))
          ? undefined
          : true,
      );
      // The old shard pods serve on meanwhile: the rollout waits, it does not stop them.
      const shards = (await ownedDeployments(ns, "tight")).filter((d) =>
        d.metadata?.name?.includes("-shard-"),
      );
      for (const d of shards) expect(d.status?.availableReplicas, d.metadata?.name).toBe(1);

      // In place: an old pod stops, its GPUs go to the new one.
      await patchSpec(ns, "tight", {
        experts: { ...spec.experts, rollingUpdate: { maxSurge: 0, maxUnavailable: 1 } },
      });
      const m = await waitForCondition(ns, "tight", "Ready", "True", "AllReplicasReady", 90_000);
      expect(condition(m, "Degraded")?.status).toBe("False");
      expect(m.status?.shardPods).toBe("2/2");
      const final = await ownedDeployments(ns, "tight");
      expect(final.map((d) => d.metadata?.name).sort()).toEqual([
        "tight-gateway",
        "tight-shard-0",
        "tight-shard-1",
      ]);
      for (const d of final) {
        expect(modelArg(d), d.metadata?.name).toBe("--model=/models/r1");
        if (d.metadata?.name?.includes("-shard-"))
          expect(d.spec?.strategy?.rollingUpdate).toEqual({ maxSurge: 0, maxUnavailable: 1 });
        else expect(d.spec?.strategy?.rollingUpdate).toEqual({ maxSurge: 1, maxUnavailable: 0 });
      }
    } finally {
      await kubectl(["delete", "dsm", "tight", "-n", ns, "--wait=false"]);
      await core.deleteNode({ name: node }).catch(() => {});
    }
  });

  it("a container that keeps failing: Degraded names its pod, reason and the process's own error; a healthy replacement clears it", async () => {
    const ns = await newNamespace("crash");
    try {
      const shardPod = await servingOneCpuShard(ns, "crash");
      // What the kubelet reports for a shard that exits at start (kwok runs no container:
      // the test writes that status, as a kubelet would). The message is what the shard
      // writes to its termination log (test/unit/termination-log.test.ts).
      const error = "[EM_CKPT_READ] cannot read /models/model-00001-of-00002.safetensors: EIO";
      const container = shardPod!.spec!.containers[0]!;
      await core.replaceNamespacedPodStatus({
        name: shardPod!.metadata!.name!,
        namespace: ns,
        body: {
          ...shardPod!,
          status: {
            ...shardPod!.status,
            conditions: (shardPod!.status?.conditions ?? []).map((c) =>
              c.type === "Ready" || c.type === "ContainersReady" ? { ...c, status: "False" } : c,
            ),
            containerStatuses: [
              {
                name: container.name,
                image: container.image!,
                imageID: "",
                ready: false,
                restartCount: 5,
                state: { waiting: { reason: "CrashLoopBackOff", message: "back-off 2m40s" } },
                lastState: { terminated: { exitCode: 1, reason: "Error", message: error } },
              },
            ],
          },
        },
      });
      const m = await waitForCondition(ns, "crash", "Degraded", "True", "ContainerCrashing");
      expect(condition(m, "Degraded")!.message).toBe(
        `1 pod(s) cannot run, e.g. ${shardPod!.metadata!.name}: container shard CrashLoopBackOff, last exit 1: ${error} (5 restarts)`,
      );
      expect(condition(m, "Ready")).toMatchObject({ status: "False", reason: "ContainerCrashing" });
      // For alerts: the operator's /metrics has the conditions as status has them.
      const series = (condition: string, status: string, reason: string) =>
        `expertmesh_model_condition{namespace="${ns}",model="crash",condition="${condition}",status="${status}",reason="${reason}"}`;
      expect(await leader.metric(series("Ready", "False", "ContainerCrashing"))).toBe(1);
      expect(await leader.metric(series("Degraded", "True", "ContainerCrashing"))).toBe(1);
      const get = await kubectl(["get", "dsm", "crash", "-n", ns]);
      expect(get.stdout).toMatch(/^crash\s+False\s+ContainerCrashing\s+1\/1\s+0\/1\s/m);
      // The pod replaced (as after a fix): the problem goes with it.
      await core.deleteNamespacedPod({
        name: shardPod!.metadata!.name!,
        namespace: ns,
        gracePeriodSeconds: 0,
      });
      await waitForCondition(ns, "crash", "Degraded", "False", "AsExpected");
      await waitFor("the metric following status", async () =>
        (await leader.metric(series("Ready", "True", "AllReplicasReady"))) === 1 ? true : undefined,
      );
      expect(await leader.metric(series("Ready", "False", "ContainerCrashing"))).toBeUndefined();
      // A deleted model's series go.
      await kubectl(["delete", "dsm", "crash", "-n", ns, "--wait=true"]);
      await waitFor("the deleted model's series gone", async () =>
        (await leader.metric(series("Ready", "True", "AllReplicasReady"))) === undefined
          ? true
          : undefined,
      );
    } finally {
      await kubectl(["delete", "dsm", "crash", "-n", ns, "--wait=false", "--ignore-not-found"]);
    }
  });

  it("a pod that cannot mount its volumes: Degraded VolumeMountFailed in the Event's words; for the weights' ReadWriteOnce claim, what to change; once the kubelet pulls its image, no more", async () => {
    const ns = await newNamespace("mount");
    try {
      const shardPod = await servingOneCpuShard(ns, "mount", "ReadWriteOnce");
      const name = shardPod!.metadata!.name!;
      // What a shard pod on a second node looks like when the weights' ReadWriteOnce volume is
      // attached to the first: kwok attaches and mounts nothing, so the test writes what the
      // kubelet reports (scheduled 5 minutes ago, its container ContainerCreating) and the
      // attach/detach controller's Event, as they would.
      await core.replaceNamespacedPodStatus({
        name,
        namespace: ns,
        body: {
          ...shardPod!,
          status: {
            ...shardPod!.status,
            phase: "Pending",
            conditions: (shardPod!.status?.conditions ?? []).map((c) =>
              c.type === "PodScheduled"
                ? { ...c, lastTransitionTime: new Date(Date.now() - 300_000) }
                : c.type === "Ready" || c.type === "ContainersReady"
                  ? { ...c, status: "False" }
                  : c,
            ),
            containerStatuses: [
              {
                name: "shard",
                image: shardPod!.spec!.containers[0]!.image!,
                imageID: "",
                ready: false,
                restartCount: 0,
                state: { waiting: { reason: "ContainerCreating" } },
              },
            ],
          },
        },
      });
      const why = `Multi-Attach error for volume "${ns}-weights" Volume is already used by pod(s) mount-gateway-0`;
      /** An Event about the shard pod, as its component would record it. */
      const podEvent = (e: Pick<CoreV1Event, "type" | "reason" | "message" | "count" | "source">) =>
        core.createNamespacedEvent({
          namespace: ns,
          body: {
            metadata: { generateName: `${name}.` },
            involvedObject: {
              kind: "Pod",
              apiVersion: "v1",
              namespace: ns,
              name,
              uid: shardPod!.metadata!.uid!,
            },
            firstTimestamp: new Date(),
            lastTimestamp: new Date(),
            ...e,
          },
        });
      await podEvent({
        type: "Warning",
        reason: "FailedAttachVolume",
        message: why,
        source: { component: "attachdetach-controller" },
        count: 4, // the controller says it again at each try
      });
      const m = await waitForCondition(ns, "mount", "Degraded", "True", "VolumeMountFailed");
      expect(condition(m, "Degraded")!.message).toBe(
        `1 pod(s) cannot mount their volumes, e.g. ${name} on ${shardPod!.spec!.nodeName}: FailedAttachVolume: ${why}; the weights' PersistentVolumeClaim ${ns}/weights (spec.model.source.pvc.claimName) is ReadWriteOnce: its volume attaches to one node at a time, and every pod of the model mounts it; give the weights a ReadOnlyMany or ReadWriteMany claim (examples/fetch-weights-job.yaml fills one), or keep every pod on one node (spec.scheduling.nodeSelector)`,
      );
      expect(condition(m, "Ready")).toMatchObject({ status: "False", reason: "VolumeMountFailed" });
      // The volume attached at last: the kubelet pulls the image (a long pull keeps the pod
      // ContainerCreating, the Warning fresh for minutes more): not a mount problem now.
      await podEvent({
        type: "Normal",
        reason: "Pulling",
        message: `Pulling image "${shardPod!.spec!.containers[0]!.image!}"`,
        source: { component: "kubelet" },
        count: 1,
      });
      await waitForCondition(ns, "mount", "Degraded", "False", "AsExpected");
    } finally {
      await kubectl(["delete", "dsm", "mount", "-n", ns, "--wait=false", "--ignore-not-found"]);
    }
  });

  it("restarts without duplicates or spurious updates (resourceVersions stay the same)", async () => {
    const snapshot = async () => {
      const objs = await Promise.all([
        kubectl([
          "get",
          "deploy,svc,cm,pdb,dsm",
          "-l",
          "expertmesh.io/model=tiny",
          "-o",
          'jsonpath={range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion}{"\\n"}{end}',
        ]),
        kubectl(["get", "dsm", "tiny", "-o", "jsonpath={.metadata.resourceVersion}"]),
      ]);
      return `${objs[0].stdout.trim().split("\n").sort().join("\n")}\ndsm=${objs[1].stdout}`;
    };
    await waitForCondition("default", "tiny", "Progressing", "False");
    const before = await snapshot();
    await leader.process.stop();
    leader = await startOperator({
      kubeconfig: saKubeconfig,
      identity: "op-a2",
      leaseNamespace: releaseNs,
      args: ["--env-resync=1"],
    });
    operators.push(leader);
    await waitForLeadership(leader, 20_000);
    await waitFor(
      "a reconcile of tiny by the new process",
      async () =>
        ((await leader.metric('expertmesh_operator_reconcile_total{result="success"}')) ?? 0) >=
          1 || undefined,
    );
    await new Promise((r) => setTimeout(r, 2000));
    expect(await snapshot()).toBe(before);
  });

  it("elects one leader: a standby does nothing until the leader dies, then takes over", async () => {
    const standby = await startOperator({
      kubeconfig: saKubeconfig,
      identity: "op-b",
      leaseNamespace: releaseNs,
      args: ["--env-resync=1"],
    });
    operators.push(standby);
    const ns = await newNamespace("leader");
    await createWeightsVolume(ns);
    await custom.createNamespacedCustomObject({ ...G, namespace: ns, body: model("m1", ns) });
    await waitForCondition(ns, "m1", "Ready", "True");
    expect(await standby.metric("expertmesh_operator_is_leader")).toBe(0);
    expect(
      await standby.metric('expertmesh_operator_reconcile_total{result="success"}'),
    ).toBeUndefined();
    const lease = await coordination.readNamespacedLease({
      name: "expertmesh-operator",
      namespace: releaseNs,
    });
    expect(lease.spec?.holderIdentity).toBe(leader.identity);

    leader.process.child.kill("SIGKILL"); // no release: the standby must wait for expiry
    await waitForLeadership(standby, 30_000);
    expect(await standby.metric("expertmesh_operator_is_leader")).toBe(1);
    const after = await coordination.readNamespacedLease({
      name: "expertmesh-operator",
      namespace: releaseNs,
    });
    expect(after.spec?.holderIdentity).toBe("op-b");
    expect(after.spec?.leaseTransitions).toBeGreaterThanOrEqual(1);
    await custom.createNamespacedCustomObject({ ...G, namespace: ns, body: model("m2", ns) });
    await waitForCondition(ns, "m2", "Ready", "True");
    leader = standby;
  });

  it("reports a NATS server without the JetStream the NATS prefix cache tier needs, and applies nothing until it has it", async () => {
    const ns = await newNamespace("nojs");
    await createWeightsVolume(ns);
    const plain = await startNatsWithoutJetStream("nats-server-nojs");
    try {
      await custom.createNamespacedCustomObject({
        ...G,
        namespace: ns,
        // No GPUs: the kwok nodes' GPUs are the later tests' (their pods stay until the end).
        body: model("nojs", ns, {
          nats: { url: plain.info.url },
          gateway: {
            gpus: 0,
            kvCache: { remoteBytes: 2 ** 30 },
            disaggregation: { replicas: 1 },
          },
          experts: { shards: 2, gpusPerShard: 0 },
        }),
      });
      const m = await waitForCondition(ns, "nojs", "Degraded", "True", "NATSJetStreamMissing");
      expect(condition(m, "Degraded")?.message).toContain(
        `the NATS server at ${plain.info.url} (spec.nats.url) has no JetStream`,
      );
      expect(condition(m, "Degraded")?.message).toContain("disaggregated prefill");
      expect(condition(m, "Ready")?.status).toBe("False");
      expect(await ownedDeployments(ns, "nojs")).toHaveLength(0);
      // A server with JetStream: applied, the prefill gateways' Deployment with the rest.
      await custom.patchNamespacedCustomObject({
        ...G,
        namespace: ns,
        name: "nojs",
        body: [{ op: "replace", path: "/spec/nats/url", value: testEnv().nats.url }],
      });
      await waitForCondition(ns, "nojs", "Ready", "True", undefined, 90_000);
      expect((await ownedDeployments(ns, "nojs")).map((d) => d.metadata?.name)).toContain(
        "nojs-prefill",
      );
    } finally {
      await plain.process.stop();
      await kubectl(["delete", "dsm", "nojs", "-n", ns, "--wait=false"]);
    }
  });

  it("NATS over TLS: spec.nats.tls's Secrets missing, without their key, holding no certificate or a CA that did not sign the server's are reported; the operator's own connection is mutual TLS; the pods get tls:// and the files", async () => {
    const ns = await newNamespace("natstls");
    await createWeightsVolume(ns);
    const dir = mkdtempSync(join(testEnv().runDir, "nats-tls-operator-"));
    const pki = makeNatsPki(dir);
    // A server that verifies clients and has no JetStream: the JetStream check can only say
    // so (NATSJetStreamMissing) once the operator connected with the CA and the client pair.
    const server = await startNats(
      testEnv().binaries.natsServer,
      dir,
      join(testEnv().runDir, "logs"),
      {
        name: "nats-mtls-operator",
        jetStream: false,
        tls: { ...pki.server, verifyClientsCa: pki.ca },
      },
    );
    const reason = async (want: string) =>
      condition(await waitForCondition(ns, "tls", "Degraded", "True", want), "Degraded")?.message;
    const replaceSecret = (name: string, stringData: Record<string, string>, type?: string) =>
      core.replaceNamespacedSecret({
        name,
        namespace: ns,
        body: { metadata: { name }, stringData, ...(type ? { type } : {}) },
      });
    try {
      await custom.createNamespacedCustomObject({
        ...G,
        namespace: ns,
        body: model("tls", ns, {
          nats: {
            url: server.info.url,
            tls: { caSecret: { name: "nats-ca" }, clientSecret: { name: "nats-client" } },
          },
          gateway: { gpus: 0, kvCache: { remoteBytes: 2 ** 30 } },
          experts: { shards: 2, gpusPerShard: 0 },
        }),
      });
      expect(await reason("SecretNotFound")).toContain(
        `Secret ${ns}/nats-ca (spec.nats.tls.caSecret) does not exist`,
      );
      const read = (p: string) => readFileSync(p, "utf8");
      await core.createNamespacedSecret({
        namespace: ns,
        body: {
          metadata: { name: "nats-client" },
          type: "kubernetes.io/tls",
          stringData: { "tls.crt": read(pki.client.cert), "tls.key": read(pki.client.key) },
        },
      });
      await core.createNamespacedSecret({
        namespace: ns,
        body: { metadata: { name: "nats-ca" }, stringData: { ca: read(pki.ca) } },
      });
      expect(await reason("SecretKeyMissing")).toBe(
        `Secret ${ns}/nats-ca (spec.nats.tls.caSecret) has no key ca.crt`,
      );
      await replaceSecret("nats-ca", { "ca.crt": "not a certificate" });
      expect(await reason("NATSTLSInvalid")).toMatch(
        new RegExp(
          `^Secret ${ns}/nats-ca's ca\\.crt \\(spec\\.nats\\.tls\\.caSecret\\) holds no PEM certificate`,
        ),
      );
      // A CA that did not sign the server's certificate: the operator's own handshake fails.
      await replaceSecret("nats-ca", { "ca.crt": read(pki.otherCa) });
      expect(await reason("NATSTLSFailed")).toMatch(
        new RegExp(
          `^the TLS handshake with the NATS server at ${server.info.url.replace(/[.]/g, "\\.")} \\(spec\\.nats\\.url\\) failed: the server's TLS certificate is not trusted`,
        ),
      );
      expect(await ownedDeployments(ns, "tls")).toHaveLength(0);
      await replaceSecret("nats-ca", { "ca.crt": read(pki.ca) });
      expect(await reason("NATSJetStreamMissing")).toContain(
        `the NATS server at ${server.info.url} (spec.nats.url) has no JetStream`,
      );
      expect(await ownedDeployments(ns, "tls")).toHaveLength(0);

      // Without the NATS tier, applied: every pod connects as tls:// with the mounted files.
      await custom.patchNamespacedCustomObject({
        ...G,
        namespace: ns,
        name: "tls",
        body: [{ op: "replace", path: "/spec/gateway/kvCache/remoteBytes", value: 0 }],
      });
      await waitForCondition(ns, "tls", "Ready", "True", undefined, 90_000);
      const deployments = await ownedDeployments(ns, "tls");
      expect(deployments).toHaveLength(3);
      for (const d of deployments) {
        const pod = d.spec!.template.spec!;
        expect(pod.containers[0]!.args, d.metadata?.name).toEqual(
          expect.arrayContaining([
            `--nats=${server.info.url.replace("nats://", "tls://")}`,
            "--nats-tls-ca=/var/run/expertmesh/nats-tls/ca/ca.crt",
            "--nats-tls-cert=/var/run/expertmesh/nats-tls/client/tls.crt",
            "--nats-tls-key=/var/run/expertmesh/nats-tls/client/tls.key",
          ]),
        );
        expect(pod.volumes?.filter((v) => v.name.startsWith("nats-tls"))).toEqual([
          { name: "nats-tls-ca", secret: { secretName: "nats-ca", defaultMode: 420 } },
          { name: "nats-tls-client", secret: { secretName: "nats-client", defaultMode: 420 } },
        ]);
      }
    } finally {
      await server.process.stop();
      await kubectl(["delete", "dsm", "tls", "-n", ns, "--wait=false"]);
    }
  });

  it("NATS user and password: spec.nats.userSecret missing, without its keys, with an empty or a wrong password is reported; the operator's own connection logs in; the pods get the files", async () => {
    const ns = await newNamespace("natsuser");
    await createWeightsVolume(ns);
    const dir = mkdtempSync(join(testEnv().runDir, "nats-user-operator-"));
    // A server that requires a user and has no JetStream: a wrong password is NATSAuthRefused,
    // and the JetStream check can only say NATSJetStreamMissing once the operator logged in.
    const server = await startNats(
      testEnv().binaries.natsServer,
      dir,
      join(testEnv().runDir, "logs"),
      {
        name: "nats-users-operator",
        jetStream: false,
        config: ['authorization { users = [ { user: expertmesh, password: "s3cret" } ] }'],
      },
    );
    const reason = async (want: string) =>
      condition(await waitForCondition(ns, "user", "Degraded", "True", want), "Degraded")?.message;
    const putSecret = (stringData: Record<string, string>, create = false) => {
      const body = {
        metadata: { name: "nats-user" },
        type: "kubernetes.io/basic-auth",
        stringData,
      };
      return create
        ? core.createNamespacedSecret({ namespace: ns, body })
        : core.replaceNamespacedSecret({ name: "nats-user", namespace: ns, body });
    };
    try {
      await custom.createNamespacedCustomObject({
        ...G,
        namespace: ns,
        body: model("user", ns, {
          nats: { url: server.info.url, userSecret: { name: "nats-user" } },
          gateway: { gpus: 0, kvCache: { remoteBytes: 2 ** 30 } },
          experts: { shards: 2, gpusPerShard: 0 },
        }),
      });
      expect(await reason("SecretNotFound")).toContain(
        `Secret ${ns}/nats-user (spec.nats.userSecret) does not exist`,
      );
      await putSecret({ username: "expertmesh" }, true);
      expect(await reason("SecretKeyMissing")).toBe(
        `Secret ${ns}/nats-user (spec.nats.userSecret) has no key password`,
      );
      await putSecret({ username: "expertmesh", password: "\n" });
      expect(await reason("NATSAuthInvalid")).toBe(
        `Secret ${ns}/nats-user's password (spec.nats.userSecret) is empty`,
      );
      await putSecret({ username: "expertmesh", password: "guess" });
      expect(await reason("NATSAuthRefused")).toBe(
        `the NATS server at ${server.info.url} (spec.nats.url) refused spec.nats's credentials (Authorization Violation): the pods could not connect; give the ones it knows`,
      );
      await putSecret({ username: "expertmesh", password: "s3cret\n" });
      expect(await reason("NATSJetStreamMissing")).toContain(
        `the NATS server at ${server.info.url} (spec.nats.url) has no JetStream`,
      );
      expect(await ownedDeployments(ns, "user")).toHaveLength(0);

      await custom.patchNamespacedCustomObject({
        ...G,
        namespace: ns,
        name: "user",
        body: [{ op: "replace", path: "/spec/gateway/kvCache/remoteBytes", value: 0 }],
      });
      await waitForCondition(ns, "user", "Ready", "True", undefined, 90_000);
      const deployments = await ownedDeployments(ns, "user");
      expect(deployments).toHaveLength(3);
      for (const d of deployments) {
        const pod = d.spec!.template.spec!;
        expect(pod.containers[0]!.args, d.metadata?.name).toEqual(
          expect.arrayContaining([
            `--nats=${server.info.url}`,
            "--nats-user-file=/var/run/expertmesh/nats-auth/user/username",
            "--nats-password-file=/var/run/expertmesh/nats-auth/user/password",
          ]),
        );
        expect(pod.volumes?.filter((v) => v.name === "nats-user")).toEqual([
          { name: "nats-user", secret: { secretName: "nats-user", defaultMode: 420 } },
        ]);
      }
    } finally {
      await server.process.stop();
      await kubectl(["delete", "dsm", "user", "-n", ns, "--wait=false"]);
    }
  });

  it("reports a missing PVC or Secret as Degraded with the reason, and recovers when created; makes the shared claims of a StorageClass", async () => {
    const ns = await newNamespace("deps");
    await custom.createNamespacedCustomObject({ ...G, namespace: ns, body: model("nopvc", ns) });
    let m = await waitForCondition(ns, "nopvc", "Degraded", "True", "PVCNotFound");
    expect(condition(m, "Degraded")?.message).toBe(
      `PersistentVolumeClaim ${ns}/weights (spec.model.source.pvc.claimName) does not exist`,
    );
    expect(condition(m, "Ready")?.status).toBe("False");
    expect(await ownedDeployments(ns, "nopvc")).toHaveLength(0);
    // A claim no volume comes for (its StorageClass does not exist): the pods wait, and the
    // model says why, from the claim's Warning Event.
    await core.createNamespacedPersistentVolumeClaim({
      namespace: ns,
      body: {
        metadata: { name: "weights" },
        spec: {
          accessModes: ["ReadOnlyMany"],
          storageClassName: `${ns}-gone`,
          resources: { requests: { storage: "1Gi" } },
        },
      },
    });
    m = await waitForCondition(ns, "nopvc", "Degraded", "True", "PVCPending");
    expect(condition(m, "Degraded")?.message).toMatch(
      new RegExp(
        `^PersistentVolumeClaim ${ns}/weights \\(spec\\.model\\.source\\.pvc\\.claimName\\) is Pending: ProvisioningFailed: .*"${ns}-gone" not found`,
      ),
    );
    await core.deleteNamespacedPersistentVolumeClaim({ namespace: ns, name: "weights" });
    await waitFor("the claim gone", async () =>
      core.readNamespacedPersistentVolumeClaim({ namespace: ns, name: "weights" }).then(
        () => undefined,
        () => true,
      ),
    );
    await createWeightsVolume(ns);
    m = await waitForCondition(ns, "nopvc", "Ready", "True", undefined, 90_000);
    expect(condition(m, "Degraded")?.status).toBe("False");

    const hf = {
      preset: "tiny-v2",
      source: { huggingFace: { repo: "expertmesh/tiny-v2", tokenSecret: { name: "hf-token" } } },
    };
    await custom.createNamespacedCustomObject({
      ...G,
      namespace: ns,
      body: model("nosecret", ns, { model: hf }),
    });
    m = await waitForCondition(ns, "nosecret", "Degraded", "True", "SecretNotFound");
    expect(condition(m, "Degraded")?.message).toContain(
      `Secret ${ns}/hf-token (spec.model.source.huggingFace.tokenSecret) does not exist`,
    );
    await core.createNamespacedSecret({
      namespace: ns,
      body: { metadata: { name: "hf-token" }, stringData: { token: "hf_x" } },
    });
    await waitForCondition(ns, "nosecret", "Ready", "True", undefined, 90_000);
    const gw = (await ownedDeployments(ns, "nosecret")).find(
      (d) => d.metadata?.name === "nosecret-gateway",
    )!;
    const init = gw.spec?.template.spec?.initContainers?.[0];
    expect(init?.name).toBe("download-weights");
    expect(init?.env?.find((e) => e.name === "HF_TOKEN")?.valueFrom?.secretKeyRef).toEqual({
      name: "hf-token",
      key: "token",
    });
    const events = await kubectl(["describe", "dsm", "nosecret", "-n", ns]);
    expect(events.stdout).toMatch(/Warning\s+SecretNotFound/);
    expect(events.stdout).toMatch(/Normal\s+Recovered/);

    // The gateway's API keys: a Secret that must exist, holding a key, mounted as the file the
    // gateway reads again when it changes (keys rotate without a restart).
    await custom.createNamespacedCustomObject({
      ...G,
      namespace: ns,
      body: model("nokeys", ns, { gateway: { apiKeySecret: { name: "gw-keys", key: "keys" } } }),
    });
    m = await waitForCondition(ns, "nokeys", "Degraded", "True", "SecretNotFound");
    expect(condition(m, "Degraded")?.message).toContain(
      `Secret ${ns}/gw-keys (spec.gateway.apiKeySecret) does not exist`,
    );
    // There, but without the key the gateway reads: its container would not start.
    await core.createNamespacedSecret({
      namespace: ns,
      body: { metadata: { name: "gw-keys" }, stringData: { key: "k1,k2" } },
    });
    m = await waitForCondition(ns, "nokeys", "Degraded", "True", "SecretKeyMissing");
    expect(condition(m, "Degraded")?.message).toContain(
      `Secret ${ns}/gw-keys (spec.gateway.apiKeySecret) has no key keys`,
    );
    expect(await ownedDeployments(ns, "nokeys")).toHaveLength(0);
    // The key, holding no key: every gateway would refuse to start rather than serve open.
    await core.replaceNamespacedSecret({
      name: "gw-keys",
      namespace: ns,
      body: { metadata: { name: "gw-keys" }, stringData: { keys: " ,\n" } },
    });
    m = await waitForCondition(ns, "nokeys", "Degraded", "True", "GatewayAPIKeysInvalid");
    expect(condition(m, "Degraded")?.message).toContain(
      `Secret ${ns}/gw-keys's keys (spec.gateway.apiKeySecret) holds no API key`,
    );
    expect(await ownedDeployments(ns, "nokeys")).toHaveLength(0);
    await core.replaceNamespacedSecret({
      name: "gw-keys",
      namespace: ns,
      body: { metadata: { name: "gw-keys" }, stringData: { keys: "k1,k2" } },
    });
    await waitForCondition(ns, "nokeys", "Ready", "True", undefined, 90_000);
    const keyed = (await ownedDeployments(ns, "nokeys")).find(
      (d) => d.metadata?.name === "nokeys-gateway",
    )!;
    const keyedPod = keyed.spec?.template.spec;
    expect(keyedPod?.volumes).toContainEqual({
      name: "gateway-api-keys",
      // (the API server adds defaultMode)
      secret: expect.objectContaining({
        secretName: "gw-keys",
        items: [{ key: "keys", path: "keys" }],
      }),
    });
    expect(keyedPod?.containers[0]?.args).toContain(
      "--api-keys-file=/var/run/expertmesh/gateway-api-keys/keys",
    );
    expect(JSON.stringify(keyedPod?.containers[0]?.env ?? [])).not.toContain("gw-keys");

    // A disk tier the gateways share, and the batches' folder: their ReadWriteMany claims
    // must exist too (else the pods would wait for them, unsaid).
    await custom.createNamespacedCustomObject({
      ...G,
      namespace: ns,
      body: model("noshared", ns, {
        gateway: {
          kvCache: { diskBytes: 2 ** 20, diskSharedClaim: "prefix-rwx" },
          batch: { sharedClaim: "batch-rwx" },
        },
      }),
    });
    const missing = (claim: string, field: string) =>
      `PersistentVolumeClaim ${ns}/${claim} (${field}) does not exist`;
    m = await waitForCondition(ns, "noshared", "Degraded", "True", "PVCNotFound");
    expect(condition(m, "Degraded")?.message).toBe(
      `${missing("prefix-rwx", "spec.gateway.kvCache.diskSharedClaim")}; ${missing("batch-rwx", "spec.gateway.batch.sharedClaim")}`,
    );
    await createWeightsVolume(ns, "prefix-rwx", "ReadWriteMany");
    await waitFor("only the batches' claim missing", async () => {
      const now = await getModel(ns, "noshared");
      return condition(now, "Degraded")?.message ===
        missing("batch-rwx", "spec.gateway.batch.sharedClaim")
        ? true
        : undefined;
    });
    await createWeightsVolume(ns, "batch-rwx", "ReadWriteMany");
    await waitForCondition(ns, "noshared", "Ready", "True", undefined, 90_000);
    const sharing = (await ownedDeployments(ns, "noshared")).find(
      (d) => d.metadata?.name === "noshared-gateway",
    )!;
    expect(sharing.spec?.template.spec?.volumes).toEqual(
      expect.arrayContaining([
        expect.objectContaining({
          name: "prefix-cache",
          persistentVolumeClaim: { claimName: "prefix-rwx" },
        }),
        expect.objectContaining({
          name: "batch",
          persistentVolumeClaim: { claimName: "batch-rwx" },
        }),
      ]),
    );
    // A claim of one node at a time, for two gateways: said (Degraded), the model serving on.
    // For one gateway it is enough.
    await createWeightsVolume(ns, "prefix-rwo", "ReadWriteOnce");
    const rwo = (name: string, replicas: number) =>
      custom.createNamespacedCustomObject({
        ...G,
        namespace: ns,
        body: model(name, ns, {
          gateway: { replicas, kvCache: { diskBytes: 2 ** 20, diskSharedClaim: "prefix-rwo" } },
        }),
      });
    await rwo("rwo", 2);
    await rwo("rwo-one", 1);
    m = await waitForCondition(ns, "rwo-one", "Ready", "True", undefined, 90_000);
    expect(condition(m, "Degraded")?.status).toBe("False");
    m = await waitForCondition(ns, "rwo", "Ready", "True", undefined, 90_000);
    expect(condition(m, "Degraded")).toMatchObject({
      status: "True",
      reason: "SharedPVCNotReadWriteMany",
      message: `PersistentVolumeClaim ${ns}/prefix-rwo (spec.gateway.kvCache.diskSharedClaim) is ReadWriteOnce, not ReadWriteMany: gateway pods on other nodes cannot mount it`,
    });

    // The batches' claim of a StorageClass instead: the operator makes it (here bound to a
    // volume made beforehand: no provisioner runs here), owned by the model; a size the
    // class cannot grow to is said, the gateways serving on; without it, it is deleted.
    const sc = `${ns}-rwx`;
    await storage.createStorageClass({
      body: {
        metadata: { name: sc },
        provisioner: "kubernetes.io/no-provisioner",
        volumeBindingMode: "Immediate",
        allowVolumeExpansion: false,
      },
    });
    await core.createPersistentVolume({
      body: {
        metadata: { name: `${ns}-made` },
        spec: {
          capacity: { storage: "1Gi" },
          accessModes: ["ReadWriteMany"],
          storageClassName: sc,
          hostPath: { path: `/tmp/${ns}-made` },
        },
      },
    });
    await patchSpec(ns, "noshared", {
      gateway: { batch: { sharedClaim: null, sharedStorageClassName: sc, storageBytes: 2 ** 28 } },
    });
    const claim = await waitFor("the batches' claim made and bound", async () => {
      const c = await core
        .readNamespacedPersistentVolumeClaim({ namespace: ns, name: "noshared-batch" })
        .catch(() => undefined);
      return c?.status?.phase === "Bound" ? c : undefined;
    });
    const owner = await getModel(ns, "noshared");
    expect(claim.metadata?.ownerReferences).toEqual([
      expect.objectContaining({ kind: "DeepSeekModel", name: "noshared", uid: owner.metadata.uid }),
    ]);
    expect(claim.spec).toMatchObject({
      accessModes: ["ReadWriteMany"],
      storageClassName: sc,
      volumeName: `${ns}-made`,
    });
    // storageBytes, 5% and 64 MiB (as the API server writes the quantity)
    expect(quantityValue(claim.spec!.resources!.requests!["storage"]!)).toBe(
      2 ** 28 + Math.ceil(2 ** 28 / 20) + 2 ** 26,
    );
    await waitFor("the gateways on the made claim", async () => {
      const d = (await ownedDeployments(ns, "noshared")).find(
        (x) => x.metadata?.name === "noshared-gateway",
      );
      return d?.spec?.template.spec?.volumes?.some(
        (v) => v.persistentVolumeClaim?.claimName === "noshared-batch",
      )
        ? true
        : undefined;
    });
    await waitForCondition(ns, "noshared", "Ready", "True", undefined, 90_000);
    await patchSpec(ns, "noshared", { gateway: { batch: { storageBytes: 2 ** 29 } } });
    m = await waitForCondition(ns, "noshared", "Degraded", "True", "SharedPVCApplyFailed");
    expect(condition(m, "Degraded")?.message).toMatch(
      new RegExp(
        `^PersistentVolumeClaim ${ns}/noshared-batch \\(spec\\.gateway\\.batch\\.sharedStorageClassName\\): .*must support resize$`,
      ),
    );
    // (the claim as it was; the gateways roll to the new budget all the same)
    expect(
      (await core.readNamespacedPersistentVolumeClaim({ namespace: ns, name: "noshared-batch" }))
        .spec?.resources?.requests?.["storage"],
    ).toBe(claim.spec!.resources!.requests!["storage"]);
    await patchSpec(ns, "noshared", { gateway: { batch: { sharedStorageClassName: null } } });
    await waitFor("the made claim deleted once no spec asks for it", async () => {
      const c = await core
        .readNamespacedPersistentVolumeClaim({ namespace: ns, name: "noshared-batch" })
        .catch(() => null);
      return c === null || c.metadata?.deletionTimestamp !== undefined ? true : undefined;
    });
    m = await waitForCondition(ns, "noshared", "Degraded", "False");
    await storage.deleteStorageClass({ name: sc });

    // The disk tier's claim of a class that does not exist: the claim waits for a volume,
    // and the model says why (the volume controller's Warning), first.
    await patchSpec(ns, "noshared", {
      gateway: { kvCache: { diskSharedClaim: null, diskSharedStorageClassName: `${ns}-none` } },
    });
    m = await waitForCondition(ns, "noshared", "Degraded", "True", "PVCPending");
    expect(condition(m, "Degraded")?.message).toMatch(
      new RegExp(
        `^PersistentVolumeClaim ${ns}/noshared-prefix-cache \\(spec\\.gateway\\.kvCache\\.diskSharedStorageClassName, StorageClass ${ns}-none\\) is Pending: ProvisioningFailed: .*"${ns}-none" not found`,
      ),
    );
    expect(condition(m, "Ready")?.reason).toBe("PVCPending");
    // Back to the claim of the user's: the one made goes, and so does the problem.
    await patchSpec(ns, "noshared", {
      gateway: { kvCache: { diskSharedStorageClassName: null, diskSharedClaim: "prefix-rwx" } },
    });
    await waitFor("the made claim deleted", async () => {
      const c = await core
        .readNamespacedPersistentVolumeClaim({ namespace: ns, name: "noshared-prefix-cache" })
        .catch(() => null);
      return c === null || c.metadata?.deletionTimestamp !== undefined ? true : undefined;
    });
    await waitForCondition(ns, "noshared", "Ready", "True", undefined, 90_000);
  });

  it("spec.env from a Secret and a ConfigMap: a missing one is reported and nothing applied (an optional one is fine); a changed value rolls every role's pods", async () => {
    const ns = await newNamespace("envsrc");
    await createWeightsVolume(ns);
    const env = [
      { name: "HTTPS_PROXY", valueFrom: { secretKeyRef: { name: "proxy", key: "url" } } },
      { name: "NO_PROXY", valueFrom: { configMapKeyRef: { name: "net", key: "no-proxy" } } },
      {
        name: "HF_HUB_OFFLINE",
        valueFrom: { configMapKeyRef: { name: "absent", key: "x", optional: true } },
      },
    ];
    await custom.createNamespacedCustomObject({
      ...G,
      namespace: ns,
      body: model("envsrc", ns, { env }),
    });
    let m = await waitForCondition(ns, "envsrc", "Degraded", "True", "SecretNotFound");
    expect(condition(m, "Degraded")?.message).toContain(
      `Secret ${ns}/proxy (spec.env[0]: HTTPS_PROXY) does not exist`,
    );
    expect(await ownedDeployments(ns, "envsrc")).toHaveLength(0);
    await core.createNamespacedSecret({
      namespace: ns,
      body: { metadata: { name: "proxy" }, stringData: { url: "http://proxy:3128" } },
    });
    m = await waitForCondition(ns, "envsrc", "Degraded", "True", "ConfigMapNotFound");
    expect(condition(m, "Degraded")?.message).toContain(
      `ConfigMap ${ns}/net (spec.env[1]: NO_PROXY) does not exist`,
    );
    await core.createNamespacedConfigMap({
      namespace: ns,
      body: { metadata: { name: "net" }, data: { "no-proxy": "10.0.0.0/8" } },
    });
    await waitForCondition(ns, "envsrc", "Ready", "True", undefined, 90_000);
    const hashes = async () =>
      (await ownedDeployments(ns, "envsrc")).map(
        (d) => d.spec!.template.metadata!.annotations!["expertmesh.io/env-sources"],
      );
    const first = await hashes();
    expect(first.length).toBe(3); // two shards and the gateway
    expect(new Set(first).size).toBe(1);
    expect(first[0]).toMatch(/^[0-9a-f]{16}$/);
    // The operator reads them again every --env-resync (1 s here): a new value, new pods.
    const rolled = async (from: string) =>
      waitFor(
        "every role's pod template to carry the new values' hash",
        async () => {
          const now = await hashes();
          return now.every((h) => h !== from) && new Set(now).size === 1 ? now[0] : undefined;
        },
        30_000,
      );
    await core.replaceNamespacedSecret({
      name: "proxy",
      namespace: ns,
      body: { metadata: { name: "proxy" }, stringData: { url: "http://other:3128" } },
    });
    const second = await rolled(first[0]!);
    await core.replaceNamespacedConfigMap({
      name: "net",
      namespace: ns,
      body: { metadata: { name: "net" }, data: { "no-proxy": "10.0.0.0/8,.svc" } },
    });
    await rolled(second!);
    // The values themselves are nowhere in the objects the operator writes.
    const all = await kubectl(["get", "deploy,cm,dsm", "-n", ns, "-o", "json"]);
    expect(all.stdout).not.toContain("other:3128");
    await custom.deleteNamespacedCustomObject({ ...G, namespace: ns, name: "envsrc" });
  });

  it("gateway TLS: spec.gateway.tls's certificate, key and client CA that every gateway would refuse are GatewayTLSInvalid, nothing applied; sound ones are mounted, the probes on the metrics port", async () => {
    const ns = await newNamespace("gwtls");
    await createWeightsVolume(ns);
    const pki = makeNatsPki(mkdtempSync(join(testEnv().runDir, "gateway-tls-operator-")));
    const read = (p: string) => readFileSync(p, "utf8");
    const reason = async (want: string) =>
      condition(await waitForCondition(ns, "gwtls", "Degraded", "True", want), "Degraded")?.message;
    const secret = (name: string, stringData: Record<string, string>) => ({
      metadata: { name },
      stringData,
    });
    await core.createNamespacedSecret({
      namespace: ns,
      // The client's key with the server's certificate: no gateway could serve with it.
      body: secret("gw-serving", {
        "tls.crt": read(pki.server.cert),
        "tls.key": read(pki.client.key),
      }),
    });
    await core.createNamespacedSecret({
      namespace: ns,
      body: secret("gw-clients", { "ca.crt": read(pki.client.key) }),
    });
    try {
      await custom.createNamespacedCustomObject({
        ...G,
        namespace: ns,
        body: model("gwtls", ns, {
          gateway: {
            tls: { secretName: "gw-serving", clientCASecret: { name: "gw-clients" } },
          },
        }),
      });
      const message = await reason("GatewayTLSInvalid");
      expect(message).toContain(
        `Secret ${ns}/gw-serving's tls.key (spec.gateway.tls.secretName) is not the key of Secret ${ns}/gw-serving's tls.crt (spec.gateway.tls.secretName) (CN=nats)`,
      );
      expect(message).toContain(
        `Secret ${ns}/gw-clients's ca.crt (spec.gateway.tls.clientCASecret) holds no PEM certificate`,
      );
      expect(await ownedDeployments(ns, "gwtls")).toHaveLength(0);
      await core.replaceNamespacedSecret({
        name: "gw-serving",
        namespace: ns,
        body: secret("gw-serving", {
          "tls.crt": read(pki.server.cert),
          "tls.key": read(pki.server.key),
        }),
      });
      await core.replaceNamespacedSecret({
        name: "gw-clients",
        namespace: ns,
        body: secret("gw-clients", { "ca.crt": read(pki.ca) + read(pki.otherCa) }),
      });
      await waitForCondition(ns, "gwtls", "Ready", "True", undefined, 90_000);
      const gw = (await ownedDeployments(ns, "gwtls")).find(
        (d) => d.metadata?.name === "gwtls-gateway",
      )!;
      const c = gw.spec!.template.spec!.containers[0]!;
      expect(c.args).toEqual(
        expect.arrayContaining([
          "--tls-client-ca=/var/run/expertmesh/gateway-client-ca/ca.crt",
          "--tls-cert=/var/run/expertmesh/gateway-tls/tls.crt",
        ]),
      );
      expect(c.readinessProbe?.httpGet).toMatchObject({ path: "/ready", port: "metrics" });
      expect(gw.spec!.template.spec!.volumes).toContainEqual(
        expect.objectContaining({
          name: "gateway-client-ca",
          secret: expect.objectContaining({ secretName: "gw-clients" }),
        }),
      );
    } finally {
      await kubectl(["delete", "dsm", "gwtls", "-n", ns, "--wait=false"]);
    }
  });

  it("reports a memory limit below what the pods hold as Degraded: MemoryLimitTooLow, applies nothing, and recovers when raised", async () => {
    const ns = await newNamespace("memory");
    await createWeightsVolume(ns);
    // tiny-v2 over 2 shards: 4 experts in each of 2 MoE layers, 3 x 64 x 32 bf16: 96 KiB.
    const experts = (memory: string) => ({
      shards: 2,
      resources: { requests: { memory }, limits: { memory } },
    });
    await custom.createNamespacedCustomObject({
      ...G,
      namespace: ns,
      body: model("tight", ns, { experts: experts("64Ki") }),
    });
    const m = await waitForCondition(ns, "tight", "Degraded", "True", "MemoryLimitTooLow");
    expect(condition(m, "Degraded")?.message).toBe(
      "spec.experts.resources.limits.memory 64Ki is less than shard 0's experts alone (96.0 KiB in bf16): a shard holds its experts in host memory; raise the limit above that, plus room (expertmesh plan -f prints what each pod holds)",
    );
    expect(await ownedDeployments(ns, "tight")).toHaveLength(0);
    const patched = await kubectl([
      "patch",
      "dsm",
      "tight",
      "-n",
      ns,
      "--type=merge",
      "-p",
      JSON.stringify({ spec: { experts: experts("1Gi") } }),
    ]);
    expect(patched.code).toBe(0);
    await waitForCondition(ns, "tight", "Ready", "True", undefined, 90_000);
    const shard = (await ownedDeployments(ns, "tight")).find(
      (d) => d.metadata?.name === "tight-shard-0",
    )!;
    expect(shard.spec?.template.spec?.containers[0]?.resources?.limits?.["memory"]).toBe("1Gi");
  });

  it("reports pods that no GPU node can take as Degraded: Unschedulable; past the rollout's deadline Progressing turns False: ProgressDeadlineExceeded", async () => {
    const ns = await newNamespace("gpus");
    await createWeightsVolume(ns);
    await custom.createNamespacedCustomObject({
      ...G,
      namespace: ns,
      body: model("greedy", ns, {
        experts: { shards: 1, gpusPerShard: 9, rollingUpdate: { progressDeadlineSeconds: 10 } },
      }),
    });
    await waitForCondition(ns, "greedy", "Degraded", "True", "Unschedulable");
    // The volume binds within a moment; then only the GPU request keeps the shard pending.
    const message = await waitFor("the scheduler's GPU verdict", async () => {
      const c = condition(await getModel(ns, "greedy"), "Degraded");
      return c?.reason === "Unschedulable" && /Insufficient nvidia\.com\/gpu/.test(c.message)
        ? c.message
        : undefined;
    });
    expect(message).toMatch(/^1 pod\(s\) cannot be scheduled, e\.g\. greedy-shard-0-/);
    const dep = await kubectl([
      "-n",
      ns,
      "get",
      "deploy",
      "greedy-shard-0",
      "-o",
      "jsonpath={.spec.progressDeadlineSeconds}",
    ]);
    expect(dep.stdout).toBe("10");
    // The real controller-manager gives up on the Deployment after 10 s without progress.
    await waitForCondition(ns, "greedy", "Progressing", "False", "ProgressDeadlineExceeded");
    const stalled = await getModel(ns, "greedy");
    expect(condition(stalled, "Progressing")?.message).toMatch(
      /^no progress within the deadline: greedy-shard-0; /,
    );
    // The cause leads Degraded; the stalled rollout follows it.
    const degraded = condition(stalled, "Degraded")!;
    expect(degraded.reason).toBe("Unschedulable");
    expect(degraded.message).toContain(
      "1 Deployment(s) made no progress within their deadline: greedy-shard-0 (10 s, spec.experts.rollingUpdate.progressDeadlineSeconds)",
    );
  });

  it("pods the API server refuses to create (a ResourceQuota without room, a RuntimeClass the cluster lacks): Degraded PodsNotCreated in its words, until they are there", async () => {
    const ns = await newNamespace("refused");
    await createWeightsVolume(ns);
    // The namespace may run no pod: the gateway's and the shard's are refused by the
    // ResourceQuota admission. (CPU roles: the file's other models keep the fake GPUs busy.)
    await core.createNamespacedResourceQuota({
      namespace: ns,
      body: { metadata: { name: "pods" }, spec: { hard: { pods: "0" } } },
    });
    await custom.createNamespacedCustomObject({
      ...G,
      namespace: ns,
      body: model("refused", ns, { experts: { shards: 1, gpusPerShard: 0 }, gateway: { gpus: 0 } }),
    });
    await waitForCondition(ns, "refused", "Degraded", "True", "PodsNotCreated");
    // (the two ReplicaSets are refused one after the other: the message counts both once the
    // second's failure is recorded, which on a busy machine comes a reconcile later)
    const quota = await waitFor("both Deployments counted in Degraded", async () => {
      const m = await getModel(ns, "refused");
      return condition(m, "Degraded")?.message?.startsWith("2 Deployment(s)") ? m : undefined;
    });
    expect(condition(quota, "Degraded")!.message).toMatch(
      /^2 Deployment\(s\) cannot create their pods, e\.g\. refused-gateway: pods "refused-gateway-[a-z0-9-]+" is forbidden: exceeded quota: pods, requested: pods=1, used: pods=0, limited: pods=0; raise the namespace's ResourceQuota, or ask for less in spec\.gateway \(replicas, gpus, resources\)$/,
    );
    expect(condition(quota, "Ready")).toMatchObject({ status: "False", reason: "PodsNotCreated" });
    const columns = await kubectl(["-n", ns, "get", "dsm", "refused", "--no-headers"]);
    expect(columns.stdout).toContain("PodsNotCreated");
    // Each refused ReplicaSet is asked to try again (an annotation, every 30 s at most), so
    // that room made later is taken at once, not at the ReplicaSet controller's backoff.
    await waitFor("both refused ReplicaSets asked to try again", async () => {
      const rs = await kubectl([
        "-n",
        ns,
        "get",
        "rs",
        "-o",
        'jsonpath={range .items[*]}{.metadata.annotations.expertmesh\\.io/pods-retried-at}{"\\n"}{end}',
      ]);
      const asked = rs.stdout.split("\n").filter((t) => !Number.isNaN(Date.parse(t)));
      return asked.length === 2 || undefined;
    });
    // Room for it: the ReplicaSet controller's next try makes the pod.
    await core.replaceNamespacedResourceQuota({
      name: "pods",
      namespace: ns,
      body: { metadata: { name: "pods" }, spec: { hard: { pods: "8" } } },
    });
    await waitForCondition(ns, "refused", "Ready", "True", undefined, 120_000);

    // A RuntimeClass that does not exist: the RuntimeClass admission refuses the new pods;
    // the old ones serve on.
    const runtimeClass = `${ns}-nvidia`;
    await patchSpec(ns, "refused", { scheduling: { runtimeClassName: runtimeClass } });
    const runtime = await waitForCondition(ns, "refused", "Degraded", "True", "PodsNotCreated");
    expect(condition(runtime, "Degraded")!.message).toContain(
      `is forbidden: pod rejected: RuntimeClass "${runtimeClass}" not found; spec.scheduling.runtimeClassName names a RuntimeClass this cluster does not have (kubectl get runtimeclass)`,
    );
    const running = await kubectl(["-n", ns, "get", "pods", "-o", "name"]);
    expect(running.stdout.trim().split("\n").length).toBeGreaterThanOrEqual(2);
    const made = await kubectl(
      ["apply", "-f", "-"],
      `apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: { name: ${runtimeClass} }\nhandler: nvidia\n`,
    );
    expect(made.code, made.stderr).toBe(0);
    try {
      const ready = await waitForCondition(ns, "refused", "Ready", "True", undefined, 120_000);
      expect(condition(ready, "Degraded")?.status).toBe("False");
      const templates = await kubectl([
        "-n",
        ns,
        "get",
        "deploy",
        "-o",
        "jsonpath={.items[*].spec.template.spec.runtimeClassName}",
      ]);
      expect(templates.stdout.split(" ")).toEqual([runtimeClass, runtimeClass]);
    } finally {
      await kubectl(["delete", "runtimeclass", runtimeClass, "--ignore-not-found"]);
      await kubectl(["delete", "dsm", "refused", "-n", ns, "--wait=false", "--ignore-not-found"]);
    }
  });

  it("deleting the DeepSeekModel garbage-collects everything it owned", async () => {
    const r = await kubectl(["delete", "dsm", "tiny"]);
    expect(r.code, r.stderr).toBe(0);
    await waitFor(
      "owned objects gone",
      async () => {
        const left = await kubectl([
          "get",
          "deploy,svc,cm,pdb,pods",
          "-l",
          "expertmesh.io/model=tiny",
          "-o",
          "name",
        ]);
        return left.code === 0 && left.stdout.trim() === "" ? true : undefined;
      },
      90_000,
    );
  });

  describe("rejects invalid manifests with the schema's and CEL rules' messages", () => {
    const base = model("bad", "default");
    const spec = base["spec"] as Record<string, any>;
    const cases: [string, Record<string, unknown>, string][] = [
      [
        "preset and architecture",
        {
          model: {
            ...spec.model,
            architecture: {
              numLayers: 2,
              firstDenseLayers: 1,
              routedExperts: 4,
              expertsPerToken: 2,
              hiddenSize: 8,
              moeIntermediateSize: 8,
            },
          },
        },
        CROSS_FIELD_RULES[0]!.message,
      ],
      [
        "two sources",
        {
          model: {
            preset: "tiny-v2",
            source: { pvc: { claimName: "w" }, huggingFace: { repo: "a/b" } },
          },
        },
        CROSS_FIELD_RULES[1]!.message,
      ],
      [
        "no MoE layer",
        {
          model: {
            architecture: {
              numLayers: 2,
              firstDenseLayers: 2,
              routedExperts: 4,
              expertsPerToken: 2,
              hiddenSize: 8,
              moeIntermediateSize: 8,
            },
            source: { pvc: { claimName: "w" } },
          },
        },
        CROSS_FIELD_RULES[2]!.message,
      ],
      [
        "top-k over experts",
        {
          model: {
            architecture: {
              numLayers: 2,
              firstDenseLayers: 1,
              routedExperts: 4,
              expertsPerToken: 5,
              hiddenSize: 8,
              moeIntermediateSize: 8,
            },
            source: { pvc: { claimName: "w" } },
          },
        },
        CROSS_FIELD_RULES[3]!.message,
      ],
      ["more shards than experts", { experts: { shards: 9 } }, CROSS_FIELD_RULES[4]!.message],
      [
        "uneven redundant slots",
        { experts: { shards: 2, redundantExperts: 1 } },
        CROSS_FIELD_RULES[5]!.message,
      ],
      [
        "too many redundant",
        { experts: { shards: 2, redundantExperts: 10 } },
        CROSS_FIELD_RULES[6]!.message,
      ],
      [
        "shard replicas min over max",
        { experts: { shards: 2, replicas: { min: 3, max: 2 } } },
        CROSS_FIELD_RULES[7]!.message,
      ],
      [
        "gateway min over max",
        { gateway: { minReplicas: 5, maxReplicas: 2 } },
        CROSS_FIELD_RULES[8]!.message,
      ],
      [
        "a KV cache that cannot hold the context",
        { gateway: { kvCache: { bytes: 4096 } } },
        CROSS_FIELD_RULES[9]!.message,
      ],
      [
        // tiny-v2: 3 layers of 80-byte bf16 rows; 75000 bytes in blocks of 4 hold 312 tokens,
        // 232 with the MTP layer's rows (4 layers).
        "a KV cache that holds the context only without the MTP layer's rows",
        {
          gateway: {
            speculative: { method: "mtp" },
            limits: { maxModelLen: 233 },
            kvCache: { bytes: 75000, dtype: "bfloat16", blockSize: 4 },
          },
        },
        CROSS_FIELD_RULES[9]!.message,
      ],
      [
        "a prefix cache disk tier without prefix caching",
        { gateway: { prefixCaching: false, kvCache: { diskBytes: 2 ** 30 } } },
        CROSS_FIELD_RULES[10]!.message,
      ],
      [
        "speculative lookup min over max",
        { gateway: { speculative: { numTokens: 4, promptLookupMin: 6, promptLookupMax: 3 } } },
        CROSS_FIELD_RULES[11]!.message,
      ],
      [
        "lookup without numTokens",
        { gateway: { speculative: { method: "ngram" } } },
        CROSS_FIELD_RULES[12]!.message,
      ],
      [
        "explicit figures whose KV cache cannot hold maxModelLen",
        {
          model: {
            architecture: {
              numLayers: 4,
              firstDenseLayers: 1,
              routedExperts: 8,
              expertsPerToken: 2,
              hiddenSize: 64,
              moeIntermediateSize: 32,
              kvLoraRank: 32,
              qkRopeHeadDim: 8,
            },
            source: { pvc: { claimName: "w" } },
          },
          gateway: {
            limits: { maxModelLen: 233 },
            kvCache: { bytes: 75000, dtype: "bfloat16", blockSize: 4 },
          },
        },
        CROSS_FIELD_RULES[13]!.message,
      ],
      [
        "a shared disk tier without its budget",
        { gateway: { kvCache: { diskSharedClaim: "prefix-rwx" } } },
        CROSS_FIELD_RULES[14]!.message,
      ],
      [
        "priority aging without the priority policy",
        { gateway: { priorityAgingSeconds: 30 } },
        CROSS_FIELD_RULES[15]!.message,
      ],
      [
        "a PodMonitor label key with a space",
        { monitoring: { podMonitor: { enabled: true, labels: { "my release": "kps" } } } },
        CROSS_FIELD_RULES[16]!.message,
      ],
      [
        "a gateway resource that is not one",
        { gateway: { resources: { requests: { blockSize: 4 } } } },
        CROSS_FIELD_RULES[17]!.message,
      ],
      [
        "a gateway request over its limit",
        { gateway: { resources: { requests: { memory: "2Gi" }, limits: { memory: 1073741824 } } } },
        CROSS_FIELD_RULES[18]!.message,
      ],
      [
        "a shard resource in kubernetes.io",
        { experts: { shards: 2, resources: { limits: { "kubernetes.io/gpu": 1 } } } },
        CROSS_FIELD_RULES[19]!.message,
      ],
      [
        "a shard request over its limit",
        { experts: { shards: 2, resources: { requests: { cpu: "1500m" }, limits: { cpu: 1 } } } },
        CROSS_FIELD_RULES[20]!.message,
      ],
      [
        "a node selector key with a space",
        { scheduling: { nodeSelector: { "gpu type": "h200" } } },
        CROSS_FIELD_RULES[21]!.message,
      ],
      [
        "a topology spread key with a space",
        {
          scheduling: {
            topologySpreadConstraints: [
              { maxSkew: 1, topologyKey: "my zone", whenUnsatisfiable: "ScheduleAnyway" },
            ],
          },
        },
        CROSS_FIELD_RULES[22]!.message,
      ],
      [
        "batch-invariant kernels with GPU shards",
        {
          model: { ...spec.model, batchInvariant: true },
          gateway: { gpus: 0 },
          experts: { shards: 2, gpusPerShard: 1 },
        },
        CROSS_FIELD_RULES[23]!.message,
      ],
      [
        "a NATS prefix cache tier without prefix caching",
        { gateway: { prefixCaching: false, kvCache: { remoteBytes: 2 ** 30 } } },
        CROSS_FIELD_RULES[24]!.message,
      ],
      [
        "a NATS prefix cache tier with a shared disk tier",
        {
          gateway: {
            kvCache: { remoteBytes: 2 ** 30, diskBytes: 2 ** 30, diskSharedClaim: "prefix-rwx" },
          },
        },
        CROSS_FIELD_RULES[25]!.message,
      ],
      [
        "disaggregated prefill without a NATS prefix cache tier",
        { gateway: { disaggregation: { replicas: 2 } } },
        CROSS_FIELD_RULES[26]!.message,
      ],
      [
        "prefill gateways of more minReplicas than maxReplicas",
        {
          gateway: {
            kvCache: { remoteBytes: 2 ** 30 },
            disaggregation: { minReplicas: 3, maxReplicas: 2 },
          },
        },
        CROSS_FIELD_RULES[27]!.message,
      ],
      [
        "an OTLP/gRPC endpoint with a path",
        {
          gateway: {
            tracing: { otlpEndpoint: "http://otel:4317/v1/traces", protocol: "grpc" },
          },
        },
        CROSS_FIELD_RULES[28]!.message,
      ],
      [
        "two NATS identities",
        { nats: { userSecret: { name: "u" }, nkeySecret: { name: "n" } } },
        CROSS_FIELD_RULES[29]!.message,
      ],
      [
        "a NATS URL holding credentials",
        { nats: { url: "nats://alice:hunter2@nats:4222" } },
        CROSS_FIELD_RULES[30]!.message,
      ],
      [
        "a shard rollout that may neither surge nor stop a pod",
        { experts: { rollingUpdate: { maxSurge: 0 } } },
        CROSS_FIELD_RULES[31]!.message,
      ],
      [
        "a gateway rollout that may neither surge nor stop a pod",
        { gateway: { rollingUpdate: { maxSurge: 0, maxUnavailable: 0 } } },
        CROSS_FIELD_RULES[32]!.message,
      ],
      [
        "gateway GPUs counted in a Kubernetes domain's resource",
        { gateway: { gpuResource: "gpu.kubernetes.io/h200" } },
        CROSS_FIELD_RULES[33]!.message,
      ],
      [
        "shard GPUs counted in a Kubernetes domain's resource",
        { experts: { gpuResource: "kubernetes.io/gpu" } },
        CROSS_FIELD_RULES[34]!.message,
      ],
      [
        "an env name the operator sets",
        { env: [{ name: "HF_TOKEN", value: "hf_x" }] },
        CROSS_FIELD_RULES[35]!.message,
      ],
      [
        "a pod label the operator sets",
        { podMetadata: { labels: { "app.kubernetes.io/component": "x" } } },
        CROSS_FIELD_RULES[36]!.message,
      ],
      [
        "a pod annotation under expertmesh.io/",
        { podMetadata: { annotations: { "expertmesh.io/plan-shape": "x" } } },
        CROSS_FIELD_RULES[37]!.message,
      ],
      [
        "an env entry with a value and a valueFrom",
        { env: [{ name: "A", value: "1", valueFrom: { secretKeyRef: { name: "s", key: "k" } } }] },
        CROSS_FIELD_RULES[38]!.message,
      ],
      [
        "an env entry with neither a value nor a valueFrom",
        { env: [{ name: "A" }] },
        CROSS_FIELD_RULES[38]!.message,
      ],

      [
        "the batches' claim named and made",
        { gateway: { batch: { sharedClaim: "a", sharedStorageClassName: "b" } } },
        CROSS_FIELD_RULES[40]!.message,
      ],
      [
        "the disk tier's claim named and made",
        {
          gateway: {
            kvCache: { diskBytes: 2 ** 20, diskSharedClaim: "a", diskSharedStorageClassName: "b" },
          },
        },
        CROSS_FIELD_RULES[39]!.message,
      ],
      [
        "a shared Hub download with hf download's image",
        {
          model: {
            preset: "tiny-v2",
            source: {
              huggingFace: {
                repo: "a/b",
                sharedStorageClassName: "nfs",
                downloaderImage: "python:3.12-slim",
              },
            },
          },
        },
        CROSS_FIELD_RULES[41]!.message,
      ],
      [
        "a toleration with neither key nor operator Exists",
        { scheduling: { tolerations: [{ effect: "NoSchedule" }] } },
        CROSS_FIELD_RULES[42]!.message,
      ],
      [
        "a toleration Exists with a value",
        { scheduling: { tolerations: [{ key: "gpu", operator: "Exists", value: "x" }] } },
        CROSS_FIELD_RULES[43]!.message,
      ],
      [
        "tolerationSeconds without NoExecute",
        {
          scheduling: {
            tolerations: [{ key: "gpu", operator: "Exists", tolerationSeconds: 30 }],
          },
        },
        CROSS_FIELD_RULES[44]!.message,
      ],
      [
        "a node affinity requirement Gt with a word",
        {
          scheduling: {
            affinity: {
              nodeAffinity: {
                requiredDuringSchedulingIgnoredDuringExecution: {
                  nodeSelectorTerms: [
                    { matchExpressions: [{ key: "gpus", operator: "Gt", values: ["two"] }] },
                  ],
                },
              },
            },
          },
        },
        CROSS_FIELD_RULES[45]!.message,
      ],
      [
        "a node affinity matchFields requirement on a label",
        {
          scheduling: {
            affinity: {
              nodeAffinity: {
                preferredDuringSchedulingIgnoredDuringExecution: [
                  {
                    weight: 5,
                    preference: {
                      matchFields: [{ key: "gpu", operator: "In", values: ["h200"] }],
                    },
                  },
                ],
              },
            },
          },
        },
        CROSS_FIELD_RULES[46]!.message,
      ],
      [
        "a pod anti-affinity label selector In without values",
        {
          scheduling: {
            affinity: {
              podAntiAffinity: {
                requiredDuringSchedulingIgnoredDuringExecution: [
                  {
                    topologyKey: "kubernetes.io/hostname",
                    labelSelector: { matchExpressions: [{ key: "app", operator: "In" }] },
                  },
                ],
              },
            },
          },
        },
        CROSS_FIELD_RULES[47]!.message,
      ],
      [
        "a pod affinity topologyKey that is no label key",
        {
          scheduling: {
            affinity: {
              podAffinity: {
                preferredDuringSchedulingIgnoredDuringExecution: [
                  { weight: 1, podAffinityTerm: { topologyKey: "-zone" } },
                ],
              },
            },
          },
        },
        "spec.scheduling.affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].podAffinityTerm.topologyKey: Invalid value",
      ],
      [
        "a pod affinity matchLabels key that is no label key",
        {
          scheduling: {
            affinity: {
              podAffinity: {
                requiredDuringSchedulingIgnoredDuringExecution: [
                  { topologyKey: "zone", labelSelector: { matchLabels: { "-app": "x" } } },
                ],
              },
            },
          },
        },
        CROSS_FIELD_RULES[48]!.message,
      ],
      [
        "mismatchLabelKeys without a labelSelector",
        {
          scheduling: {
            affinity: {
              podAffinity: {
                requiredDuringSchedulingIgnoredDuringExecution: [
                  { topologyKey: "zone", mismatchLabelKeys: ["tenant"] },
                ],
              },
            },
          },
        },
        CROSS_FIELD_RULES[49]!.message,
      ],
      [
        "a network policy peer with an ipBlock and a namespaceSelector",
        {
          networkPolicy: {
            enabled: true,
            gatewayFrom: [{ ipBlock: { cidr: "10.0.0.0/8" }, namespaceSelector: {} }],
          },
        },
        CROSS_FIELD_RULES[50]!.message,
      ],
      [
        "a network policy peer selector Exists with values",
        {
          networkPolicy: {
            enabled: true,
            egress: {
              enabled: true,
              natsTo: [
                {
                  podSelector: {
                    matchExpressions: [{ key: "app", operator: "Exists", values: ["nats"] }],
                  },
                },
              ],
            },
          },
        },
        CROSS_FIELD_RULES[51]!.message,
      ],
      [
        "a network policy ipBlock that is no IP range",
        { networkPolicy: { enabled: true, metricsFrom: [{ ipBlock: { cidr: "lots" } }] } },
        "spec.networkPolicy.metricsFrom[0].ipBlock.cidr: Invalid value",
      ],
      [
        "a misspelt node affinity field",
        {
          scheduling: {
            affinity: { nodeAffinity: { requiredDuringScheduling: { nodeSelectorTerms: [] } } },
          },
        },
        'unknown field "spec.scheduling.affinity.nodeAffinity.requiredDuringScheduling"',
      ],
      [
        "a disk tier made of a StorageClass without its budget",
        { gateway: { kvCache: { diskSharedStorageClassName: "b" } } },
        CROSS_FIELD_RULES[14]!.message,
      ],
      [
        "two env entries of one name",
        {
          env: [
            { name: "A", value: "1" },
            { name: "A", value: "2" },
          ],
        },
        'spec.env[1]: Duplicate value: {"name":"A"}',
      ],
      [
        "a GPU resource that is no resource name",
        { experts: { gpuResource: "gpus" } },
        "spec.experts.gpuResource: Invalid value",
      ],
      [
        "a node selector value that is no label value",
        { scheduling: { nodeSelector: { gpu: "[a-z]+" } } },
        "spec.scheduling.nodeSelector.gpu: Invalid value",
      ],
      [
        "a quantity that is not one",
        { gateway: { resources: { requests: { memory: "lots" } } } },
        "spec.gateway.resources.requests.memory: Invalid value",
      ],
      [
        "wrong type",
        { experts: { shards: "two" } },
        'spec.experts.shards: Invalid value: "string": spec.experts.shards in body must be of type integer',
      ],
      [
        "unknown preset",
        { model: { preset: "gpt-5", source: { pvc: { claimName: "w" } } } },
        'spec.model.preset: Unsupported value: "gpt-5"',
      ],
      [
        "zero shards",
        { experts: { shards: 0 } },
        "spec.experts.shards: Invalid value: 0: spec.experts.shards in body should be greater than or equal to 1",
      ],
    ];
    it("accepts PodMonitor label keys with a prefix, of the longest lengths", async () => {
      const labels = {
        [`${"a".repeat(63)}.${"b".repeat(63)}.${"c".repeat(63)}.${"d".repeat(61)}/${"n".repeat(63)}`]:
          "x",
        "app.kubernetes.io/part-of": "kps",
        release: "",
      };
      const body = JSON.stringify(
        model("labels", "default", {
          ...spec,
          monitoring: { podMonitor: { enabled: true, labels } },
        }),
      );
      const r = await kubectl(["apply", "--dry-run=server", "-f", "-"], body);
      expect(r.code, r.stderr).toBe(0);
    });
    it("accepts priority aging with the priority policy, and 0 without it", async () => {
      for (const gateway of [
        { schedulingPolicy: "priority", priorityAgingSeconds: 2.5 },
        { priorityAgingSeconds: 0 },
      ]) {
        const body = JSON.stringify(model("aging", "default", { ...spec, gateway }));
        const r = await kubectl(["apply", "--dry-run=server", "-f", "-"], body);
        expect(r.code, r.stderr).toBe(0);
      }
    });
    it("accepts GPUs counted as MIG profiles or a shared GPU's resource", async () => {
      const body = JSON.stringify(
        model("mig", "default", {
          ...spec,
          gateway: { gpuResource: "nvidia.com/gpu.shared" },
          experts: { ...spec.experts, gpuResource: "nvidia.com/mig-3g.71gb" },
        }),
      );
      const r = await kubectl(["apply", "--dry-run=server", "-f", "-"], body);
      expect(r.code, r.stderr).toBe(0);
    });
    it("accepts batch-invariant kernels with CPU roles", async () => {
      const body = JSON.stringify(
        model("invariant", "default", {
          ...spec,
          model: { ...spec.model, batchInvariant: true },
          gateway: { gpus: 0 },
          experts: { ...spec.experts, gpusPerShard: 0 },
        }),
      );
      const r = await kubectl(["apply", "--dry-run=server", "-f", "-"], body);
      expect(r.code, r.stderr).toBe(0);
    });
    it("accepts env values from a Secret's and a ConfigMap's keys", async () => {
      const body = JSON.stringify(
        model("envfrom", "default", {
          ...spec,
          env: [
            { name: "HTTPS_PROXY", valueFrom: { secretKeyRef: { name: "proxy", key: "url" } } },
            {
              name: "NO_PROXY",
              valueFrom: { configMapKeyRef: { name: "net", key: "no-proxy", optional: true } },
            },
            { name: "HF_ENDPOINT", value: "https://mirror" },
          ],
        }),
      );
      const r = await kubectl(["apply", "--dry-run=server", "-f", "-"], body);
      expect(r.code, r.stderr).toBe(0);
    });
    it("covers every cross-field rule", () => {
      const covered = new Set(cases.map(([, , msg]) => msg));
      for (const r of CROSS_FIELD_RULES) expect(covered.has(r.message), r.message).toBe(true);
    });
    it.each(cases)("%s", async (_name, specPatch, message) => {
      const body = JSON.stringify(model("bad", "default", { ...spec, ...specPatch }));
      const r = await kubectl(["apply", "--dry-run=server", "-f", "-"], body);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toContain(message);
    });
  });
});

describe.sequential("expertmesh operator in namespaced-only mode", () => {
  const releaseNs = uniqueName("em-ns-system");
  const watched = uniqueName("team-a");
  const other = uniqueName("team-b");
  let op: RunningOperator | undefined;

  beforeAll(async () => {
    for (const ns of [watched, other]) {
      await core.createNamespace({ body: { metadata: { name: ns } } });
      created.push(ns);
    }
    await helmInstall("expertmesh-ns", releaseNs, ["--set", `watchNamespaces={${watched}}`]);
    const kubeconfig = await serviceAccountKubeconfig(releaseNs, "expertmesh-ns");
    op = await startOperator({
      kubeconfig,
      identity: "op-ns",
      leaseNamespace: releaseNs,
      namespaces: [watched],
    });
    await waitForLeadership(op);
  });
  afterAll(async () => {
    await op?.process.stop();
  });

  it("reconciles models in its namespace with only namespaced Roles, and leaves others alone", async () => {
    for (const ns of [watched, other]) {
      await createWeightsVolume(ns);
      await custom.createNamespacedCustomObject({ ...G, namespace: ns, body: model("m", ns) });
    }
    await waitForCondition(watched, "m", "Ready", "True", "AllReplicasReady");
    await new Promise((r) => setTimeout(r, 2000));
    expect((await getModel(other, "m")).status).toBeUndefined();
    expect(await ownedDeployments(other, "m")).toHaveLength(0);
    const clusterRoles = await kubectl([
      "get",
      "clusterrole",
      "-l",
      "app.kubernetes.io/instance=expertmesh-ns",
      "-o",
      "name",
    ]);
    expect(clusterRoles.stdout.trim()).toBe("");
    // Nodes are cluster-scoped, so no Role grants them: the GPU memory check is off (the
    // models request GPUs), said once, and reconciling goes on.
    const log = readFileSync(op!.process.logPath, "utf8");
    expect(log.match(/listing nodes is forbidden \(namespaced RBAC\)/g)).toHaveLength(1);
  });
});
