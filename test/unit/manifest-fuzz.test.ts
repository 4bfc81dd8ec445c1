// Malformed DeepSeekModel manifests: the examples mutated at random, from a fixed seed, with
// the CRD schema's own field names and enum values (and odd values of every type). Each must
// parse, or be refused with an EM_MANIFEST_* error; one that parses must plan and render its
// workloads (what `expertmesh up` and the operator do next) without any other error.
//
// EM_FUZZ_ITERATIONS (default 1500) and EM_FUZZ_SEED widen a campaign, as in
// test/gateway/fuzz.test.ts.
import { readdirSync, readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { parseAllDocuments, stringify } from "yaml";
import { deepSeekModelCrd } from "../../src/api/crd.ts";
import { architectureOf, parseManifest } from "../../src/api/manifest.ts";
import { planPlacement } from "../../src/moe/placement.ts";
import { desiredObjects, specReplicas } from "../../src/operator/workloads.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";
import { mutate, rng, type Vocabulary } from "../support/fuzz.ts";

const ITERATIONS = Number(process.env["EM_FUZZ_ITERATIONS"] ?? 1500);
const SEED = Number(process.env["EM_FUZZ_SEED"] ?? 20261201);

const dir = new URL("../../examples/", import.meta.url);
const examples = readdirSync(dir)
  .filter((f) => f.endsWith(".yaml"))
  // The DeepSeekModel of each (tiny-storage.yaml holds a PV and PVC too).
  .map(
    (f) =>
      parseAllDocuments(readFileSync(new URL(f, dir), "utf8"))
        .map((d) => d.toJS())
        .find((d) => d?.kind === "DeepSeekModel") as Record<string, unknown> | undefined,
  )
  .filter((d) => d !== undefined);

/** Field names and the values the schema names (enums, defaults) from the CRD's schema. */
function vocabulary(): Vocabulary {
  const fields = new Set<string>();
  const plausible: Record<string, unknown[]> = {};
  const words = new Set<string>();
  const walk = (node: Record<string, any>) => {
    for (const [name, child] of Object.entries<Record<string, any>>(node["properties"] ?? {})) {
      fields.add(name);
      const values = [...(child["enum"] ?? []), ...("default" in child ? [child["default"]] : [])];
      for (const v of values) if (typeof v === "string") words.add(v);
      if (values.length) plausible[name] = [...(plausible[name] ?? []), ...values];
      walk(child);
    }
    if (node["items"]) walk(node["items"]);
    if (typeof node["additionalProperties"] === "object") walk(node["additionalProperties"]);
  };
  walk(deepSeekModelCrd().spec.versions[0].schema.openAPIV3Schema);
  return { fields: [...fields], plausible, words: [...words] };
}

describe(`manifest fuzz (${ITERATIONS} manifests, seed ${SEED})`, () => {
  it("parses or refuses with EM_MANIFEST_*, and what parses plans and renders", () => {
    expect(examples.length).toBeGreaterThanOrEqual(3);
    const v = vocabulary();
    expect(v.fields.length).toBeGreaterThan(50);
    const r = rng(SEED);
    const failures: string[] = [];
    let parsed = 0;
    for (let i = 0; i < ITERATIONS && failures.length < 10; i++) {
      const doc = structuredClone(r.pick(examples)) as Record<string, unknown>;
      mutate(r, v, doc);
      const text = stringify(doc);
      let stage = "parse";
      try {
        const m = parseManifest(text, "fuzz.yaml");
        stage = "plan";
        const plan = planPlacement({
          architecture: architectureOf(m),
          numShards: m.spec.experts.shards,
          redundantExperts: m.spec.experts.redundantExperts,
        });
        stage = "render";
        desiredObjects(m, plan, specReplicas(m, plan));
        parsed++;
      } catch (e) {
        const ok =
          e instanceof ExpertMeshError &&
          stage === "parse" &&
          /^EM_MANIFEST_(PARSE|INVALID)$/.test(e.code);
        if (!ok)
          failures.push(
            `#${i} ${stage}: ${e instanceof ExpertMeshError ? e.code : (e as Error)?.constructor?.name}: ${String((e as Error)?.message).slice(0, 300)}\n${text.slice(0, 1500)}`,
          );
      }
    }
    if (process.env["EM_FUZZ_VERBOSE"]) console.log({ parsed });
    expect(failures, failures.join("\n\n")).toEqual([]);
    // The mutations leave many manifests valid: the later stages run too.
    expect(parsed).toBeGreaterThan(ITERATIONS / 20);
  });
});
