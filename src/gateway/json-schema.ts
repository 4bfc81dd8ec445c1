// Structured outputs (OpenAI's response_format {"type": "json_schema", "json_schema":
// {"name", "schema"}}): the output is one JSON object valid against the schema, by
// constrained decoding (grammar.ts) over an automaton compiled from it.
//
// The subset, OpenAI's strict mode's and a little more (docs/gateway.md lists it):
// - objects: with `properties`, written in the schema's order, the `required` ones always,
//   the others where the model writes them, nothing else; without them, a map when
//   `additionalProperties` is a schema (keys under `propertyNames`, at most
//   `maxProperties`) or with one `patternProperties` (keys matching it, values of its
//   schema), `{}` when it is false, any object otherwise;
// - arrays: `items`, `minItems` / `maxItems`, tuples (`prefixItems`, draft 4's `items`
//   array), `uniqueItems` of constants, `contains` with `minContains` (items of its
//   intersection with theirs);
// - `type` (one or several), `enum` / `const` of strings, numbers, booleans and null,
//   `anyOf` of any alternatives (every reading the output allows is followed:
//   SchemaState), `oneOf` of alternatives with different first bytes or a discriminator,
//   `allOf` (several: their intersection, json-schema-allof.ts), `$ref` into `$defs` /
//   `definitions` (recursion included);
// - strings' `pattern`, `format`, `minLength`, `maxLength` (json-string.ts); numbers'
//   `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `multipleOf`
//   (json-number.ts).
// A schema without a type is any JSON value (json-mode.ts's automaton). Annotations
// (`description`, `title`, `default`, ...) are ignored; any other keyword is refused (400)
// rather than not enforced.

import { isObject } from "../util/objects.ts";
import { ApiError } from "./errors.ts";
import { type ByteAutomaton, GrammarCache, TokenGrammar, type Vocabulary } from "./grammar.ts";
import {
  isDigit,
  isWs,
  type JsonState,
  isDone as jsonDone,
  step as jsonStep,
  MAX_WHITESPACE,
  Mode,
  stringLocal,
} from "./json-mode.ts";
import {
  canEnd,
  continuesNumber,
  type NumberRule,
  type NumberState,
  numberKey,
  numberRule,
  stepNumber,
} from "./json-number.ts";
import { mergeAllOf } from "./json-schema-allof.ts";
import { CLOSED, StringRule, type StringState } from "./json-string.ts";
import { choicePattern, compilePattern, FORMAT_PATTERNS, type Nfa, RegexError } from "./regex.ts";

type Node =
  /** Properties in the schema's order; `required[i]`: property i must be written. */
  | { kind: "object"; id: number; keys: Uint8Array[]; props: NodeRef[]; required: boolean[] }
  /**
   * Item i is of `prefix[i]` (prefixItems, a tuple), the ones after it of `items`; `unique`:
   * items (literals) not repeated (uniqueItems); `contains`: at least `min` items are also of
   * the contains schema (their intersections with it: `prefix[i]`, `items`).
   */
  | {
      kind: "array";
      id: number;
      prefix: NodeRef[];
      items: NodeRef;
      min: number;
      max: number;
      unique: boolean;
      contains: {
        prefix: (NodeRef | null)[];
        items: NodeRef | null;
        min: number;
        /** Places from item i on that can count (null in prefix and items: none). */
        room: (i: number) => number;
      } | null;
    }
  /**
   * An object of any keys (of `keys`: propertyNames), every value of `values`
   * (additionalProperties), at most `max` of them (maxProperties).
   */
  | { kind: "map"; id: number; values: NodeRef; keys: StringRule | null; max: number }
  /** rule null: any string / number. */
  | { kind: "string"; id: number; rule: StringRule | null }
  | { kind: "number" | "integer"; id: number; rule: NumberRule | null }
  | { kind: "any" | "anyObject"; id: number }
  /** JSON texts of the allowed values (booleans and null are literals too). */
  | { kind: "literal"; id: number; values: Uint8Array[] }
  /** `exclusive`: oneOf (its alternatives must not overlap: compileSchema checks). */
  | { kind: "anyOf"; id: number; options: NodeRef[]; exclusive: boolean };

/** A node, resolved on first use ($ref cycles are fine). */
type NodeRef = () => Node;

const ANNOTATIONS = new Set([
  "description",
  "title",
  "default",
  "examples",
  "$schema",
  "$id",
  "$comment",
  "required",
  "strict",
  "$defs",
  "definitions",
  "deprecated",
  // OpenAPI's (Pydantic writes it beside a discriminated union's oneOf).
  "discriminator",
  "readOnly",
  "writeOnly",
]);
/** Annotations that do not change an intersection (`required` does: allOf unites them). */
const DESCRIBING = new Set([...ANNOTATIONS].filter((k) => k !== "required"));
/** Keywords of strings (json-string.ts) and numbers (json-number.ts). */
const STRING_KEYWORDS = ["pattern", "format", "minLength", "maxLength"];
const NUMBER_KEYWORDS = [
  "minimum",
  "maximum",
  "exclusiveMinimum",
  "exclusiveMaximum",
  "multipleOf",
];
const KNOWN = new Set([
  ...ANNOTATIONS,
  // Several: their intersection (json-schema-allof.ts).
  "allOf",
  "type",
  "properties",
  "items",
  "enum",
  "const",
  "minItems",
  "maxItems",
  "prefixItems",
  "additionalProperties",
  "propertyNames",
  "patternProperties",
  "minProperties",
  "maxProperties",
  "uniqueItems",
  "contains",
  "minContains",
  ...STRING_KEYWORDS,
  ...NUMBER_KEYWORDS,
  "anyOf",
  "oneOf",
  "$ref",
]);

