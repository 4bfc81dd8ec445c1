// `allOf` of several schemas as the one schema they all describe (their intersection), so
// that json-schema.ts compiles it as any other. OpenAPI generators and hand-written schemas
// extend a base object so: {"allOf": [{"$ref": "#/$defs/Base"}, {"properties": {...}}]}.
//
// Keyword by keyword: types intersect; properties unite (one written both ways must obey
// both schemas, and a part's additionalProperties applies to the properties the other
// parts add: false forbids them, a schema joins theirs); required unites; lower bounds take
// the highest, upper bounds the lowest; items join; enums intersect (and keep only values
// of the merged type); an anyOf / oneOf in one part distributes over the others
// (allOf [anyOf [A, B], C] is anyOf [allOf [A, C], allOf [B, C]]). What has no schema for
// the intersection is refused: two different patterns, formats, propertyNames or tuples,
// multipleOf values neither of which divides the other, anyOf in two parts, an enum beside
// other constraints than a type. Annotations are taken from the first part that has them.
import { isDeepStrictEqual } from "node:util";
import { isObject } from "../util/objects.ts";

type Schema = Record<string, unknown>;

export interface MergeContext {
  /** The raw schema a `$ref` names (json-schema.ts's $defs), or a failure through `bad`. */
  readonly resolve: (ref: string, at: string) => unknown;
  /** Keywords that only describe (title, description, ...). */
  readonly annotations: ReadonlySet<string>;
  readonly bad: (message: string) => never;
}

/** Parts nested deeper than this (allOf in allOf, $ref to $ref) are refused: a cycle. */
const MAX_DEPTH = 32;

const LOWER = ["minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"];
const UPPER = ["maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"];
/** Kept when every part that has them agrees. */
const SAME = ["pattern", "format", "propertyNames", "prefixItems"];

/** `s` (which has an allOf) as one schema without it. */
export function mergeAllOf(s: Schema, at: string, cx: MergeContext): Schema {
  const parts: Schema[] = [];
  flatten(s, at, 0, parts, cx);
  // An anyOf / oneOf distributes over the rest.
  const branching = parts.filter((p) => Array.isArray(p["anyOf"]) || Array.isArray(p["oneOf"]));
  if (branching.length > 1) cx.bad(`${at}: allOf with anyOf / oneOf in two parts is not supported`);
  if (branching.length === 1) {
    const b = branching[0]!;
    const word = Array.isArray(b["anyOf"]) ? "anyOf" : "oneOf";
    const { [word]: alternatives, ...own } = b;
    const rest = parts.filter((p) => p !== b);
    if (Object.keys(own).some((k) => !cx.annotations.has(k))) rest.push(own);
    return {
      [word]: (alternatives as unknown[]).map((a) => ({ allOf: [a, ...rest] })),
      ...annotationsOf(parts, cx),
    };
  }
  return intersect(parts, at, cx);
}

/** The parts of `s`: its allOf's, their $refs resolved, their own allOfs flattened. */
function flatten(
  s: unknown,
  at: string,
  depth: number,
  out: Schema[],
  cx: MergeContext,
): undefined {
  if (depth > MAX_DEPTH) cx.bad(`${at}: allOf and $ref nest too deep (a cycle?)`);
  if (s === true) return;
  if (s === false) cx.bad(`${at}: allOf with false allows nothing`);
  if (!isObject(s)) return cx.bad(`${at}: a schema must be an object`);
  const { allOf, $ref, ...own } = s;
  if (typeof $ref === "string") flatten(cx.resolve($ref, at), $ref, depth + 1, out, cx);
  else if ($ref !== undefined) cx.bad(`${at}: $ref must be a string`);
  if (allOf !== undefined) {
    if (!Array.isArray(allOf) || allOf.length === 0)
      cx.bad(`${at}: allOf must be a non-empty array of schemas`);
    (allOf as unknown[]).forEach((p, i) => {
      flatten(p, `${at}.allOf[${i}]`, depth + 1, out, cx);
    });
  }
  if (Object.keys(own).length > 0) out.push(own);
}

