import { describe, expect, it } from "vitest";
import { parseManifest } from "../../src/api/manifest.ts";
import { localScaling } from "../../src/local/autoscale.ts";

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