/** What a schema does not allow or the subset does not cover (compileSchema makes it a 400). */
class SchemaError extends Error {}

const bad = (message: string): never => {
  throw new SchemaError(message);
};

/** Where a schema came from, for the 400 it may cause. */
export interface SchemaSource {
  /** The request field the error names. */
  readonly param: string;
  /** How messages name the schema. */
  readonly label: string;
}

const RESPONSE_FORMAT: SchemaSource = {
  param: "response_format",
  label: "response_format json_schema",
};

export interface CompileOptions {
  /** Keywords outside the subset are not enforced rather than refused. */
  readonly lenient?: boolean;
  /**
   * The vocabulary's longest token in bytes: string states whose lengths differ only
   * further ahead than one token can reach share a key (json-string.ts). Without it every
   * length is its own state (exact, more masks).
   */
  readonly tokenBytes?: number;
}

/**
 * Compiles `schema`; throws 400 (EM_GATEWAY_BAD_REQUEST) for what is not supported. With
 * `lenient`, keywords outside the subset (`pattern`, `minimum`, ...) are not enforced
 * rather than refused: the value is written by the rest of its schema.
 */
export function compileSchema(
  schema: unknown,
  source: SchemaSource = RESPONSE_FORMAT,
  o: CompileOptions = {},
): SchemaAutomaton {
  try {
    return build(schema, o);
  } catch (err) {
    if (!(err instanceof SchemaError)) throw err;
    throw new ApiError("EM_GATEWAY_BAD_REQUEST", `${source.label}: ${err.message}`, {
      param: source.param,
    });
  }
}

