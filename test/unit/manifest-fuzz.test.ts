import { describe, expect, it } from "vitest";
import { stringify } from "yaml";
import { architectureOf, parseManifest } from "../../src/api/manifest.ts";
import { planPlacement } from "../../src/moe/placement.ts";
import { desiredObjects, specReplicas } from "../../src/operator/workloads.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";
import { crdVocabulary, exampleModels, mutate, rng } from "../support/fuzz.ts";

const ITERATIONS = Number(process.env["EM_FUZZ_ITERATIONS"] ?? 1500);
const SEED = Number(process.env["EM_FUZZ_SEED"] ?? 20261201);

const examples = exampleModels();

describe(`manifest fuzz (${ITERATIONS} manifests, seed ${SEED})`, () => {
  it("parses or refuses with EM_MANIFEST_*, and what parses plans and renders", () => {
    expect(examples.length).toBeGreaterThanOrEqual(3);
    const v = crdVocabulary();
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
