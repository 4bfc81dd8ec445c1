// Seeded mutation of JSON-like values, for fuzz tests (test/gateway/fuzz.test.ts,
// test/unit/manifest-fuzz.test.ts, ...): a failure replays from its seed.
import { readdirSync, readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { deepSeekModelCrd } from "../../src/api/crd.ts";

/** mulberry32: a small seeded generator. */
export function rng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;
  return { next, int, pick };
}
export type Rng = ReturnType<typeof rng>;

/** The vocabulary of what is fuzzed: its field names, and values each takes when valid. */
export interface Vocabulary {
  readonly fields: readonly string[];
  readonly plausible: Readonly<Record<string, readonly unknown[]>>;
  /** Strings that mean something there (roles, enum values...). */
  readonly words: readonly string[];
}

/** A value of any type, often an odd one (extremes, odd strings, wrong shapes). */
export function oddValue(r: Rng, v: Vocabulary, depth = 0): unknown {
  switch (r.int(depth > 2 ? 14 : 18)) {
    case 0:
      return null;
    case 1:
      return r.next() < 0.5;
    case 2:
      return r.pick([-1, 0, 1, 2, 3, 7, 255, 256, 4096]);
    case 3:
      return r.pick([1e308, -1e308, 2 ** 53 + 1, -(2 ** 31), 2 ** 31, 2 ** 32, -0]);
    case 4:
      return r.pick([0.5, -0.5, 1.5, 1e-320, 3.999999]);
    case 5:
      return "";
    case 6:
      return "x".repeat(r.pick([1, 1000, 20_000]));
    case 7:
      return r.pick(["\ud800", "\u0000", "🦊", "NaN", "Infinity", "-1", "1e400", "true"]);
    case 8:
      return r.pick(v.words);
    case 9:
      return [];
    case 10:
      return {};
    case 11:
      return [r.int(300), r.int(300), -5];
    case 12:
      return "[a-z]+";
    case 13:
      return r.pick(["1Gi", "500m", "-1", "0.5", "1e3", "Ki"]);
    case 14:
      return Array.from({ length: r.int(4) }, () => oddValue(r, v, depth + 1));
    case 15:
      return { [r.pick(v.fields)]: oddValue(r, v, depth + 1) };
    case 16:
      return {
        type: r.pick(v.words),
        [r.pick(v.fields)]: fieldValue(r, v, r.pick(v.fields), depth + 1),
      };
    default:
      return Array.from({ length: 2 }, () => ({ [r.pick(v.fields)]: oddValue(r, v, depth + 1) }));
  }
}

/** A value for `field`: mostly one it takes when valid, else an odd one. */
export function fieldValue(r: Rng, v: Vocabulary, field: string, depth = 0): unknown {
  const plausible = v.plausible[field];
  return plausible && r.next() < 0.7 ? structuredClone(r.pick(plausible)) : oddValue(r, v, depth);
}

/** Containers in `value` (objects and arrays), with the value itself first. */
function containers(value: unknown, out: (Record<string, unknown> | unknown[])[] = []) {
  // Byte buffers are values, not containers.
  if (value && typeof value === "object" && !ArrayBuffer.isView(value)) {
    out.push(value as Record<string, unknown>);
    for (const x of Object.values(value)) containers(x, out);
  }
  return out;
}

/**
 * Mutates `body` in place: now and then only valid fields added at its top (the features'
 * combinations, not their refusals); else one to three edits anywhere in it (a value
 * replaced, a field added or removed, an array item added or removed).
 */
export function mutate(r: Rng, v: Vocabulary, body: Record<string, unknown>): void {
  const valid = Object.keys(v.plausible);
  if (r.next() < 0.3 && valid.length > 0) {
    for (let i = 1 + r.int(4); i > 0; i--) {
      const field = r.pick(valid);
      body[field] = structuredClone(r.pick(v.plausible[field]!));
    }
    return;
  }
  const steps = 1 + r.int(3);
  for (let i = 0; i < steps; i++) {
    const c = r.pick(containers(body));
    const keys = Object.keys(c);
    const op = r.int(4);
    if (Array.isArray(c)) {
      if (op === 0 && c.length) c.splice(r.int(c.length), 1);
      else if (op === 1) c.push(oddValue(r, v));
      else if (c.length) c[r.int(c.length)] = oddValue(r, v);
    } else if (op === 0 && keys.length) delete c[r.pick(keys)];
    else if (op === 1 || !keys.length) {
      const field = r.pick(v.fields);
      c[field] = fieldValue(r, v, field);
    } else {
      const key = r.pick(keys);
      c[key] = fieldValue(r, v, key);
    }
  }
}

/** The DeepSeekModel of each manifest in examples/ (tiny-storage.yaml holds none). */
export function exampleModels(): Record<string, unknown>[] {
  const dir = new URL("../../examples/", import.meta.url);
  return readdirSync(dir)
    .filter((f) => f.endsWith(".yaml"))
    .map((f) =>
      parseAllDocuments(readFileSync(new URL(f, dir), "utf8"))
        .map((d) => d.toJS())
        .find((d) => d?.kind === "DeepSeekModel"),
    )
    .filter((d): d is Record<string, unknown> => d !== undefined);
}

/** Field names, and the values the schema names (enums, defaults), of the CRD's schema. */
export function crdVocabulary(): Vocabulary {
  const fields = new Set<string>();
  const plausible: Record<string, unknown[]> = {};
  const words = new Set<string>();
  const walk = (node: Record<string, any>) => {
    for (const [name, child] of Object.entries<Record<string, any>>(node["properties"] ?? {})) {
      fields.add(name);
      const values = [...(child["enum"] ?? []), ...("default" in child ? [child["default"]] : [])];
      for (const v of values) if (typeof v === "string") words.add(v);
      if (values.length) plausible[name] = [...(plausible[name] ?? []), ...values];
      walk(child);
    }
    if (node["items"]) walk(node["items"]);
    if (typeof node["additionalProperties"] === "object") walk(node["additionalProperties"]);
  };
  walk(deepSeekModelCrd().spec.versions[0].schema.openAPIV3Schema);
  return { fields: [...fields], plausible, words: [...words] };
}