function build(schema: unknown, o: CompileOptions): SchemaAutomaton {
  const lenient = o.lenient ?? false;
  if (!isObject(schema)) bad("schema must be an object");
  let nextId = 0;
  const defs =
    (schema as Record<string, unknown>)["$defs"] ??
    (schema as Record<string, unknown>)["definitions"];
  const byRef = new Map<string, Node>();
  const compile = (s: unknown, at: string): Node => {
    if (s === true || (isObject(s) && isAny(s))) return { kind: "any", id: nextId++ };
    if (!isObject(s)) return bad(`${at}: a schema must be an object`);
    if (!lenient)
      for (const k of Object.keys(s)) if (!KNOWN.has(k)) bad(`${at}: '${k}' is not supported`);
    const all = s["allOf"];
    const ref = s["$ref"];
    const alone = Object.keys(s).every((k) => k === "allOf" || k === "$ref" || DESCRIBING.has(k));
    if (typeof ref === "string" && all === undefined && alone) return resolve(ref, at);
    // One schema in allOf is that schema (Pydantic wraps a nested model's $ref so): compiled
    // as itself, so that a $ref in it may recur.
    if (Array.isArray(all) && all.length === 1 && alone && ref === undefined)
      return compile(all[0], `${at}.allOf[0]`);
    // Several, or beside other keywords (a $ref's siblings too): their intersection
    // (json-schema-allof.ts).
    if (all !== undefined || ref !== undefined) {
      const merged = kept(() =>
        mergeAllOf(s, at, { resolve: rawRef, annotations: DESCRIBING, bad }),
      );
      if (merged) return compile(merged, at);
      // Lenient, and no schema for the intersection: the $ref, or the rest without allOf.
      if (typeof ref === "string") return resolve(ref, at);
      const { allOf: _, $ref: _ref, ...rest } = s;
      return compile(rest, at);
    }
    if ("const" in s) return literal([s["const"]], at);
    if (Array.isArray(s["enum"])) return literal(s["enum"], at);
    const alternatives = s["anyOf"] ?? s["oneOf"];
    const exclusive = s["anyOf"] === undefined;
    if (Array.isArray(alternatives)) {
      const id = nextId++;
      const word = exclusive ? "oneOf" : "anyOf";
      if (alternatives.length === 0) bad(`${at}: an empty ${word} allows nothing`);
      const options = alternatives.map((a, i) => lazy(a, `${at}.${word}[${i}]`));
      return { kind: "anyOf", id, options, exclusive };
    }
    const type = s["type"];
    if (Array.isArray(type)) {
      const id = nextId++;
      const options = type.map((t) => lazy({ ...s, type: t }, at));
      return { kind: "anyOf", id, options, exclusive: false };
    }
    switch (type) {
      case "object": {
        const props = s["properties"];
        // Without properties: any object, none (false), or any keys with values of a schema.
        // With them, only they are written, whatever additionalProperties allows besides.
        const extra = s["additionalProperties"];
        const count = (k: string, fallback: number): number => {
          const v = s[k] ?? fallback;
          if (v !== fallback && (!Number.isInteger(v) || (v as number) < 0))
            bad(`${at}: '${k}' must be an integer >= 0`);
          return v as number;
        };
        const minProps = count("minProperties", 0);
        const maxProps = count("maxProperties", Number.POSITIVE_INFINITY);
        const names = s["propertyNames"];
        const keyRule =
          names === undefined
            ? null
            : kept(() => namesRule(names, `${at}.propertyNames`, o.tokenBytes));
        const patterns = s["patternProperties"];
        if (patterns !== undefined) {
          // One pattern: the keys written match it (a search, as JSON Schema's patterns are)
          // and their values follow its schema; keys additionalProperties would allow besides
          // are not written. Several, or beside properties or propertyNames: refused.
          if (!isObject(patterns)) return bad(`${at}.patternProperties must be an object`);
          const entries = Object.entries(patterns);
          if (entries.length === 1 && props === undefined && names === undefined) {
            if (minProps > 0 && !lenient)
              bad(`${at}: minProperties on an object without properties is not supported`);
            const [pattern, values] = entries[0]!;
            const where = `${at}.patternProperties[${JSON.stringify(pattern)}]`;
            return {
              kind: "map",
              id: nextId++,
              values: lazy(values, where),
              keys: kept(() => namesRule({ type: "string", pattern }, where, o.tokenBytes)),
              max: maxProps,
            };
          }
          if (!lenient)
            bad(
              `${at}: patternProperties is supported as one pattern, without properties or propertyNames`,
            );
        }
        if (props === undefined && extra === false) {
          if (minProps > 0) bad(`${at}: minProperties above 0 with additionalProperties false`);
          return { kind: "object", id: nextId++, keys: [], props: [], required: [] };
        }
        if (props === undefined) {
          // Duplicate keys would make the object smaller than the keys written: not counted.
          if (minProps > 0 && !lenient)
            bad(`${at}: minProperties on an object without properties is not supported`);
          if ((isObject(extra) && !isAny(extra)) || keyRule || Number.isFinite(maxProps))
            return {
              kind: "map",
              id: nextId++,
              values: lazy(isObject(extra) ? extra : true, `${at}.additionalProperties`),
              keys: keyRule,
              max: maxProps,
            };
          return { kind: "anyObject", id: nextId++ };
        }
        if (!isObject(props)) return bad(`${at}.properties must be an object`);
        const keys = Object.keys(props);
        const required = s["required"] ?? [];
        if (!Array.isArray(required) || required.some((k) => typeof k !== "string"))
          return bad(`${at}.required must be an array of property names`);
        for (const k of required)
          if (!keys.includes(k))
            bad(`${at}.required names '${k}', which is not among its properties`);
        // With properties, only they are written: the counts and names must hold for any
        // subset the schema allows (the required ones up to all).
        if ((minProps > required.length || maxProps < keys.length) && !lenient)
          bad(
            `${at}: minProperties / maxProperties that the properties and required do not decide are not supported`,
          );
        if (keyRule && !lenient)
          for (const k of keys)
            if (!keyRule.matches(k)) bad(`${at}: property '${k}' is not allowed by propertyNames`);
        return {
          kind: "object",
          id: nextId++,
          keys: keys.map((k) => utf8(JSON.stringify(k))),
          props: keys.map((k) => lazy(props[k], `${at}.properties.${k}`)),
          required: keys.map((k) => required.includes(k)),
        };
      }
      case "array": {
        const min = s["minItems"] ?? 0;
        let max = s["maxItems"] ?? Number.POSITIVE_INFINITY;
        // A tuple: prefixItems (draft 2020), or items as an array (draft 4-2019).
        const tuple = s["prefixItems"] ?? (Array.isArray(s["items"]) ? s["items"] : []);
        if (!Array.isArray(tuple)) return bad(`${at}.prefixItems must be an array of schemas`);
        const rest = Array.isArray(s["items"]) ? true : (s["items"] ?? true);
        // items false: nothing after the tuple.
        if (rest === false) max = Math.min(max as number, tuple.length);
        if (
          !Number.isInteger(min) ||
          (max !== Number.POSITIVE_INFINITY && !Number.isInteger(max)) ||
          (min as number) > (max as number)
        )
          bad(`${at}: minItems / maxItems must be integers, minItems <= maxItems`);
        const prefix = tuple.map((t, i) => lazy(t, `${at}.prefixItems[${i}]`));
        const items = lazy(rest === false ? true : rest, `${at}.items`);
        // uniqueItems: enforced where the items are constants (enum, const, boolean), each
        // written at most once; other items would need every value written kept.
        const unique =
          s["uniqueItems"] === true && kept(() => uniqueOf(prefix, items(), at)) !== null;
        if (unique) {
          const n = (items() as Node & { kind: "literal" }).values.length;
          if ((min as number) > n) bad(`${at}: minItems ${min} with ${n} distinct items allowed`);
          max = Math.min(max as number, n);
        }
        // contains (minContains, default 1): that many items are written as the intersection
        // of their schema and contains' (json-schema-allof.ts), the others as their own.
        const contains = kept(() => {
          const c = s["contains"];
          if (c === undefined) return null;
          const least = s["minContains"] ?? 1;
          if (!Number.isInteger(least) || (least as number) < 0)
            bad(`${at}: minContains must be an integer >= 0`);
          if ((least as number) > (max as number))
            bad(`${at}: minContains ${least} is more than the ${max} items allowed`);
          if (least === 0) return null; // (nothing to enforce)
          if (unique) bad(`${at}: contains with uniqueItems is not supported`);
          // A place whose schema has no value in common with contains' cannot count (null).
          const both = (item: unknown, where: string): NodeRef | null => {
            try {
              return lazy(item === true ? c : { allOf: [item, c] }, `${where} and ${at}.contains`);
            } catch (err) {
              if (err instanceof SchemaError) return null;
              throw err;
            }
          };
          const counted = {
            prefix: tuple.map((t, i) => both(t, `${at}.prefixItems[${i}]`)),
            items: rest === false ? null : both(rest, `${at}.items`),
            min: least as number,
          };
          // Places that can count, from item i on (to maxItems).
          const after = (i: number) =>
            counted.prefix.slice(i).filter((p) => p !== null).length +
            (counted.items === null
              ? 0
              : Math.max(0, (max as number) - Math.max(i, counted.prefix.length)));
          if (after(0) < (least as number))
            bad(
              `${at}: contains: fewer than ${least} items can be of both their schema and contains'`,
            );
          return { ...counted, room: after };
        });
        return {
          kind: "array",
          id: nextId++,
          prefix,
          items,
          min: Math.max(min as number, contains?.min ?? 0),
          max: max as number,
          unique,
          contains,
        };
      }
      case "string":
        return {
          kind: "string",
          id: nextId++,
          rule: kept(() => stringRule(s, at, o.tokenBytes)),
        };
      case "number":
      case "integer": {
        const rule = kept(() => numberRule(s, type === "integer", (m) => bad(`${at}: ${m}`)));
        return { kind: type, id: nextId++, rule };
      }
      case "boolean":
        return literal([true, false], at);
      case "null":
        return literal([null], at);
      case undefined: {
        // Any value, but a string, number, object or array one would have to obey these.
        const k = [...STRING_KEYWORDS, ...NUMBER_KEYWORDS, "prefixItems"].find((k) => k in s);
        if (k && !lenient) bad(`${at}: '${k}' needs a "type"`);
        const extra = s["additionalProperties"];
        if (!lenient && (extra === false || (isObject(extra) && !isAny(extra))))
          bad(`${at}: 'additionalProperties' needs "type": "object"`);
        return { kind: "any", id: nextId++ };
      }
      default:
        return bad(`${at}: type ${JSON.stringify(type)} is not a JSON Schema type`);
    }
  };
  // A string's or number's keywords: refused when they cannot be enforced, or (lenient) not
  // enforced.
  const kept = <R>(rule: () => R | null): R | null => {
    try {
      return rule();
    } catch (err) {
      if (lenient && err instanceof SchemaError) return null;
      throw err;
    }
  };
  const literal = (values: unknown[], at: string): Node => {
    if (values.length === 0) bad(`${at}: an empty enum allows nothing`);
    for (const v of values)
      if (v !== null && !["string", "number", "boolean"].includes(typeof v))
        bad(`${at}: enum and const values must be strings, numbers, booleans or null`);
    return { kind: "literal", id: nextId++, values: values.map((v) => utf8(JSON.stringify(v))) };
  };
  /** The schema `ref` names, as written. */
  const rawRef = (ref: string, at: string): unknown => {
    const m = /^#\/(\$defs|definitions)\/([^/]+)$/.exec(ref);
    if (!m || !isObject(defs) || !(m[2]! in defs))
      return bad(`${at}: $ref ${ref} does not name one of the schema's $defs`);
    return (defs as Record<string, unknown>)[m[2]!];
  };
  const resolve = (ref: string, at: string): Node => {
    const m = /^#\/(\$defs|definitions)\/([^/]+)$/.exec(ref);
    if (!m || !isObject(defs) || !(m[2]! in defs))
      return bad(`${at}: $ref ${ref} does not name one of the schema's $defs`);
    let node = byRef.get(ref);
    if (!node) {
      // Registered before compiling, so a recursive reference finds it.
      const target = (defs as Record<string, unknown>)[m[2]!];
      const placeholder = { kind: "any", id: -1 } as Node;
      byRef.set(ref, placeholder);
      node = compile(target, ref);
      Object.assign(placeholder, node);
      node = placeholder;
    }
    return node;
  };
  // Compiled now (errors at request time), referenced through a function ($ref cycles).
  const lazy = (s: unknown, at: string): NodeRef => {
    const node = compile(s, at);
    return () => node;
  };
  const root = compile(schema, "schema");
  if (root.kind !== "object" && root.kind !== "anyObject" && root.kind !== "map")
    bad("the root must be an object schema");
  // A oneOf's alternatives must not both match a value.
  checkAnyOf(root, new Set());
  return new SchemaAutomaton(root);
}

