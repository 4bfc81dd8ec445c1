// Reads a `DeepSeekModel` manifest (YAML). Minimal for now: the fields the placement planner
// needs. It grows into the CRD types (the CRD is generated from src/api).
import { readFileSync } from "node:fs";
import { parse } from "yaml";
import { ExpertMeshError } from "../util/errors.ts";
import { type ModelArchitecture, resolveArchitecture } from "./presets.ts";

export const API_VERSION = "expertmesh.io/v1alpha1";
export const KIND = "DeepSeekModel";

/** A validated DeepSeekModel, defaults applied. */
export interface DeepSeekModel {
  apiVersion: typeof API_VERSION;
  kind: typeof KIND;
  metadata: { name: string; namespace: string };
  spec: {
    /** Model name clients send in requests (OpenAI `model`); defaults to metadata.name. */
    servedModelName: string;
    model: {
      /** Preset name when the spec names one. */
      preset?: string;
      /** Resolved figures: from the preset or from `spec.model.architecture`. */
      architecture: ModelArchitecture;
    };
    experts: {
      /** Expert shards (each a Deployment `<name>-shard-<k>`). */
      shards: number;
      /** Extra expert slots in total per layer, for EPLB-style replication (default 0). */
      redundantExperts: number;
    };
  };
}

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

/** Parses and validates manifest YAML; `source` names it in messages. */
export function parseManifest(text: string, source = "manifest"): DeepSeekModel {
  let doc: unknown;
  try {
    doc = parse(text);
  } catch (err) {
    throw new ExpertMeshError("EM_MANIFEST_PARSE", `${source} is not valid YAML: ${String(err)}`, {
      cause: err,
    });
  }
  const invalid = (field: string, msg: string): never => {
    throw new ExpertMeshError("EM_MANIFEST_INVALID", `${source}: ${field}: ${msg}`);
  };
  const root = object(doc, "(document)", invalid);
  if (root["apiVersion"] !== API_VERSION) invalid("apiVersion", `must be '${API_VERSION}'`);
  if (root["kind"] !== KIND) invalid("kind", `must be '${KIND}'`);
  const metadata = object(root["metadata"], "metadata", invalid);
  const name = dnsLabel(metadata["name"], "metadata.name", invalid);
  const namespace =
    metadata["namespace"] === undefined
      ? "default"
      : dnsLabel(metadata["namespace"], "metadata.namespace", invalid);
  const spec = object(root["spec"], "spec", invalid);
  const servedModelName = spec["servedModelName"] ?? name;
  if (typeof servedModelName !== "string" || servedModelName === "") {
    invalid("spec.servedModelName", "must be a non-empty string");
  }
  const model = object(spec["model"], "spec.model", invalid);
  const experts = object(spec["experts"], "spec.experts", invalid);
  return {
    apiVersion: API_VERSION,
    kind: KIND,
    metadata: { name, namespace },
    spec: {
      servedModelName: servedModelName as string,
      model: modelSpec(model, invalid),
      experts: {
        shards: integer(experts["shards"], "spec.experts.shards", 1, invalid),
        redundantExperts:
          experts["redundantExperts"] === undefined
            ? 0
            : integer(experts["redundantExperts"], "spec.experts.redundantExperts", 0, invalid),
      },
    },
  };
}

type Invalid = (field: string, msg: string) => never;

function modelSpec(model: Record<string, unknown>, invalid: Invalid) {
  const { preset, architecture } = model;
  if ((preset === undefined) === (architecture === undefined)) {
    invalid("spec.model", "set exactly one of 'preset' or 'architecture'");
  }
  const field = preset !== undefined ? "spec.model.preset" : "spec.model.architecture";
  if (preset !== undefined && typeof preset !== "string") invalid(field, "must be a string");
  try {
    const resolved = resolveArchitecture((preset ?? architecture) as string | ModelArchitecture);
    return preset === undefined
      ? { architecture: resolved }
      : { preset: preset as string, architecture: resolved };
  } catch (err) {
    if (err instanceof ExpertMeshError) return invalid(field, err.message);
    throw err;
  }
}

function object(v: unknown, field: string, invalid: Invalid): Record<string, unknown> {
  if (typeof v !== "object" || v === null || Array.isArray(v)) invalid(field, "must be a mapping");
  return v as Record<string, unknown>;
}

function integer(v: unknown, field: string, min: number, invalid: Invalid): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) {
    invalid(field, `must be an integer >= ${min}, got ${JSON.stringify(v)}`);
  }
  return v as number;
}

/** Kubernetes object names: DNS-1123 labels (lowercase alphanumerics and '-', <= 63). */
function dnsLabel(v: unknown, field: string, invalid: Invalid): string {
  if (typeof v !== "string" || !/^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/.test(v)) {
    invalid(
      field,
      `must be a DNS-1123 label (lowercase letters, digits, '-'), got ${JSON.stringify(v)}`,
    );
  }
  return v as string;
}
