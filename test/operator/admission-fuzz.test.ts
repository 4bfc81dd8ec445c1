import {
  CoreV1Api,
  CustomObjectsApi,
  type KubernetesObject,
  KubernetesObjectApi,
} from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { stringify } from "yaml";
import { architectureOf, parseManifest } from "../../src/api/manifest.ts";
import { memoryLimitShortfalls } from "../../src/api/memory.ts";
import type { DeepSeekModel } from "../../src/api/schema.ts";
import { planPlacement } from "../../src/moe/placement.ts";
import { desiredObjects, specReplicas } from "../../src/operator/workloads.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";
import { installModelCrd } from "../support/crd.ts";
import { adminKubeConfig, uniqueName } from "../support/env.ts";
import { crdVocabulary, exampleModels, mutate, rng } from "../support/fuzz.ts";

const ITERATIONS = Number(process.env["EM_FUZZ_ITERATIONS"] ?? 40);
const SEED = Number(process.env["EM_FUZZ_SEED"] ?? 20261201);
const G = { group: "expertmesh.io", version: "v1alpha1", plural: "deepseekmodels" };

const kc = adminKubeConfig();
const core = kc.makeApiClient(CoreV1Api);
const custom = kc.makeApiClient(CustomObjectsApi);
const objects = KubernetesObjectApi.makeApiClient(kc);
const namespace = uniqueName("em-admit");

const examples = exampleModels();

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
  await installModelCrd(namespace);
});

afterAll(async () => {
  await core.deleteNamespace({ name: namespace }).catch(() => {});
});

/** Dry-run creates of `model`'s workloads, as the API server stored it: the refusals. */
async function renderRefusals(model: DeepSeekModel, what: string): Promise<string[]> {
  model.metadata.uid ??= "00000000-0000-0000-0000-000000000000";
  const plan = planPlacement({
    architecture: architectureOf(model),
    numShards: model.spec.experts.shards,
    redundantExperts: model.spec.experts.redundantExperts,
  });
  const refusals: string[] = [];
  for (const o of desiredObjects(model, plan, specReplicas(model, plan))) {
    if (o.kind === "PodMonitor") continue; // the Prometheus Operator's CRD is not installed here
    try {
      await objects.create(o as KubernetesObject, undefined, "All");
    } catch (e: any) {
      refusals.push(
        `${what}: the API server admits the model but refuses its ${o.kind} ${o.metadata?.name}: ${String(e?.body ?? e?.message).slice(0, 400)}`,
      );
    }
  }
  return refusals;
}

describe("the examples", () => {
  it("are admitted, and render workloads the API server admits", async () => {
    expect(examples.length).toBeGreaterThanOrEqual(3);
    for (const [i, example] of examples.entries()) {
      const doc = structuredClone(example);
      Object.assign(doc["metadata"] as object, { namespace, name: `example${i}` });
      const server = await admits(doc);
      expect(server.ok, server.ok ? "" : server.why).toBe(true);
      if (!server.ok) continue;
      expect(await renderRefusals(server.obj, String((example["metadata"] as any)?.name))).toEqual(
        [],
      );
    }
  });
});

describe(`admission fuzz (${ITERATIONS} manifests, seed ${SEED})`, () => {
  it(
    "the CRD and the parser agree, and what is admitted renders workloads the API server admits",
    async () => {
      const v = crdVocabulary();
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
        const plan = planPlacement({
          architecture: architectureOf(model),
          numShards: model.spec.experts.shards,
          redundantExperts: model.spec.experts.redundantExperts,
        });
        // Limits under what the pods hold: the reconciler applies nothing (MemoryLimitTooLow).
        if (memoryLimitShortfalls(model, plan).length > 0) continue;
        for (const refusal of await renderRefusals(model, `#${i}`))
          failures.push(`${refusal}\n${text.slice(0, 1200)}`);
        rendered++;
      }
      if (process.env["EM_FUZZ_VERBOSE"]) console.log({ admitted, rendered });
      expect(failures, failures.join("\n\n")).toEqual([]);
    },
    Math.max(120_000, ITERATIONS * 100),
  ); // (~40 ms a manifest here; a long campaign's time)
});