/** Whether uniqueItems can be enforced: items that are constants, no tuple (else 400). */
function uniqueOf(prefix: NodeRef[], items: Node, at: string): true {
  if (prefix.length > 0 || items.kind !== "literal")
    bad(`${at}: uniqueItems is supported where the items are constants (enum, const, boolean)`);
  return true;
}

/** The rule of an object's keys (propertyNames: a string schema, or an enum of strings). */
function namesRule(s: unknown, at: string, tokenBytes?: number): StringRule | null {
  if (s === true || (isObject(s) && isAny(s))) return null;
  if (!isObject(s)) return bad(`${at} must be a schema`);
  const values = "const" in s ? [s["const"]] : s["enum"];
  if (Array.isArray(values)) {
    if (values.length === 0 || values.some((v) => typeof v !== "string"))
      bad(`${at}: enum / const must be strings`);
    const nfa = compilePattern(choicePattern(values as string[]), { fullMatch: true });
    return new StringRule(nfa, 0, Number.POSITIVE_INFINITY, tokenBytes);
  }
  for (const k of Object.keys(s))
    if (!ANNOTATIONS.has(k) && k !== "type" && !STRING_KEYWORDS.includes(k))
      bad(`${at}: '${k}' is not supported (a string schema's keywords are)`);
  if (s["type"] !== undefined && s["type"] !== "string") bad(`${at}: keys are strings`);
  return stringRule(s, at, tokenBytes);
}

