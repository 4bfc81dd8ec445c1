// The CRD in crds/ (and its copy in the Helm chart) is generated from src/api/schema.ts;
// this fails when someone edits one without the other.
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import {
  CRD_FILES,
  deepSeekModelCrd,
  deepSeekModelCrdYaml,
  toStructural,
} from "../../src/api/crd.ts";

const root = new URL("../../", import.meta.url);

/** Every schema node (with its path) of an OpenAPI schema. */
function* nodes(schema: Record<string, any>, path = ""): Generator<[string, Record<string, any>]> {
  yield [path, schema];
  for (const [k, v] of Object.entries(schema["properties"] ?? {}))
    yield* nodes(v as Record<string, any>, `${path}.${k}`);
  if (schema["items"]) yield* nodes(schema["items"], `${path}[]`);
  if (typeof schema["additionalProperties"] === "object")
    yield* nodes(schema["additionalProperties"], `${path}{}`);
}

describe("DeepSeekModel CRD", () => {
  it.each(CRD_FILES)("%s equals what src/api generates (run `expertmesh crd --write`)", (file) => {
    expect(readFileSync(new URL(file, root), "utf8")).toBe(deepSeekModelCrdYaml());
  });

  it("describes every spec field, so kubectl explain is useful", () => {
    const spec = deepSeekModelCrd().spec.versions[0].schema.openAPIV3Schema.properties.spec;
    const undocumented = [...nodes(spec, "spec")]
      .filter(([, s]) => !s["description"])
      .map(([p]) => p);
    expect(undocumented).toEqual([]);
  });

  it("is structural: a type on every node, no anyOf, no patternProperties", () => {
    const schema = deepSeekModelCrd().spec.versions[0].schema.openAPIV3Schema;
    for (const [path, s] of nodes(schema)) {
      if (s["x-kubernetes-int-or-string"] || s["x-kubernetes-preserve-unknown-fields"]) continue;
      expect(s["type"], path).toBeDefined();
      expect(s["anyOf"], path).toBeUndefined();
      expect(s["patternProperties"], path).toBeUndefined();
    }
  });

  it.each([
    [
      {
        anyOf: [
          { const: "a", type: "string" },
          { const: "b", type: "string" },
        ],
        description: "d",
      },
      { type: "string", enum: ["a", "b"], description: "d" },
    ],
    [{ anyOf: [{ type: "integer" }, { type: "string" }] }, { "x-kubernetes-int-or-string": true }],
    [
      { type: "object", patternProperties: { "^(.*)$": { type: "string" } } },
      { type: "object", additionalProperties: { type: "string" } },
    ],
    [
      { type: "number", exclusiveMinimum: 0 },
      { type: "number", minimum: 0, exclusiveMinimum: true },
    ],
    [{ type: "object", properties: {}, additionalProperties: true }, { type: "object" }],
    [
      {
        type: "object",
        required: ["a", "b"],
        properties: { a: { type: "integer", default: 1 }, b: { type: "string" } },
      },
      {
        type: "object",
        required: ["b"],
        properties: { a: { type: "integer", default: 1 }, b: { type: "string" } },
      },
    ],
  ])("converts %j to a structural node", (input, expected) => {
    expect(toStructural(input)).toEqual(expected);
  });
});