function annotationsOf(parts: Schema[], cx: MergeContext): Schema {
  const out: Schema = {};
  for (const p of parts)
    for (const [k, v] of Object.entries(p)) if (cx.annotations.has(k) && !(k in out)) out[k] = v;
  return out;
}

/** Parts without allOf, $ref, anyOf or oneOf, as one schema. */
function intersect(parts: Schema[], at: string, cx: MergeContext): Schema {
  const out: Schema = annotationsOf(parts, cx);
  const having = (k: string) => parts.filter((p) => k in p).map((p) => p[k]);
  const done = new Set<string>([...cx.annotations]);

  const types = having("type");
  if (types.length > 0) {
    let common = asTypes(types[0], at, cx);
    for (const t of types.slice(1)) common = commonTypes(common, asTypes(t, at, cx));
    if (common.length === 0) cx.bad(`${at}: allOf of types that have no value in common`);
    out["type"] = common.length === 1 ? common[0] : common;
  }
  done.add("type");

  for (const k of LOWER) {
    const v = numbers(having(k), k, at, cx);
    if (v.length > 0) out[k] = Math.max(...v);
    done.add(k);
  }
  for (const k of UPPER) {
    const v = numbers(having(k), k, at, cx);
    if (v.length > 0) out[k] = Math.min(...v);
    done.add(k);
  }
  const multiples = numbers(having("multipleOf"), "multipleOf", at, cx);
  if (multiples.length > 0) out["multipleOf"] = commonMultiple(multiples, at, cx);
  done.add("multipleOf");

  for (const k of SAME) {
    const v = having(k);
    if (v.some((x) => !isDeepStrictEqual(x, v[0])))
      cx.bad(`${at}: allOf of two different '${k}' is not supported`);
    if (v.length > 0) out[k] = v[0];
    done.add(k);
  }

  if (having("uniqueItems").includes(true)) out["uniqueItems"] = true;
  done.add("uniqueItems");

  const items = having("items");
  if (items.some(Array.isArray)) {
    // Draft 4's tuple form: one such part alone, as prefixItems are.
    if (items.length > 1) cx.bad(`${at}: allOf of tuples is not supported`);
    out["items"] = items[0];
  } else if (items.length > 0) out["items"] = items.length === 1 ? items[0] : { allOf: items };
  done.add("items");

  mergeObject(parts, out, at, cx);
  for (const k of ["properties", "required", "additionalProperties"]) done.add(k);

  // Values: the enums' (and consts') common values, of the merged type.
  const lists = parts.flatMap((p) => [
    ...("const" in p ? [[p["const"]]] : []),
    ...("enum" in p ? [p["enum"]] : []),
  ]);
  if (lists.length > 0) {
    if (lists.some((l) => !Array.isArray(l))) cx.bad(`${at}: enum must be an array`);
    let values = lists[0] as unknown[];
    for (const l of lists.slice(1))
      values = values.filter((v) => (l as unknown[]).some((w) => isDeepStrictEqual(v, w)));
    const constraints = Object.keys(out).filter(
      (k) => !cx.annotations.has(k) && k !== "type" && k !== "required",
    );
    if (constraints.length > 0)
      cx.bad(`${at}: allOf of enum / const and '${constraints[0]}' is not supported`);
    if (out["type"] !== undefined) {
      const allowed = [out["type"]].flat() as string[];
      values = values.filter((v) => allowed.some((t) => valueIsType(v, t)));
      delete out["type"];
    }
    delete out["required"];
    if (values.length === 0) cx.bad(`${at}: allOf whose enums and consts have no value in common`);
    out["enum"] = values;
  }
  done.add("enum");
  done.add("const");

  // Anything else (keywords the compiler refuses, or does not know): kept where the parts
  // agree, for the compiler to take or refuse as it would alone.
  for (const p of parts)
    for (const [k, v] of Object.entries(p)) {
      if (done.has(k)) continue;
      if (k in out && !isDeepStrictEqual(out[k], v))
        cx.bad(`${at}: allOf of two different '${k}' is not supported`);
      out[k] = v;
    }
  return out;
}