/** A string schema's rule (pattern or format, minLength, maxLength); null when it has none. */
function stringRule(
  s: Record<string, unknown>,
  at: string,
  tokenBytes: number | undefined,
): StringRule | null {
  const length = (k: string, fallback: number): number => {
    const v = s[k] ?? fallback;
    if (!Number.isInteger(v) || (v as number) < 0) bad(`${at}: '${k}' must be an integer >= 0`);
    return v as number;
  };
  const min = length("minLength", 0);
  const max = s["maxLength"] === undefined ? Number.POSITIVE_INFINITY : length("maxLength", 0);
  if (min > max) bad(`${at}: minLength is above maxLength`);
  const { pattern, format } = s;
  if (pattern !== undefined && format !== undefined)
    bad(`${at}: 'pattern' and 'format' together are not supported`);
  let nfa: Nfa | null = null;
  try {
    if (pattern !== undefined) {
      if (typeof pattern !== "string") bad(`${at}: 'pattern' must be a string`);
      nfa = compilePattern(pattern as string);
    } else if (format !== undefined) {
      const source = typeof format === "string" ? FORMAT_PATTERNS[format] : undefined;
      if (source === undefined)
        bad(
          `${at}: format ${JSON.stringify(format)} is not supported (${Object.keys(FORMAT_PATTERNS).join(", ")} are)`,
        );
      nfa = compilePattern(source!);
    }
  } catch (err) {
    if (err instanceof RegexError) bad(`${at}.pattern: ${err.message}`);
    throw err;
  }
  if (!nfa && min === 0 && max === Number.POSITIVE_INFINITY) return null;
  try {
    return new StringRule(nfa, min, max, tokenBytes);
  } catch (err) {
    if (err instanceof RangeError) bad(`${at}: ${err.message}`);
    throw err;
  }
}

/** The bytes a value of `node` may start with. */
function firstBytes(node: Node, seen: Set<Node> = new Set()): Set<number> {
  if (seen.has(node)) return new Set();
  seen.add(node);
  const digits = [0x2d, ...Array.from({ length: 10 }, (_, i) => 0x30 + i)];
  switch (node.kind) {
    case "object":
    case "anyObject":
    case "map":
      return new Set([0x7b]);
    case "array":
      return new Set([0x5b]);
    case "string":
      return new Set([0x22]);
    case "number":
    case "integer":
      return new Set(digits);
    case "literal":
      return new Set(node.values.map((v) => v[0]!));
    case "any":
      return new Set([0x7b, 0x5b, 0x22, 0x74, 0x66, 0x6e, ...digits]);
    case "anyOf":
      return new Set(node.options.flatMap((o) => [...firstBytes(o(), seen)]));
  }
}

function checkAnyOf(node: Node, seen: Set<Node>): void {
  if (seen.has(node)) return;
  seen.add(node);
  if (node.kind === "anyOf") noLeftCycle(node, new Set());
  // A oneOf's alternatives may overlap only where a first byte or a discriminator (a
  // required property of constant values, different in each) tells them apart.
  if (node.kind === "anyOf" && node.exclusive && !discriminated(node.options.map((o) => o()))) {
    const taken = new Set<number>();
    for (const o of node.options) {
      const first = firstBytes(o());
      for (const b of first)
        if (taken.has(b))
          bad(
            `oneOf alternatives that can start alike (${JSON.stringify(String.fromCharCode(b))}) and have no discriminator (a required property of different const values) are not supported; anyOf is`,
          );
      for (const b of first) taken.add(b);
    }
  }
  const children =
    node.kind === "object"
      ? node.props
      : node.kind === "array"
        ? [
            node.items,
            ...node.prefix,
            ...(node.contains
              ? [node.contains.items, ...node.contains.prefix].filter((c) => c !== null)
              : []),
          ]
        : node.kind === "map"
          ? [node.values]
          : node.kind === "anyOf"
            ? node.options
            : [];
  for (const c of children) checkAnyOf(c(), seen);
}

/**
 * An alternative that is, through $refs, the anyOf it is in (`x: anyOf [.., $ref x]`) would
 * be chosen forever before any byte: refused.
 */
function noLeftCycle(node: Node, path: Set<Node>): void {
  if (node.kind !== "anyOf") return;
  if (path.has(node))
    bad("an anyOf / oneOf that is its own alternative (through $ref) is not supported");
  path.add(node);
  for (const o of node.options) noLeftCycle(o(), path);
  path.delete(node);
}

/** Whether objects all require one property whose constant values differ between them. */
function discriminated(options: Node[]): boolean {
  if (options.length === 0 || !options.every((o) => o.kind === "object")) return false;
  const objects = options as (Node & { kind: "object" })[];
  const text = (b: Uint8Array) => Buffer.from(b).toString();
  return objects[0]!.keys.some((key) => {
    const seen = new Set<string>();
    return objects.every((o) => {
      const i = o.keys.findIndex((k) => text(k) === text(key));
      const prop = i >= 0 && o.required[i] ? o.props[i]!() : null;
      if (prop?.kind !== "literal") return false;
      const values = prop.values.map(text);
      if (values.some((v) => seen.has(v))) return false;
      for (const v of values) seen.add(v);
      return true;
    });
  });
}

/** Grammars of the last 16 schemas, per vocabulary. */
const schemaGrammars = new GrammarCache<SchemaState>(16);

/**
 * The grammar of `schema` over `vocabulary` (compiled once per distinct schema text and
 * leniency: compileSchema).
 */
export function schemaGrammar(
  vocabulary: Vocabulary,
  schema: unknown,
  source: SchemaSource = RESPONSE_FORMAT,
  o: { lenient?: boolean } = {},
): TokenGrammar<SchemaState> {
  const text = (o.lenient ? "lenient " : "") + JSON.stringify(schema);
  return schemaGrammars.get(vocabulary, text, () => {
    const a = compileSchema(schema, source, { ...o, tokenBytes: vocabulary.maxTokenBytes });
    return new TokenGrammar(a, vocabulary);
  });
}

// ---- the automaton ----

