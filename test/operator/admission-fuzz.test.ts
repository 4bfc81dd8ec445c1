// The CRD and the local parser agree, and what the API server admits the operator can run:
// the examples mutated at random (as in test/unit/manifest-fuzz.test.ts), each sent to the
// real kube-apiserver as a server-side dry run (strict field validation, as kubectl's), and
// parsed by `expertmesh`'s own parser (what `expertmesh up` runs):
// - the two must agree on admitting it (else `expertmesh up` runs what the cluster refuses,
//   or the other way round);
// - the object the API server admits (with its defaults) must render, and every workload
//   the operator would apply for it (when its memory limits hold its weights: else it says
//   MemoryLimitTooLow and applies nothing) must be admitted by the API server too (a dry
//   run): a spec the CRD lets in must never leave the operator with objects the cluster
//   refuses.
// EM_FUZZ_ITERATIONS (default 40: each is a few API calls) and EM_FUZZ_SEED widen a campaign.
import { readdirSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import {
  CoreV1Api,
  CustomObjectsApi,
  type KubernetesObject,
  KubernetesObjectApi,
} from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseAllDocuments, stringify } from "yaml";
import { deepSeekModelCrd } from "../../src/api/crd.ts";
import { architectureOf, parseManifest } from "../../src/api/manifest.ts";
import { memoryLimitShortfalls } from "../../src/api/memory.ts";
import type { DeepSeekModel } from "../../src/api/schema.ts";
import { planPlacement } from "../../src/moe/placement.ts";
import { desiredObjects, specReplicas } from "../../src/operator/workloads.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";
import { kubectl } from "../support/cli.ts";
import { adminKubeConfig, uniqueName, waitFor } from "../support/env.ts";
import { mutate, rng, type Vocabulary } from "../support/fuzz.ts";

const ITERATIONS = Number(process.env["EM_FUZZ_ITERATIONS"] ?? 40);
const SEED = Number(process.env["EM_FUZZ_SEED"] ?? 20261201);
const G = { group: "expertmesh.io", version: "v1alpha1", plural: "deepseekmodels" };

const kc = adminKubeConfig();
const core = kc.makeApiClient(CoreV1Api);
const custom = kc.makeApiClient(CustomObjectsApi);
const objects = KubernetesObjectApi.makeApiClient(kc);
const namespace = uniqueName("em-admit");
const crd = fileURLToPath(new URL("../../crds/deepseekmodels.expertmesh.io.yaml", import.meta.url));

const dir = new URL("../../examples/", import.meta.url);
const examples = readdirSync(dir)
  .filter((f) => f.endsWith(".yaml"))
  .map((f) =>
    parseAllDocuments(readFileSync(new URL(f, dir), "utf8"))
      .map((d) => d.toJS())
      .find((d) => d?.kind === "DeepSeekModel"),
  )
  .filter((d): d is Record<string, unknown> => d !== undefined);

/** Field names and enum values of the CRD's schema (as the manifest fuzz's). */
function vocabulary(): Vocabulary {
  const fields = new Set<string>();
  const plausible: Record<string, unknown[]> = {};
  const walk = (node: Record<string, any>) => {
    for (const [name, child] of Object.entries<Record<string, any>>(node["properties"] ?? {})) {
      fields.add(name);
      const values = [...(child["enum"] ?? []), ...("default" in child ? [child["default"]] : [])];
      if (values.length) plausible[name] = [...(plausible[name] ?? []), ...values];
      walk(child);
    }
    if (node["items"]) walk(node["items"]);
    if (typeof node["additionalProperties"] === "object") walk(node["additionalProperties"]);
  };
  walk(deepSeekModelCrd().spec.versions[0].schema.openAPIV3Schema);
  return { fields: [...fields], plausible, words: ["tiny-v3", "deepseek-v3", "bfloat16", "fp8"] };
}

/** The API server's answer to a dry-run create: admitted (with the stored object) or why not. */
async function admits(body: object): Promise<{ ok: true; obj: any } | { ok: false; why: string }> {
  try {
    const obj = await custom.createNamespacedCustomObject({
      ...G,
      namespace,
      body,
      dryRun: "All",
      fieldValidation: "Strict",
    });
    return { ok: true, obj };
  } catch (e: any) {
    const status = e?.code ?? e?.statusCode;
    if (status !== 422 && status !== 400) throw e;
    return { ok: false, why: String(e?.body ?? e?.message).slice(0, 400) };
  }
}

beforeAll(async () => {
  await core.createNamespace({ body: { metadata: { name: namespace } } });
  expect((await kubectl(["apply", "--server-side", "-f", crd])).code).toBe(0);
  await waitFor(
    "the CRD served",
    async () => (await kubectl(["get", "dsm", "-n", namespace])).code === 0 || undefined,
  );
});

afterAll(async () => {
  await core.deleteNamespace({ name: namespace }).catch(() => {});
});

describe(`admission fuzz (${ITERATIONS} manifests, seed ${SEED})`, () => {
  it("the CRD and the parser agree, and what is admitted renders workloads the API server admits", async () => {
    const v = vocabulary();
    const r = rng(SEED);
    const failures: string[] = [];
    let admitted = 0;
    let rendered = 0;
    for (let i = 0; i < ITERATIONS && failures.length < 40; i++) {
      const doc = structuredClone(r.pick(examples));
      mutate(r, v, doc);
      // Into this test's namespace, under a name of its own (a dry run creates nothing).
      if (typeof doc["metadata"] !== "object" || doc["metadata"] === null) doc["metadata"] = {};
      Object.assign(doc["metadata"] as object, { namespace, name: `m${i}` });
      const text = stringify(doc);
      const server = await admits(doc);
      let local: string | null = null;
      try {
        parseManifest(text, "fuzz.yaml");
      } catch (e) {
        if (!(e instanceof ExpertMeshError)) throw e;
        local = e.message;
      }
      if (server.ok !== (local === null)) {
        failures.push(
          `#${i}: the API server ${server.ok ? "admits" : "refuses"} it, the parser ${local === null ? "accepts" : "refuses"} it` +
            `\n  server: ${server.ok ? "ok" : server.why}\n  parser: ${local ?? "ok"}\n${text.slice(0, 1200)}`,
        );
        continue;
      }
      if (!server.ok) continue;
      admitted++;
      // What the operator does with it: the stored object (the API server's defaults) rendered.
      const model = server.obj as DeepSeekModel;
      model.metadata.uid ??= "00000000-0000-0000-0000-000000000000";
      const plan = planPlacement({
        architecture: architectureOf(model),
        numShards: model.spec.experts.shards,
        redundantExperts: model.spec.experts.redundantExperts,
      });
      // Limits under what the pods hold: the reconciler applies nothing (MemoryLimitTooLow).
      if (memoryLimitShortfalls(model, plan).length > 0) continue;
      for (const o of desiredObjects(model, plan, specReplicas(model, plan))) {
        if (o.kind === "PodMonitor") continue; // the Prometheus Operator's CRD is not installed here
        try {
          await objects.create(o as KubernetesObject, undefined, "All");
        } catch (e: any) {
          failures.push(
            `#${i}: the API server admits the model but refuses its ${o.kind} ${o.metadata?.name}: ${String(e?.body ?? e?.message).slice(0, 400)}\n${text.slice(0, 1200)}`,
          );
        }
      }
      rendered++;
    }
    if (process.env["EM_FUZZ_VERBOSE"]) console.log({ admitted, rendered });
    expect(failures, failures.join("\n\n")).toEqual([]);
  });
});
