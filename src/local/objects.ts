// The Secrets and ConfigMaps `expertmesh up` can read (ADR 0042): those in the files given with
// -f, beside the DeepSeekModel, as `kubectl apply -f` of the same files would create them in
// the model's namespace. `up` takes from them what the pods would: spec.env's valueFrom keys,
// the gateway's API keys (spec.gateway.apiKeySecret), its serving certificate
// (spec.gateway.tls), the Hub token (spec.model.source.huggingFace.tokenSecret). A reference to
// an object no file holds falls back to this shell's variable, as before.
import { parseAllDocuments } from "yaml";
import { parseDocuments } from "../api/manifest.ts";
import { ExpertMeshError } from "../util/errors.ts";

type Kind = "Secret" | "ConfigMap";

interface Held {
  /** Key -> value (a Secret's data decoded from base64, its stringData as written). */
  data: Map<string, string>;
  /** Where it was read: the file. */
  source: string;
}

/** The Secrets and ConfigMaps of one namespace read from files. */
export class LocalObjects {
  readonly #held = new Map<string, Held>();

  /** The value of `key` of the object `kind`/`name`, and the file it came from. */
  get(kind: Kind, name: string, key: string): { value: string; source: string } | undefined {
    const held = this.#held.get(`${kind}/${name}`);
    const value = held?.data.get(key);
    return held && value !== undefined ? { value, source: held.source } : undefined;
  }

  /** Whether a file holds the object (its key may still be missing). */
  has(kind: Kind, name: string): boolean {
    return this.#held.has(`${kind}/${name}`);
  }

  /** The objects held, as `Kind/name` (sorted). */
  get names(): string[] {
    return [...this.#held.keys()].sort();
  }

  /**
   * Adds the Secrets and ConfigMaps of `text` (YAML, one or more documents; a `kind: List`'s
   * items too) in `namespace` (an object without one is in it, as kubectl apply -n would put
   * it); other kinds are skipped. Throws EM_MANIFEST_INVALID for an object that a cluster
   * would refuse: no name, data that is not a map of strings, a Secret's value not base64.
   */
  add(text: string, source: string, namespace: string): void {
    const docs = parseDocuments(text, source);
    const objects = docs.flatMap((d) =>
      isMap(d) && d["kind"] === "List" && Array.isArray(d["items"]) ? d["items"] : [d],
    );
    for (const o of objects) {
      if (!isMap(o) || (o["kind"] !== "Secret" && o["kind"] !== "ConfigMap")) continue;
      const kind = o["kind"] as Kind;
      const meta = isMap(o["metadata"]) ? o["metadata"] : {};
      const name = meta["name"];
      const bad = (msg: string): never => {
        throw new ExpertMeshError(
          "EM_MANIFEST_INVALID",
          `${source}: ${kind} ${typeof name === "string" ? name : "(no name)"}: ${msg}`,
        );
      };
      if (typeof name !== "string" || name === "") bad("metadata.name is required");
      if ((meta["namespace"] ?? namespace) !== namespace) continue; // (another namespace's)
      const data = new Map<string, string>();
      const strings = (field: string): [string, string][] => {
        const v = o[field];
        if (v === undefined || v === null) return [];
        if (!isMap(v)) return bad(`${field} must be a map of keys to strings`);
        return Object.entries(v).map(([k, s]) =>
          typeof s === "string" ? [k, s] : bad(`${field}.${k} must be a string`),
        );
      };
      if (kind === "Secret") {
        for (const [k, b64] of strings("data")) {
          const compact = b64.replace(/\s+/g, "");
          if (!/^[A-Za-z0-9+/]*={0,2}$/.test(compact) || compact.length % 4 !== 0)
            bad(`data.${k} is not base64 (stringData takes plain text)`);
          data.set(k, Buffer.from(compact, "base64").toString("utf8"));
        }
        // stringData wins over data, as the API server merges them.
        for (const [k, s] of strings("stringData")) data.set(k, s);
      } else {
        for (const [k, s] of strings("data")) data.set(k, s);
      }
      this.#held.set(`${kind}/${name}`, { data, source });
    }
  }
}

/** The Secrets and ConfigMaps of files' texts (path, text), in `namespace`. */
export function objectsOf(texts: readonly [string, string][], namespace: string): LocalObjects {
  const objects = new LocalObjects();
  for (const [file, text] of texts) objects.add(text, file, namespace);
  return objects;
}

function isMap(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Whether YAML `text` holds a DeepSeekModel document (which of up's -f files is the model's). */
export function holdsModel(text: string): boolean {
  try {
    return parseAllDocuments(text).some((d) => {
      const o = d.toJS() as unknown;
      return isMap(o) && o["kind"] === "DeepSeekModel";
    });
  } catch {
    return false;
  }
}