/** A frame of the stack: a value being written and where in it. */
type Frame =
  /** Before a value of `node` (whitespace allowed; n: whitespace so far). */
  | { t: "value"; node: Node; n: number }
  /**
   * In an object: phase 0 after '{', 1 after property i's key, 2 after its value, 3 after
   * ','; in phases 0 and 3 the next key is one of properties i.. up to the first required one.
   */
  | { t: "object"; node: Node & { kind: "object" }; i: number; phase: 0 | 1 | 2 | 3; n: number }
  /** In a map: phase 0 after '{', 1 after a key, 2 after a value, 3 after ','. */
  | { t: "map"; node: Node & { kind: "map" }; count: number; phase: 0 | 1 | 2 | 3; n: number }
  /**
   * In an array: `count` items written; phase 0 after '[', 1 after an item, 2 after ',';
   * `used`: with uniqueItems, the items' literal values written (indices, ascending).
   */
  | {
      t: "array";
      node: Node & { kind: "array" };
      count: number;
      phase: 0 | 1 | 2;
      n: number;
      used?: readonly number[];
      /** With contains: the items written as contains' (up to its minContains). */
      hits?: number;
    }
  /**
   * Matching literal byte strings (keys, enum values): the candidates left, `at` bytes in;
   * a key's `tags` (parallel to values) are property indices, the one matched set as the
   * object's `i`.
   */
  | { t: "literal"; values: Uint8Array[]; at: number; id: string; tags?: number[] }
  /** A value by json-mode.ts's automaton (strings, numbers, free values). */
  | { t: "json"; s: JsonState; integer: boolean }
  /** A string with a rule (json-string.ts), after its opening quote. */
  | { t: "string"; rule: StringRule; id: number; s: StringState }
  /** A number with a rule (json-number.ts). */
  | { t: "number"; rule: NumberRule; id: number; s: NumberState };

/** One reading of the output so far. */
interface Stack {
  /** Innermost last; empty: the root value is complete (then only whitespace). */
  readonly frames: readonly Frame[];
  /** Whitespace after the root value. */
  readonly n?: number;
}

/**
 * The readings the output so far allows: one, unless anyOf alternatives that start alike
 * are both still possible (each reading is a valid prefix, so the output is valid whichever
 * one it completes).
 */
export interface SchemaState {
  readonly stacks: readonly Stack[];
}

/**
 * Readings kept at most: more are dropped (the output stays valid under those kept, only
 * fewer continuations are allowed). Overlapping alternatives nested in each other multiply.
 */
const MAX_STACKS = 64;

/** json-mode.ts modes where a number may end. */
const NUMBER_MODES = new Set<number>([Mode.Zero, Mode.Integer, Mode.Fraction, Mode.ExponentDigits]);
const valueState = (mode: Mode): JsonState => ({ mode, stack: "", n: 0 });

export class SchemaAutomaton implements ByteAutomaton<SchemaState> {
  readonly start: SchemaState;

  constructor(root: Node) {
    this.start = { stacks: [{ frames: [{ t: "value", node: root, n: 0 }] }] };
  }

  isDone(s: SchemaState): boolean {
    return s.stacks.some((k) => k.frames.length === 0);
  }

  local(s: SchemaState): { key: string; byte: number } | null {
    // Every reading inside a string in the same local state (a free one, or one under
    // lengths far from its bound): a token without a quote stays in it in each, allowed or
    // not alike.
    let local: { key: string; byte: number } | null = null;
    for (const k of s.stacks) {
      const top = k.frames[k.frames.length - 1];
      const l =
        top?.t === "json"
          ? stringLocal(top.s)
          : top?.t === "string"
            ? localOf(top.rule.local(top.s))
            : null;
      if (!l || (local && l.key !== local.key)) return null;
      local = l;
    }
    return local;
  }

  key(s: SchemaState): string {
    return s.stacks.map(stackKey).join(" / ");
  }

