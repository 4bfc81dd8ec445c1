// Reads the golden fixtures (test/fixtures/golden, made by scripts/golden) and builds the
// tiny checkpoints they were computed from.
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Backend } from "../../src/engine/backend.ts";
import { LocalExperts } from "../../src/engine/experts.ts";
import { heldExperts, loadWeights, type ModelWeights } from "../../src/engine/loader.ts";
import { DeepSeekForward } from "../../src/engine/model.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { writeTinyModel } from "../../src/model/tiny.ts";

export interface Golden {
  checkpoint: { name: string; architecture: string; fp8_dequantized: boolean };
  tolerance: { relative: number };
  prompts: {
    token_ids: number[];
    shape: [number, number];
    max_abs_logit: number;
    logits: Float32Array;
  }[];
  greedy: { prompt_index: number; new_tokens: number; tokens: number[] };
}

export function readGolden(name: "tiny-v2" | "tiny-v3" | "tiny-v3-fp8"): Golden {
  const raw = JSON.parse(
    readFileSync(new URL(`../fixtures/golden/${name}.json`, import.meta.url), "utf8"),
  );
  for (const p of raw.prompts) {
    const bytes = Buffer.from(p.logits_f32_b64, "base64");
    p.logits = new Float32Array(
      bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength),
    );
  }
  return raw as Golden;
}

/** Writes the seed-0 tiny checkpoint a golden came from into a temp folder. */
export async function tinyCheckpointFor(
  name: "tiny-v2" | "tiny-v3" | "tiny-v3-fp8" | "tiny-v3-mtp",
): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), `em-${name}-`));
  await writeTinyModel(dir, {
    arch: name.startsWith("tiny-v2") ? "v2" : "v3",
    preset: "tiny",
    seed: 0,
    fp8: name.endsWith("fp8"),
    mtp: name.endsWith("mtp"),
    shards: 1,
  });
  return dir;
}

/** max |a - b|. */
export function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

/** A single-process model (every expert local) on `backend`. */
export async function localModel(
  modelDir: string,
  backend: Backend,
): Promise<{ weights: ModelWeights; model: DeepSeekForward }> {
  const weights = await loadWeights(await Checkpoint.open(modelDir));
  return {
    weights,
    model: new DeepSeekForward(weights, backend, new LocalExperts(backend, heldExperts(weights))),
  };
}
