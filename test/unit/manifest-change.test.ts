// What an edit of the manifest asks of `up --watch`'s processes (src/local/manifest-change.ts,
// ADR 0041): an edit of the gateways' serving flags alone rolls the gateways; one that
// reaches the shards, nats-server, the number of processes or their ports starts everything
// again; one that says the same restarts nothing.
import { describe, expect, it } from "vitest";
import { parseManifest } from "../../src/api/manifest.ts";
import { changedFields, fieldList, manifestChange } from "../../src/local/manifest-change.ts";

/** The tiny model's manifest with `spec` (YAML lines under spec:) added. */
const manifestWith = (spec = "") =>
  parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: tiny, namespace: default }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: weights } } }
${spec}
`);

describe("changedFields", () => {
  it.each([
    ["equal", { a: 1, b: { c: 2 } }, { b: { c: 2 }, a: 1 }, []],
    ["a leaf", { a: 1, b: { c: 2 } }, { a: 1, b: { c: 3 } }, ["b.c"]],
    ["a key added", { a: 1 }, { a: 1, b: { c: 1 } }, ["b"]],
    ["a key removed", { a: 1, b: 2 }, { a: 1 }, ["b"]],
    ["arrays as a whole", { a: [1, 2] }, { a: [1, 3] }, ["a"]],
    ["sorted", { z: 1, a: 1 }, { z: 2, a: 2 }, ["a", "z"]],
    ["an object for a number", { a: 1 }, { a: { b: 1 } }, ["a"]],
  ])("%s", (_name, a, b, want) => {
    expect(changedFields(a, b)).toEqual(want);
  });
});

describe("manifestChange", () => {
  const base = manifestWith();
  it.each([
    ["the same", "", "same", undefined],
    ["sampling", "  gateway:\n    sampling: { temperature: 0.3 }", "gateways", undefined],
    ["limits", "  gateway:\n    limits: { maxModelLen: 512 }", "gateways", undefined],
    ["the KV cache's size", "  gateway:\n    kvCache: { bytes: 1048576 }", "gateways", undefined],
    ["the disk tier", "  gateway:\n    kvCache: { diskBytes: 1048576 }", "gateways", undefined],
    ["the served name", "  servedModelName: other", "gateways", undefined],
    ["a chat template", "  gateway:\n    chatTemplate: 'x'", "gateways", undefined],
    [
      "prompt lookup drafting",
      "  gateway:\n    speculative: { numTokens: 2 }",
      "gateways",
      undefined,
    ],
    [
      "MTP drafting (the plan gets the MTP layer)",
      "  gateway:\n    speculative: { method: mtp }",
      "all",
      /spec\.gateway\.speculative: MTP drafting/,
    ],
    [
      "the gateways' count",
      "  gateway:\n    replicas: 2",
      "all",
      /spec\.gateway\.replicas changes/,
    ],
    ["a port", "  gateway:\n    ports: { http: 9000 }", "all", /spec\.gateway\.ports\.http/],
    ["the gateway's GPUs", "  gateway:\n    gpus: 0", "all", /spec\.gateway\.gpus/],
    [
      "the NATS tier (nats-server's JetStream)",
      "  gateway:\n    kvCache: { remoteBytes: 1048576 }",
      "all",
      /spec\.gateway\.kvCache\.remoteBytes/,
    ],
    ["the shards", "  experts:\n    shards: 2", "all", /spec\.experts\.shards reaches more/],
    ["the log format (every process)", "  logFormat: json", "all", /spec\.logFormat/],
    ["spec.env", "  env: [{ name: A, value: b }]", "all", /spec\.env reaches more/],
  ])("%s", (_name, spec, kind, why) => {
    const after = manifestWith(spec);
    const change = manifestChange(base, after);
    expect(change.kind).toBe(kind);
    if (change.kind === "all") expect(change.why).toMatch(why as RegExp);
    if (change.kind !== "same") expect(change.fields.length).toBeGreaterThan(0);
  });

  it("prefill gateways (spec.gateway.disaggregation) added or changed: everything", () => {
    const tier = "  gateway:\n    kvCache: { remoteBytes: 1048576 }\n";
    const d = (minTokens: number) =>
      manifestWith(`${tier}    disaggregation: { replicas: 1, minPromptTokens: ${minTokens} }`);
    for (const [before, after] of [
      [manifestWith(tier), d(16)],
      [d(16), d(32)],
    ] as const)
      expect(manifestChange(before, after)).toMatchObject({
        kind: "all",
        why: expect.stringMatching(/^spec\.gateway\.disaggregation/),
      });
  });

  it("an edit of the gateways with one of the shards: everything, named by the shards' field", () => {
    const change = manifestChange(
      base,
      manifestWith("  gateway:\n    sampling: { temperature: 0.3 }\n  experts:\n    shards: 2"),
    );
    expect(change).toMatchObject({
      kind: "all",
      why: expect.stringMatching(/^spec\.experts\.shards/),
    });
  });

  it("with --single-process, any edit starts everything again (the gateway is every process)", () => {
    const change = manifestChange(base, manifestWith("  servedModelName: other"), true);
    expect(change).toMatchObject({ kind: "all", why: expect.stringMatching(/--single-process/) });
    expect(manifestChange(base, manifestWith(), true).kind).toBe("same");
  });
});

describe("fieldList", () => {
  it.each([
    [["a"], "a"],
    [["a", "b", "c"], "a, b, c"],
    [["a", "b", "c", "d", "e"], "a, b, c and 2 more"],
  ])("%j", (fields, want) => {
    expect(fieldList(fields)).toBe(want);
  });
});