  step(s: SchemaState, b: number): SchemaState | null {
    if (s.stacks.length === 1) {
      const next = this.#step(s.stacks[0]!, b);
      if (next.length === 0) return null;
      return { stacks: next.length === 1 ? next : distinct(next) };
    }
    let next = s.stacks.flatMap((k) => this.#step(k, b));
    // Readings meet again only where frames are pushed or popped (after alternatives that
    // end alike): only then are their keys compared.
    if (
      next.length !== s.stacks.length ||
      next.some((k, i) => k.frames.length !== s.stacks[i]!.frames.length)
    )
      next = distinct(next);
    return next.length > 0 ? { stacks: next } : null;
  }

  /** The readings of stack `s` after byte `b` (none: refused). */
  #step(s: Stack, b: number): Stack[] {
    const frames = s.frames;
    if (frames.length === 0) {
      const n = s.n ?? 0;
      return isWs(b) && n < MAX_WHITESPACE ? [{ frames, n: n + 1 }] : [];
    }
    const top = frames[frames.length - 1]!;
    const below = frames.slice(0, -1);
    const replace = (...f: Frame[]): Stack[] => [{ frames: [...below, ...f] }];
    const pop: Stack[] = [{ frames: below }];
    switch (top.t) {
      case "value": {
        if (isWs(b)) return top.n < MAX_WHITESPACE ? replace({ ...top, n: top.n + 1 }) : [];
        return this.#begin(below, top.node, b);
      }
      case "object": {
        const { node, i, phase } = top;
        if (isWs(b)) return top.n < MAX_WHITESPACE ? replace({ ...top, n: top.n + 1 }) : [];
        if (phase === 1)
          return b === 0x3a
            ? replace({ ...top, phase: 2, n: 0 }, { t: "value", node: node.props[i]!(), n: 0 })
            : [];
        // '}' once no required property is left (after '{', or after value i).
        const from = phase === 2 ? i + 1 : i;
        if (b === 0x7d) return phase !== 3 && !node.required.includes(true, from) ? pop : [];
        if (phase === 2)
          return b === 0x2c && from < node.keys.length
            ? replace({ ...top, i: from, phase: 3, n: 0 })
            : [];
        // A key: of properties i.. up to the first required one (the schema's order).
        const next = node.required.indexOf(true, i);
        const last = next < 0 ? node.keys.length - 1 : next;
        if (last < i) return [];
        const tags = Array.from({ length: last - i + 1 }, (_, k) => i + k);
        return this.#step(
          {
            frames: [
              ...below,
              { ...top, phase: 1, n: 0 },
              literalFrame(
                tags.map((k) => node.keys[k]!),
                `k${node.id}.${i}`,
                tags,
              ),
            ],
          },
          b,
        );
      }
      case "map": {
        const { node, phase } = top;
        if (isWs(b)) return top.n < MAX_WHITESPACE ? replace({ ...top, n: top.n + 1 }) : [];
        if (phase === 1)
          return b === 0x3a
            ? replace({ ...top, phase: 2, n: 0 }, { t: "value", node: node.values(), n: 0 })
            : [];
        if (b === 0x7d) return phase === 0 || phase === 2 ? pop : [];
        if (phase === 2)
          return b === 0x2c && top.count < node.max ? replace({ ...top, phase: 3, n: 0 }) : [];
        // A key (inside it after this quote): of propertyNames, or any string.
        if (b !== 0x22 || top.count >= node.max) return [];
        const key: Frame = node.keys
          ? { t: "string", rule: node.keys, id: node.id, s: node.keys.start }
          : { t: "json", s: valueState(Mode.ValueString), integer: false };
        return replace({ ...top, count: top.count + 1, phase: 1, n: 0 }, key);
      }
      case "array": {
        const { node, count, phase } = top;
        if (isWs(b)) return top.n < MAX_WHITESPACE ? replace({ ...top, n: top.n + 1 }) : [];
        if (phase === 1) {
          // After an item: ',' while below maxItems, ']' from minItems on.
          if (b === 0x2c) return count < node.max ? replace({ ...top, phase: 2, n: 0 }) : [];
          if (b === 0x5d)
            return count >= node.min && (top.hits ?? 0) >= (node.contains?.min ?? 0) ? pop : [];
          return [];
        }
        // After '[' (phase 0: ']' if it may be empty) or ',' (phase 2): an item.
        if (b === 0x5d) return phase === 0 && node.min === 0 ? pop : [];
        if (count >= node.max) return [];
        const next: Frame = { ...top, count: count + 1, phase: 1, n: 0 };
        if (node.unique) {
          // The values not written yet; the one matched is added to `used`.
          const all = (node.items() as Node & { kind: "literal" }).values;
          const tags = all.flatMap((_, k) => (top.used?.includes(k) ? [] : [k]));
          const values = tags.map((k) => all[k]!);
          return this.#step(
            { frames: [...below, next, literalFrame(values, `u${node.id}`, tags)] },
            b,
          );
        }
        const item = count < node.prefix.length ? node.prefix[count]! : node.items;
        const c = node.contains;
        const hits = top.hits ?? 0;
        if (c && hits < c.min) {
          // Two readings: the item counts for contains (where its place can), or not, while
          // the places after it that can count still make up the rest.
          const counted = count < c.prefix.length ? c.prefix[count]! : c.items;
          const readings = counted
            ? [...this.#begin([...below, { ...next, hits: hits + 1 }], counted(), b)]
            : [];
          if (c.room(count + 1) >= c.min - hits)
            readings.push(...this.#begin([...below, next], item(), b));
          return readings;
        }
        return this.#begin([...below, next], item(), b);
      }
      case "literal": {
        const kept = top.values.flatMap((v, k) =>
          v.length > top.at && v[top.at] === b ? [k] : [],
        );
        if (kept.length > 0) {
          const values = kept.map((k) => top.values[k]!);
          const tags = top.tags && kept.map((k) => top.tags![k]!);
          // A value fully matched and nothing longer left: the literal is complete.
          const at = top.at + 1;
          if (values.length === 1 && values[0]!.length === at)
            return [{ frames: tags ? learn(below, tags[0]!) : below }];
          return replace({ ...top, values, at, ...(tags ? { tags } : {}) });
        }
        // Ended before this byte (an enum value that is a prefix of another: 1 and 12).
        const ended = top.values.findIndex((v) => v.length === top.at);
        if (ended < 0) return [];
        return this.#step({ frames: top.tags ? learn(below, top.tags[ended]!) : below }, b);
      }
      case "string": {
        const next = top.rule.step(top.s, b);
        if (next === CLOSED) return pop;
        return next ? replace({ ...top, s: next }) : [];
      }
      case "number": {
        // A number ends at the first byte that does not continue it.
        if (!continuesNumber(b))
          return canEnd(top.rule, top.s) ? this.#step({ frames: below }, b) : [];
        const next = stepNumber(top.rule, top.s, b);
        return next ? replace({ ...top, s: next }) : [];
      }
      case "json": {
        const { s: js, integer } = top;
        if (complete(js)) {
          // A number ends at the first byte that does not continue it.
          const continues =
            NUMBER_MODES.has(js.mode) &&
            (isDigit(b) || (!integer && (b === 0x2e || b === 0x65 || b === 0x45)));
          if (!continues) return this.#step({ frames: below }, b);
        }
        if (integer && (b === 0x2e || b === 0x65 || b === 0x45) && NUMBER_MODES.has(js.mode))
          return [];
        const next = jsonStep(js, b);
        if (next === null) return [];
        // Strings, objects and arrays end on their closing byte.
        if ((next.mode === Mode.After && next.stack === "") || jsonDone(next)) return pop;
        return replace({ ...top, s: next });
      }
    }
  }

