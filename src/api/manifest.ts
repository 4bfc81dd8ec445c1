// Reads and validates `DeepSeekModel` manifests for local use (`expertmesh up`, `plan -f`)
// with the same schema, defaults and cross-field rules the API server applies to the CRD.
import { readFileSync } from "node:fs";
import { Value } from "@sinclair/typebox/value";
import { parseAllDocuments } from "yaml";
import { ExpertMeshError } from "../util/errors.ts";
import { type ModelArchitecture, resolveArchitecture } from "./presets.ts";
import { crossFieldErrors } from "./rules.ts";
import { API_VERSION, type DeepSeekModel, DeepSeekModelSchema, KIND } from "./schema.ts";

export type { DeepSeekModel };
export { API_VERSION, KIND };

/** Reads and validates a manifest file. Throws EM_MANIFEST_READ, _PARSE or _INVALID. */
export function readManifest(path: string): DeepSeekModel {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new ExpertMeshError("EM_MANIFEST_READ", `cannot read ${path}: ${String(err)}`, {
      cause: err,
    });
  }
  return parseManifest(text, path);
}

/** Largest manifest read: a DeepSeekModel is a few KB; YAML's duplicate-key check grows
 * much faster than the text (a 738 KB file of labels took 92 s). */
export const MAX_MANIFEST_BYTES = 256 * 1024;

/**
 * Parses manifest YAML (the one DeepSeekModel of a file; other kinds of documents, a volume
 * say, are skipped) and validates it; `source` names it in messages. Defaults are applied as
 * the API server would.
 */
export function parseManifest(text: string, source = "manifest"): DeepSeekModel {
  if (Buffer.byteLength(text) > MAX_MANIFEST_BYTES)
    throw new ExpertMeshError(
      "EM_MANIFEST_PARSE",
      `${source} is larger than ${MAX_MANIFEST_BYTES / 1024} KiB (${Buffer.byteLength(text)} bytes): not a DeepSeekModel manifest`,
    );
  let docs: unknown[];
  try {
    docs = parseAllDocuments(text).map((d) => {
      if (d.errors.length) throw d.errors[0];
      return d.toJS();
    });
  } catch (err) {
    throw new ExpertMeshError("EM_MANIFEST_PARSE", `${source} is not valid YAML: ${String(err)}`, {
      cause: err,
    });
  }
  const invalid = (field: string, msg: string): never => {
    throw new ExpertMeshError("EM_MANIFEST_INVALID", `${source}: ${field}: ${msg}`);
  };
  const objects = docs.filter(
    (d): d is Record<string, unknown> => typeof d === "object" && d !== null && !Array.isArray(d),
  );
  const models = objects.filter((d) => d["kind"] === KIND);
  if (models.length > 1)
    invalid(
      "(document)",
      `holds ${models.length} ${KIND}s: give one per file (only one would run)`,
    );
  const doc = models[0] ?? objects[0];
  if (!doc) return invalid("(document)", `no ${KIND} found`);
  if (doc["apiVersion"] !== API_VERSION)
    invalid("apiVersion", `must be '${API_VERSION}', got ${JSON.stringify(doc["apiVersion"])}`);
  if (doc["kind"] !== KIND)
    invalid("kind", `must be '${KIND}', got ${JSON.stringify(doc["kind"])}`);
  return validateModel(doc, invalid);
}

/** The first field (dotted path) holding a list where the schema wants an object, if any. */
function listWhereObject(schema: unknown, value: unknown, path: string): string | undefined {
  const s = schema as { type?: unknown; properties?: Record<string, unknown> };
  if (s?.type !== "object" || typeof value !== "object" || value === null) return undefined;
  if (Array.isArray(value)) return path || "(document)";
  for (const [key, sub] of Object.entries(s.properties ?? {})) {
    const found = listWhereObject(
      sub,
      (value as Record<string, unknown>)[key],
      path ? `${path}.${key}` : key,
    );
    if (found) return found;
  }
  return undefined;
}

/** Applies defaults, checks the schema and the cross-field rules; returns a typed copy. */
export function validateModel(
  doc: unknown,
  invalid: (field: string, msg: string) => never,
): DeepSeekModel {
  // Before the defaults: TypeBox's Value.Default merges a list given where an object belongs
  // into that object's defaults (`experts: [- shards: 4]` became the default experts).
  const list = listWhereObject(DeepSeekModelSchema, doc, "");
  if (list) invalid(list, "Expected object (got a list)");
  const value = Value.Default(DeepSeekModelSchema, structuredClone(doc)) as Record<string, any>;
  const first = Value.Errors(DeepSeekModelSchema, value).First();
  if (first) {
    const field = first.path.replace(/^\//, "").replaceAll("/", ".") || "(document)";
    const got = first.value === undefined ? "missing" : `got ${JSON.stringify(first.value)}`;
    invalid(field, `${first.message} (${got})`);
  }
  const cross = crossFieldErrors(value);
  if (cross.length) invalid(cross[0]!.path, cross.map((e) => e.message).join("; "));
  value["metadata"]["namespace"] ??= "default";
  return value as DeepSeekModel;
}

/** The architecture figures of a model: its preset's, or the ones it states. */
export function architectureOf(model: DeepSeekModel): ModelArchitecture {
  const { preset, architecture } = model.spec.model;
  return resolveArchitecture((preset ?? architecture) as string | ModelArchitecture);
}

/** The name clients use for the model. */
export function servedModelName(model: DeepSeekModel): string {
  return model.spec.servedModelName ?? model.metadata.name;
}
