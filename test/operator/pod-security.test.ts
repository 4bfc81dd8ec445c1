// The pods the operator makes for a model pass the "restricted" Pod Security Standard, so a
// model runs in a namespace that enforces it (pod-security.kubernetes.io/enforce=restricted).
// The judge is the test API server's own PodSecurity admission: each Deployment's pod
// template is created as a Pod there, as a dry run, for every shape of model (weights from a
// volume or downloaded by an init container, GPUs, NATS TLS and credentials, disaggregated
// prefill, a disk tier).
import type { V1Deployment, V1PodTemplateSpec } from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { architectureOf, parseManifest } from "../../src/api/manifest.ts";
import { planPlacement } from "../../src/moe/placement.ts";
import { desiredObjects, specReplicas } from "../../src/operator/workloads.ts";
import { type RestrictedNamespace, restrictedNamespace } from "../support/pod-security.ts";

let ns: RestrictedNamespace;

/** Each Deployment of the model in `spec` (YAML lines under spec:), by name. */
function podTemplates(spec: string): Map<string, V1PodTemplateSpec> {
  const m = parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m, namespace: ${ns.name}, uid: u-1 }
spec:
${spec}`);
  const plan = planPlacement({
    architecture: architectureOf(m),
    numShards: m.spec.experts.shards,
    redundantExperts: 0,
  });
  const out = new Map<string, V1PodTemplateSpec>();
  for (const o of desiredObjects(m, plan, specReplicas(m, plan)))
    if (o.kind === "Deployment") out.set(o.metadata!.name!, (o as V1Deployment).spec!.template);
  return out;
}

beforeAll(async () => {
  ns = await restrictedNamespace("em-restricted");
});

afterAll(async () => {
  await ns?.remove();
});

describe("the restricted Pod Security Standard", () => {
  it("is enforced in the namespace: a pod that may escalate privileges is refused", async () => {
    // The control: without it, every pass below would be no evidence.
    const why = await ns.refusal({
      containers: [{ name: "c", image: "busybox", command: ["true"] }],
    });
    expect(why).toMatch(/violates PodSecurity "restricted:latest"/);
    expect(why).toMatch(/allowPrivilegeEscalation != false/);
  });

  it.each([
    [
      "weights on a volume, GPUs, disaggregated prefill, a disk tier, NATS over mutual TLS as a user",
      `  model: { preset: tiny-v3, source: { pvc: { claimName: weights, path: tiny } } }
  experts: { shards: 2, gpusPerShard: 1 }
  gateway:
    gpus: 1
    kvCache: { diskBytes: 1073741824, remoteBytes: 1073741824 }
    disaggregation: { replicas: 1 }
  nats:
    userSecret: { name: nats-user }
    tls: { caSecret: { name: nats-ca }, clientSecret: { name: nats-client } }`,
    ],
    [
      "weights downloaded from the Hugging Face Hub by an init container, a token, NATS .creds",
      `  model:
    preset: tiny-v3
    source: { huggingFace: { repo: deepseek-ai/DeepSeek-V3, tokenSecret: { name: hf } } }
  experts: { shards: 1, gpusPerShard: 0 }
  gateway: { gpus: 0 }
  nats: { credentialsSecret: { name: creds } }`,
    ],
  ])("admits every pod of a model: %s", async (_what, spec) => {
    const templates = podTemplates(spec);
    expect(templates.size).toBeGreaterThanOrEqual(2);
    for (const [name, template] of templates)
      expect(await ns.refusal(template.spec!), name).toBeNull();
  });
});