  /** The first byte `b` of a value of `node`, with `frames` below it. */
  #begin(frames: readonly Frame[], node: Node, b: number): Stack[] {
    const push = (f: Frame): Stack[] => this.#step({ frames: [...frames, f] }, b);
    const open = (f: Frame): Stack[] => [{ frames: [...frames, f] }];
    switch (node.kind) {
      case "object":
        return b === 0x7b ? open({ t: "object", node, i: 0, phase: 0, n: 0 }) : [];
      case "array":
        return b === 0x5b ? open({ t: "array", node, count: 0, phase: 0, n: 0 }) : [];
      case "map":
        return b === 0x7b ? open({ t: "map", node, count: 0, phase: 0, n: 0 }) : [];
      case "string":
        if (b !== 0x22) return [];
        return open(
          node.rule
            ? { t: "string", rule: node.rule, id: node.id, s: node.rule.start }
            : { t: "json", s: valueState(Mode.ValueString), integer: false },
        );
      case "number":
      case "integer": {
        if (node.rule) {
          const s = stepNumber(node.rule, null, b);
          return s ? open({ t: "number", rule: node.rule, id: node.id, s }) : [];
        }
        if (b !== 0x2d && !isDigit(b)) return [];
        return push({ t: "json", s: valueState(Mode.Value), integer: node.kind === "integer" });
      }
      case "any":
        return push({ t: "json", s: valueState(Mode.Value), integer: false });
      case "anyObject":
        return b === 0x7b ? push({ t: "json", s: valueState(Mode.Value), integer: false }) : [];
      case "literal":
        return push(literalFrame(node.values, `l${node.id}`));
      case "anyOf":
        return (dispatch(node).get(b) ?? []).flatMap((o) => this.#begin(frames, o, b));
    }
  }
}

const dispatches = new WeakMap<Node, Map<number, Node[]>>();

/** An anyOf's options that may start with each byte. */
function dispatch(node: Node & { kind: "anyOf" }): Map<number, Node[]> {
  let d = dispatches.get(node);
  if (!d) {
    d = new Map();
    for (const o of node.options)
      for (const b of firstBytes(o())) d.set(b, [...(d.get(b) ?? []), o()]);
    dispatches.set(node, d);
  }
  return d;
}

const localOf = (key: string | null) => (key === null ? null : { key, byte: 0x22 });

/** The stacks with different keys (the first of each), at most MAX_STACKS. */
function distinct(stacks: Stack[]): Stack[] {
  const seen = new Set<string>();
  const out: Stack[] = [];
  for (const k of stacks) {
    const key = stackKey(k);
    if (seen.has(key)) continue;
    seen.add(key);
    out.push(k);
    if (out.length === MAX_STACKS) break;
  }
  return out;
}

function stackKey(s: Stack): string {
  return s.frames.length === 0 ? `done,${s.n ?? 0}` : s.frames.map(frameKey).join("|");
}

/**
 * The frame below a tagged literal learns which value it was: an object, the property it
 * names; an array under uniqueItems, the item it wrote.
 */
function learn(frames: readonly Frame[], tag: number): readonly Frame[] {
  const f = frames[frames.length - 1];
  if (f?.t === "object") return [...frames.slice(0, -1), { ...f, i: tag }];
  if (f?.t === "array")
    return [...frames.slice(0, -1), { ...f, used: [...(f.used ?? []), tag].sort((a, b) => a - b) }];
  return frames;
}

function literalFrame(values: Uint8Array[], id: string, tags?: number[]): Frame {
  return { t: "literal", values, at: 0, id, ...(tags ? { tags } : {}) };
}

/** A json-mode.ts value state that is complete, or a number that may end here. */
function complete(s: JsonState): boolean {
  return s.stack === "" && (jsonDone(s) || s.mode === Mode.After || NUMBER_MODES.has(s.mode));
}

function frameKey(f: Frame): string {
  switch (f.t) {
    case "value":
      return `v${f.node.id},${f.n}`;
    case "object":
      return `o${f.node.id},${f.i},${f.phase},${f.n}`;
    case "map":
      return `m${f.node.id},${Number.isFinite(f.node.max) ? f.count : 0},${f.phase},${f.n}`;
    case "array": {
      // Without maxItems, counts past minItems and the tuple have the same future.
      const { max, min, prefix } = f.node;
      const count = Number.isFinite(max)
        ? f.count
        : Math.min(f.count, Math.max(min, prefix.length));
      return `a${f.node.id},${count},${f.phase},${f.n}${f.used ? `,u${f.used.join(".")}` : ""}${f.hits ? `,h${f.hits}` : ""}`;
    }
    case "literal":
      // The candidates left share the bytes matched so far: they name them.
      return `${f.id}@${Buffer.from(f.values[0]!.subarray(0, f.at)).toString("hex")}`;
    case "json":
      return `j${f.s.mode},${f.s.n},${f.s.stack},${f.integer ? 1 : 0}`;
    case "string":
      return `s${f.id},${f.rule.key(f.s)}`;
    case "number":
      return `n${f.id},${numberKey(f.rule, f.s)}`;
  }
}

function utf8(s: string): Uint8Array {
  return new Uint8Array(Buffer.from(s, "utf8"));
}

/** A schema of annotations only: any value. */
function isAny(s: Record<string, unknown>): boolean {
  return Object.keys(s).every((k) => ANNOTATIONS.has(k));
}
