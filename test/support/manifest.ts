// Manifests for unit tests: the tiny model's, with lines of its spec added.
import { parseManifest } from "../../src/api/manifest.ts";
import type { DeepSeekModel } from "../../src/api/schema.ts";

/** The tiny model's manifest with `spec` (YAML lines under spec:) added, validated. */
export function tinyManifestWith(spec = ""): DeepSeekModel {
  return parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: tiny, namespace: default }
spec:
  model: { preset: tiny-v3, source: { pvc: { claimName: weights } } }
${spec}
`);
}
