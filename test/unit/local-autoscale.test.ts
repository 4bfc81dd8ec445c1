import { describe, expect, it } from "vitest";
import { parseManifest } from "../../src/api/manifest.ts";
import { localGateways, localScaling } from "../../src/local/autoscale.ts";

const manifest = (autoscaling: string, rebalance = false) =>
  parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m, namespace: ns }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: weights, path: tiny } } }
  experts: { shards: 2, redundantExperts: 2, replicas: { min: 1, max: 3 }, rebalance: { enabled: ${rebalance} } }
  autoscaling: ${autoscaling}
`);

describe("localScaling: whether `up` runs the operator's autoscaler, and what it says", () => {
  it.each([
    ["{ enabled: false }", false, false, false, []],
    ["{ enabled: false }", false, true, false, []],
    ["{ enabled: true }", false, false, true, []],
    ["{ enabled: true, mode: operator }", false, false, true, []],
    ["{ enabled: false }", true, false, true, []],
    [
      "{ enabled: true }",
      false,
      true,
      false,
      [/^spec.autoscaling: --single-process runs no shards/],
    ],
    [
      "{ enabled: true }",
      true,
      true,
      false,
      [/^spec.autoscaling and spec.experts.rebalance: --single-process/],
    ],
    [
      "{ enabled: true, mode: external }",
      false,
      false,
      true,
      [/mode is external: .* replicas.min/],
    ],
    // External mode still rebalances (the autoscaler leaves replicas alone, not plans).
    ["{ enabled: true, mode: external }", true, false, true, [/mode is external/]],
  ] as const)(
    "autoscaling %s, rebalance %s, single process %s",
    (a, rebalance, single, run, notes) => {
      const got = localScaling(manifest(a, rebalance), single);
      expect(got.run).toBe(run);
      expect(got.notes).toHaveLength(notes.length);
      for (const [i, n] of notes.entries()) expect(got.notes[i]).toMatch(n);
    },
  );
});

describe("localGateways: how many gateways `up` starts, and whether it runs its front", () => {
  const gw = (gateway: string, autoscaling = "{ enabled: false }") =>
    parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: weights, path: tiny } } }
  gateway: ${gateway}
  autoscaling: ${autoscaling}
`);
  it.each([
    // (replicas within min and max, at least one; the front when more than one may run)
    ["{}", "{ enabled: false }", false, 1, false],
    ["{ replicas: 2 }", "{ enabled: false }", false, 2, true],
    ["{ replicas: 0, minReplicas: 0 }", "{ enabled: false }", false, 1, false],
    ["{ replicas: 9, maxReplicas: 3 }", "{ enabled: false }", false, 3, true],
    ["{ replicas: 1, minReplicas: 2 }", "{ enabled: false }", false, 2, true],
    ["{}", "{ enabled: true }", false, 1, true],
    ["{ maxReplicas: 1 }", "{ enabled: true }", false, 1, false],
    ["{}", "{ enabled: true, mode: external }", false, 1, false],
    ["{ replicas: 3 }", "{ enabled: true }", true, 1, false],
  ] as const)(
    "gateway %s, autoscaling %s, single %s: %i gateway(s), front %s",
    (g, a, single, initial, front) => {
      const got = localGateways(gw(g, a), single);
      expect(got.initial).toBe(initial);
      expect(got.front).toBe(front);
      expect(got.note !== undefined).toBe(single && g.includes("replicas: 3"));
      // Under up --watch the front holds the ports for one gateway too (rolls without a gap),
      // but --single-process runs none.
      const watched = localGateways(gw(g, a), single, true);
      expect(watched.initial).toBe(initial);
      expect(watched.front).toBe(!single);
    },
  );
});
