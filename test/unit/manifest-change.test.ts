// What an edit of the manifest asks of `up --watch`'s processes (src/local/manifest-change.ts,
// ADR 0041): an edit of the gateways' serving flags alone rolls the gateways; one that
// reaches the shards, nats-server, the number of processes or their ports starts everything
// again; one that says the same restarts nothing.
import { describe, expect, it } from "vitest";
import {
  changedFields,
  fieldList,
  liveChangeSummary,
  manifestChange,
} from "../../src/local/manifest-change.ts";
import { tinyManifestWith } from "../support/manifest.ts";

const manifestWith = tinyManifestWith;

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
    ["sampling", "  gateway:\n    sampling: { temperature: 0.3 }", "live", undefined],
    ["limits", "  gateway:\n    limits: { maxModelLen: 512 }", "live", undefined],
    ["the KV cache's size", "  gateway:\n    kvCache: { bytes: 1048576 }", "live", undefined],
    ["the disk tier", "  gateway:\n    kvCache: { diskBytes: 1048576 }", "live", undefined],
    ["the served name", "  servedModelName: other", "live", undefined],
    ["a chat template", "  gateway:\n    chatTemplate: 'x'", "live", undefined],
    ["prompt lookup drafting", "  gateway:\n    speculative: { numTokens: 2 }", "live", undefined],
    [
      "MTP drafting (the plan gets the MTP layer)",
      "  gateway:\n    speculative: { method: mtp }",
      "all",
      /spec\.gateway\.speculative: MTP drafting/,
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
    // (other Secrets for the gateways: the new ones read them from files of their own)
    ["the gateways' TLS", "  gateway:\n    tls: { secretName: gw-tls }", "live", undefined],
    ["the API keys' Secret", "  gateway:\n    apiKeySecret: { name: keys }", "live", undefined],
    ["the log format (every process)", "  logFormat: json", "all", /spec\.logFormat/],
    ["spec.env", "  env: [{ name: A, value: b }]", "all", /spec\.env reaches more/],
  ])("%s", (_name, spec, kind, why) => {
    const after = manifestWith(spec);
    const change = manifestChange(base, after);
    expect(change.kind).toBe(kind);
    if (change.kind === "all") expect(change.why).toMatch(why as RegExp);
    if (change.kind !== "same") expect(change.fields.length).toBeGreaterThan(0);
    if (change.kind === "live") {
      expect(change.roll).toBe(true);
      expect(change.gateways).toBeUndefined();
      expect(change.shardReplicas).toBeUndefined();
    }
  });

  const two = "  gateway:\n    replicas: 2\n";
  const shards = (min: number) => `  experts:\n    replicas: { min: ${min}, max: 3 }\n`;
  const autoscaling = "  autoscaling: { enabled: true }\n";
  it.each([
    [
      "gateways behind the front, 2 to 3",
      two,
      "  gateway:\n    replicas: 3\n",
      { kind: "live", roll: false, gateways: 3 },
    ],
    [
      "gateways, 3 to 2, with a sampling edit: rolled too",
      "  gateway:\n    replicas: 3\n",
      "  gateway:\n    replicas: 2\n    sampling: { temperature: 0.2 }\n",
      { kind: "live", roll: true, gateways: 2 },
    ],
    // (under --watch up's front holds the ports however many gateways run)
    [
      "gateways, 2 to 1",
      two,
      "  gateway:\n    replicas: 1\n",
      { kind: "live", roll: false, gateways: 1 },
    ],
    ["gateways, 1 to 2", "", two, { kind: "live", roll: false, gateways: 2 }],
    [
      "each shard's replicas, 1 to 2",
      shards(1),
      shards(2),
      { kind: "live", roll: false, shardReplicas: 2 },
    ],
    [
      "replicas.max alone: nothing to start or stop",
      "  experts:\n    replicas: { min: 1, max: 2 }\n",
      "  experts:\n    replicas: { min: 1, max: 3 }\n",
      { kind: "live", roll: false },
    ],
    [
      "shard replicas under the autoscaler: its bounds",
      shards(1) + autoscaling,
      shards(2) + autoscaling,
      { kind: "all", why: expect.stringMatching(/autoscaling is on/) },
    ],
    [
      "turning autoscaling on",
      "",
      autoscaling,
      { kind: "all", why: expect.stringMatching(/^spec\.autoscaling/) },
    ],
  ])("scaling: %s", (_name, from, to, want) => {
    const change = manifestChange(manifestWith(from), manifestWith(to));
    expect(change).toMatchObject(want);
    if (change.kind === "live") {
      if (!("gateways" in want)) expect(change.gateways).toBeUndefined();
      if (!("shardReplicas" in want)) expect(change.shardReplicas).toBeUndefined();
    }
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

  it.each([
    ["the image", "  image: example.com/expertmesh:2"],
    ["scheduling", "  scheduling: { nodeSelector: { a: b } }"],
    ["the cluster's NATS", "  nats: { url: nats://elsewhere:4222 }"],
    ["the gateways' Kubernetes rollout", "  gateway:\n    rollingUpdate: { maxSurge: 2 }"],
    ["the shards' resources", "  experts:\n    resources: { requests: { cpu: '2' } }"],
    ["the shards' weights rollout", "  experts:\n    weightsRollout: BlueGreen"],
  ])("a cluster's field alone (%s): nothing up runs changes", (_name, spec) => {
    const change = manifestChange(base, manifestWith(spec));
    expect(change).toMatchObject({ kind: "live", roll: false });
    if (change.kind === "live") expect(liveChangeSummary(change)).toBe("nothing up runs changes");
    // (with --single-process too: the gateway runs nothing differently)
    expect(manifestChange(base, manifestWith(spec), true).kind).toBe("live");
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

describe("liveChangeSummary", () => {
  it.each([
    [{ roll: true }, "rolling the gateways onto it; nats-server and the shards run on"],
    [{ roll: false, gateways: 3 }, "scaling to 3 gateways; nothing restarts"],
    [
      { roll: true, shardReplicas: 2 },
      "rolling the gateways onto it, scaling to 2 replica(s) of each shard; nats-server and the shards run on",
    ],
    [{ roll: false }, "nothing up runs changes"],
  ])("%j", (c, want) => {
    expect(liveChangeSummary({ kind: "live", fields: ["x"], ...c })).toBe(want);
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