/** properties, required and additionalProperties of the parts, into `out`. */
function mergeObject(parts: Schema[], out: Schema, at: string, cx: MergeContext): void {
  const required = new Set<string>();
  for (const p of parts) {
    const r = p["required"];
    if (r === undefined) continue;
    if (!Array.isArray(r) || r.some((k) => typeof k !== "string"))
      cx.bad(`${at}: required must be an array of property names`);
    for (const k of r as string[]) required.add(k);
  }
  const declaring = parts.filter((p) => p["properties"] !== undefined);
  for (const p of declaring)
    if (!isObject(p["properties"])) cx.bad(`${at}: properties must be an object`);
  const extras = parts.filter((p) => p["additionalProperties"] !== undefined);
  if (declaring.length > 0) {
    const names: string[] = [];
    for (const p of declaring)
      for (const k of Object.keys(p["properties"] as Schema)) if (!names.includes(k)) names.push(k);
    const properties: Schema = {};
    for (const k of names) {
      const schemas: unknown[] = [];
      let forbidden = false;
      for (const p of parts) {
        const own = p["properties"] as Schema | undefined;
        if (own && k in own) schemas.push(own[k]);
        else if (p["additionalProperties"] === false) forbidden = true;
        else if (p["additionalProperties"] !== undefined && p["additionalProperties"] !== true)
          schemas.push(p["additionalProperties"]);
      }
      if (forbidden) {
        if (required.has(k))
          cx.bad(
            `${at}: allOf requires property '${k}', which a part with additionalProperties false does not declare`,
          );
        continue;
      }
      properties[k] = schemas.length === 1 ? schemas[0] : { allOf: schemas };
    }
    out["properties"] = properties;
  }
  if (required.size > 0) out["required"] = [...required];
  if (extras.length > 0) {
    const v = extras.map((p) => p["additionalProperties"]);
    out["additionalProperties"] = v.includes(false)
      ? false
      : v.filter((x) => x !== true).length === 0
        ? true
        : v.length === 1
          ? v[0]
          : { allOf: v.filter((x) => x !== true) };
  }
}

function asTypes(t: unknown, at: string, cx: MergeContext): string[] {
  const list = Array.isArray(t) ? t : [t];
  if (list.some((x) => typeof x !== "string")) cx.bad(`${at}: type must be a string or strings`);
  return list as string[];
}

/** Types both allow: integer is a number. */
function commonTypes(a: string[], b: string[]): string[] {
  const out: string[] = [];
  for (const t of a) {
    const both =
      b.includes(t) ||
      (t === "integer" && b.includes("number")) ||
      (t === "number" && b.includes("integer"));
    const type = t === "number" && !b.includes("number") ? "integer" : t;
    if (both && !out.includes(type)) out.push(type);
  }
  return out;
}

function numbers(v: unknown[], k: string, at: string, cx: MergeContext): number[] {
  if (v.some((x) => typeof x !== "number" || !Number.isFinite(x)))
    cx.bad(`${at}: '${k}' must be a number`);
  return v as number[];
}

/** The multipleOf all of them divide, when it is one of them. */
function commonMultiple(v: number[], at: string, cx: MergeContext): number {
  const top = Math.max(...v);
  for (const m of v) {
    const q = top / m;
    if (Math.abs(q - Math.round(q)) > 1e-9)
      cx.bad(
        `${at}: allOf of multipleOf ${m} and ${top} (neither divides the other) is not supported`,
      );
  }
  return top;
}

function valueIsType(v: unknown, t: string): boolean {
  switch (t) {
    case "null":
      return v === null;
    case "integer":
      return Number.isInteger(v);
    case "number":
      return typeof v === "number";
    case "array":
      return Array.isArray(v);
    case "object":
      return typeof v === "object" && v !== null && !Array.isArray(v);
    default:
      return typeof v === t;
  }
}
