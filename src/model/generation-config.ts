// The model's recommended sampling settings: Hugging Face's generation_config.json, whose
// sampling fields a gateway uses where a request leaves them out, as vLLM does with
// `--generation-config auto`. DeepSeek-V3's and R1's files recommend temperature 0.6 and
// top_p 0.95; without them an OpenAI client that sends no temperature gets 1.
//
// Read: temperature, top_p, top_k, min_p, repetition_penalty (vLLM's list, less
// max_new_tokens, which vLLM applies as a cap on every request's max_tokens: not read).
// do_sample is not read either (vLLM does not: a file's temperature is used as it is).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { ExpertMeshError, formatError } from "../util/errors.ts";

/** Request fields' defaults, named as the HTTP API names them. */
export interface SamplingDefaults {
  readonly temperature?: number;
  readonly top_p?: number;
  readonly top_k?: number;
  readonly min_p?: number;
  readonly repetition_penalty?: number;
}

type Field = keyof SamplingDefaults;

/**
 * The largest repetition_penalty taken (vLLM has no bound): a larger one could push logits
 * to -inf, and a row of them has nothing to sample.
 */
export const MAX_REPETITION_PENALTY = 100;
/**
 * The smallest (vLLM takes any positive one): a positive logit is divided by it, so a smaller
 * one (1e-320) could push it to +inf in float32, and the row's softmax to NaN. The same
 * factor as the largest, the other way.
 */
export const MIN_REPETITION_PENALTY = 1 / MAX_REPETITION_PENALTY;

/** Each field read, with the HTTP API's range for it (KServe's parameters check them too). */
export const SAMPLING_FIELD_RULES: Record<Field, [(v: number) => boolean, string]> = {
  temperature: [(v) => v >= 0 && v <= 2, "in 0..2"],
  top_p: [(v) => v > 0 && v <= 1, "in (0, 1]"],
  top_k: [(v) => Number.isSafeInteger(v) && v >= -1, "an integer >= -1"],
  min_p: [(v) => v >= 0 && v <= 1, "in 0..1"],
  repetition_penalty: [
    (v) => v >= MIN_REPETITION_PENALTY && v <= MAX_REPETITION_PENALTY,
    `in ${MIN_REPETITION_PENALTY}..${MAX_REPETITION_PENALTY}`,
  ],
};

export const SAMPLING_DEFAULT_FIELDS = Object.keys(SAMPLING_FIELD_RULES) as readonly Field[];

const invalid = (message: string) => new ExpertMeshError("EM_GENERATION_CONFIG_INVALID", message);

/**
 * The sampling fields of a parsed generation config (others ignored: the file also holds
 * token ids); null fields are absent. With `strict`, other fields are refused (an override
 * that names something else would otherwise change nothing, silently).
 */
export function samplingDefaults(json: unknown, source: string, strict = false): SamplingDefaults {
  if (typeof json !== "object" || json === null || Array.isArray(json))
    throw invalid(`${source}: not a JSON object`);
  const out: Partial<Record<Field, number>> = {};
  for (const [key, value] of Object.entries(json)) {
    const rule = SAMPLING_FIELD_RULES[key as Field];
    if (!rule) {
      if (strict)
        throw invalid(
          `${source}: '${key}' is not a sampling field read here (${SAMPLING_DEFAULT_FIELDS.join(", ")})`,
        );
      continue;
    }
    if (value === null) continue;
    const [ok, range] = rule;
    if (typeof value !== "number" || !ok(value))
      throw invalid(`${source}: ${key} must be ${range}, got ${JSON.stringify(value)}`);
    out[key as Field] = value;
  }
  return out;
}

/** Where the defaults come from (the gateway's --generation-config). */
export type GenerationConfigSource = "auto" | "none" | { readonly dir: string };

/** --generation-config's value: auto, none, or a folder holding a generation_config.json. */
export function parseGenerationConfigFlag(value: string | undefined): GenerationConfigSource {
  if (value === undefined || value === "auto") return "auto";
  if (value === "none" || value === "vllm") return "none";
  if (value === "") throw new ExpertMeshError("EM_CLI_USAGE", "--generation-config is empty");
  return { dir: value };
}

/**
 * The sampling defaults to serve with: the model folder's generation_config.json (auto; none
 * there: no defaults), none, or another folder's (which must hold one), then the fields of
 * `override` (JSON text, --override-generation-config) over them. `file` is the file read,
 * null when none was.
 */
export function loadSamplingDefaults(
  modelDir: string,
  source: GenerationConfigSource,
  override?: string,
): { defaults: SamplingDefaults; file: string | null } {
  let defaults: SamplingDefaults = {};
  let file: string | null = null;
  if (source !== "none") {
    const path = join(source === "auto" ? modelDir : source.dir, "generation_config.json");
    let text: string | null = null;
    try {
      text = readFileSync(path, "utf8");
    } catch (err) {
      const missing = (err as NodeJS.ErrnoException).code === "ENOENT";
      // A model without one has no recommendations; a folder named for its file must hold it.
      if (!missing || source !== "auto") throw invalid(`cannot read ${path}: ${formatError(err)}`);
    }
    if (text !== null) {
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch (err) {
        throw invalid(`${path} is not JSON: ${formatError(err)}`);
      }
      defaults = samplingDefaults(json, path);
      file = path;
    }
  }
  if (override !== undefined) {
    let json: unknown;
    try {
      json = JSON.parse(override);
    } catch (err) {
      throw invalid(`--override-generation-config is not JSON: ${formatError(err)}`);
    }
    defaults = { ...defaults, ...samplingDefaults(json, "--override-generation-config", true) };
  }
  return { defaults, file };
}

/** "temperature 0.6, top_p 0.95" (for the startup log); "none" when empty. */
export function describeSamplingDefaults(d: SamplingDefaults): string {
  const parts = SAMPLING_DEFAULT_FIELDS.flatMap((k) =>
    d[k] === undefined ? [] : [`${k} ${d[k]}`],
  );
  return parts.length ? parts.join(", ") : "none";
}
