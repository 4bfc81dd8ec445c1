import { describe, expect, it } from "vitest";
import { parseManifest } from "../../src/api/manifest.ts";
import { localAutoscalingOff } from "../../src/local/autoscale.ts";

const manifest = (autoscaling: string) =>
  parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m, namespace: ns }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: weights, path: tiny } } }
  experts: { shards: 2, replicas: { min: 1, max: 3 } }
  autoscaling: ${autoscaling}
`);

describe("localAutoscalingOff: whether `up` runs the autoscaler, and why not", () => {
  it.each([
    ["{ enabled: false }", false, null],
    ["{ enabled: false }", true, null],
    ["{ enabled: true }", false, null],
    ["{ enabled: true, mode: operator }", false, null],
    ["{ enabled: true }", true, /--single-process runs no shards/],
    [
      "{ enabled: true, mode: external }",
      false,
      /mode is external: .* shards stay at replicas.min/,
    ],
  ] as const)("autoscaling %s, single process %s", (autoscaling, single, want) => {
    const got = localAutoscalingOff(manifest(autoscaling), single);
    if (want === null) expect(got).toBeNull();
    else expect(got).toMatch(want);
  });
});
