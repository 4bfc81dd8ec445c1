// Structured outputs (src/gateway/json-schema.ts): schemas compiled to an automaton, checked
// on hand-written cases, then against a validator written here: random instances of the
// schemas are accepted byte by byte and complete; random one-character edits are accepted
// and complete exactly when JSON.parse takes them and the validator says they conform
// (every property, in the schema's order); masks equal checking every token; and what
// the subset does not cover is refused with 400.
import { describe, expect, it } from "vitest";
import { ApiError } from "../../src/gateway/errors.ts";
import { runBytes, TokenGrammar, Vocabulary } from "../../src/gateway/grammar.ts";
import { compileSchema, type SchemaState } from "../../src/gateway/json-schema.ts";
import { Prng } from "../../src/model/prng.ts";
import { expectExactMasks, JSON_CHARS, oneCharEdits } from "../support/grammar.ts";

const bytes = (s: string) => new Uint8Array(Buffer.from(s, "utf8"));

type Schema = Record<string, unknown>;

const PERSON: Schema = {
  type: "object",
  properties: {
    name: { type: "string", description: "ignored annotation" },
    age: { type: "integer" },
    score: { type: "number" },
    tags: { type: "array", items: { type: "string" }, maxItems: 3 },
    role: { enum: ["admin", "user", "guest"] },
    ok: { type: "boolean" },
    note: { type: ["string", "null"] },
    level: { enum: [1, 12, 123, -4.5, true, null] },
    extra: { type: "object" },
    anything: {},
    nested: {
      type: "object",
      properties: {
        x: { type: "number" },
        y: {
          anyOf: [{ type: "string" }, { type: "array", items: { type: "integer" }, minItems: 1 }],
        },
        z: { const: "fixed" },
        w: { type: "object", properties: {} },
      },
      required: ["x", "y", "z", "w"],
      additionalProperties: false,
    },
  },
  required: [
    "name",
    "age",
    "score",
    "tags",
    "role",
    "ok",
    "note",
    "level",
    "extra",
    "anything",
    "nested",
  ],
  additionalProperties: false,
};

/** Optional properties: before, between and after required ones, and an object of only them. */
const OPTIONAL: Schema = {
  type: "object",
  properties: {
    a: { type: "string" },
    b: { type: "integer" },
    c: {
      type: "object",
      properties: { x: { type: "number" }, y: { enum: ["p", "q"] }, z: { type: "boolean" } },
      required: ["y"],
    },
    d: { type: "array", items: { type: "object", properties: { e: { type: "null" } } } },
  },
  required: ["b"],
};

/** Maps (additionalProperties: a schema) and tuples (prefixItems, and draft 4's items array). */
const SHAPES: Schema = {
  type: "object",
  properties: {
    scores: { type: "object", additionalProperties: { type: "integer" } },
    tags: { type: "object", additionalProperties: { type: "array", items: { type: "string" } } },
    none: { type: "object", additionalProperties: false },
    pair: { type: "array", prefixItems: [{ type: "string" }, { type: "integer" }], items: false },
    head: {
      type: "array",
      prefixItems: [{ type: "boolean" }],
      items: { type: "null" },
      minItems: 1,
    },
    old: { type: "array", items: [{ type: "integer" }, { enum: ["x", "y"] }] },
    set: { type: "array", items: { enum: [1, 12, "x", null] }, uniqueItems: true },
  },
  required: ["scores", "tags", "none", "pair", "head", "old", "set"],
};

/**
 * Alternatives that start alike (Pydantic's unions): anyOf of objects, of numbers, of
 * strings; a discriminated oneOf; a union inside a union.
 */
const UNIONS: Schema = {
  type: "object",
  properties: {
    pet: { anyOf: [{ $ref: "#/$defs/cat" }, { $ref: "#/$defs/dog" }, { type: "null" }] },
    size: { anyOf: [{ type: "integer" }, { type: "number" }, { type: "string" }] },
    code: { anyOf: [{ enum: ["ab", "abc"] }, { type: "string" }] },
    shape: {
      oneOf: [
        {
          type: "object",
          properties: { kind: { const: "circle" }, r: { type: "number" } },
          required: ["kind", "r"],
        },
        {
          type: "object",
          properties: { kind: { enum: ["square", "box"] }, side: { type: "number" } },
          required: ["kind", "side"],
        },
      ],
      discriminator: { propertyName: "kind" },
    },
    deep: {
      anyOf: [
        { type: "array", items: { anyOf: [{ $ref: "#/$defs/cat" }, { type: "object" }] } },
        { type: "array", items: { type: "integer" } },
      ],
    },
  },
  required: ["pet", "size", "code", "shape", "deep"],
  $defs: {
    cat: {
      type: "object",
      properties: { name: { type: "string" }, lives: { type: "integer" } },
      required: ["name", "lives"],
    },
    dog: {
      type: "object",
      properties: { name: { type: "string" }, good: { type: "boolean" } },
      required: ["name"],
    },
  },
};

const TREE: Schema = {
  $defs: {
    node: {
      type: "object",
      properties: {
        v: { type: "integer" },
        kids: { type: "array", items: { $ref: "#/$defs/node" }, maxItems: 2 },
      },
    },
  },
  $ref: "#/$defs/node",
};

function check(schema: Schema, text: string): { refusedAt: number; done: boolean } {
  const a = compileSchema(schema);
  const b = bytes(text);
  let s: SchemaState | null = a.start;
  for (let i = 0; i < b.length; i++) {
    s = a.step(s, b[i]!);
    if (!s) return { refusedAt: i, done: false };
  }
  return { refusedAt: -1, done: a.isDone(s) };
}

const person = {
  name: 'Ann "A" \\ é',
  age: 31,
  score: -2.5e-3,
  tags: ["x", "y"],
  role: "guest",
  ok: false,
  note: null,
  level: 12,
  extra: { any: [1, { b: null }] },
  anything: "text",
  nested: { x: 0, y: [1, -2], z: "fixed", w: {} },
};

describe("a schema's automaton", () => {
  it.each([
    ["compact", JSON.stringify(person)],
    ["indented", JSON.stringify(person, null, 2)],
    [
      "the other alternatives",
      JSON.stringify({ ...person, note: "n", level: -4.5, nested: { ...person.nested, y: "s" } }),
    ],
    ["enum values that prefix others", JSON.stringify({ ...person, level: 1 })],
    ["a literal true in an enum", JSON.stringify({ ...person, level: true, anything: [true, 0] })],
  ])("accepts an instance (%s) whole and completes", (_what, text) => {
    expect(check(PERSON, text)).toEqual({ refusedAt: -1, done: true });
  });

  const refused: [string, object][] = [
    ["a missing property", { ...person, nested: { x: 0, y: "s", w: {} } }],
    ["properties out of order", { age: 31, name: "Ann" }],
    ["a fractional integer", { ...person, age: 31.5 }],
    ["a value outside the enum", { ...person, role: "root" }],
    ["a number where a string goes", { ...person, name: 5 }],
    ["a string where an integer goes", { ...person, age: "31" }],
    ["an object where a number goes", { ...person, score: {} }],
    ["a literal where a number goes", { ...person, nested: { ...person.nested, x: null } }],
    ["more items than maxItems", { ...person, tags: ["a", "b", "c", "d"] }],
    ["fewer items than minItems", { ...person, nested: { ...person.nested, y: [] } }],
    ["another const", { ...person, nested: { ...person.nested, z: "other" } }],
    [
      "a property in an empty-properties object",
      { ...person, nested: { ...person.nested, w: { a: 1 } } },
    ],
    ["an extra property", { ...person, more: 1 }],
  ];
  it.each(refused)("refuses %s", (_what, value) => {
    expect(check(PERSON, JSON.stringify(value)).refusedAt).toBeGreaterThanOrEqual(0);
  });

  it.each([
    ["only the required one", { b: 1 }, -1],
    ["all", { a: "s", b: 1, c: { x: 1, y: "p", z: true }, d: [{}, { e: null }] }, -1],
    ["optional ones around a required one", { a: "s", b: 2, d: [] }, -1],
    ["an object of optional properties, empty", { b: 1, d: [{}] }, -1],
  ])("takes optional properties or not (%s)", (_what, value, refusedAt) => {
    expect(check(OPTIONAL, JSON.stringify(value))).toEqual({ refusedAt, done: true });
  });

  it.each([
    ["the required one missing", "{}", 1],
    ["a required one missing after optional ones", '{"a":"s"}', 8],
    ["a nested required one missing", '{"b":1,"c":{"x":1}}', 17],
    ["optional ones out of order (none after d: its comma)", '{"b":1,"d":[],"c"', 13],
    ["a property skipped back to", '{"b":1,"c":{"y":"p","x"', 21],
    ["a trailing comma", '{"b":1,}', 7],
    ["a comma after the last property", '{"b":1,"d":[],', 13],
  ])("refuses %s", (_what, text, at) => {
    expect(check(OPTIONAL, text).refusedAt).toBe(at);
  });

  const shapes = {
    scores: { a: 1, "b c": -2 },
    tags: { x: ["p"], y: [] },
    none: {},
    pair: ["s", 3],
    head: [true, null, null],
    old: [7, "y", { any: 1 }],
    set: [12, null, 1],
  };
  it.each([
    ["maps, tuples", shapes, true],
    ["empty maps, short tuples", { ...shapes, scores: {}, tags: {}, pair: [], old: [] }, true],
    ["a map value of the wrong type", { ...shapes, scores: { a: "1" } }, false],
    ["a key in an object that allows none", { ...shapes, none: { a: 1 } }, false],
    ["a tuple item of the wrong type", { ...shapes, pair: [3, "s"] }, false],
    ["an item after a closed tuple", { ...shapes, pair: ["s", 3, 4] }, false],
    ["an item after a tuple of the wrong type", { ...shapes, head: [true, 1] }, false],
    ["a tuple shorter than minItems", { ...shapes, head: [] }, false],
    ["a draft-4 tuple item of the wrong type", { ...shapes, old: [7, "z"] }, false],
    ["a repeated item under uniqueItems", { ...shapes, set: [1, 12, 1] }, false],
    ["a repeated item that prefixes another", { ...shapes, set: [12, 12] }, false],
    ["every item once", { ...shapes, set: [null, "x", 12, 1] }, true],
  ])("maps and tuples: %s", (_what, value, ok) => {
    const r = check(SHAPES, JSON.stringify(value));
    expect(r.refusedAt < 0 && r.done).toBe(ok);
  });

  it.each([
    [
      "propertyNames (a pattern) and maxProperties on a map",
      {
        type: "object",
        additionalProperties: { type: "integer" },
        propertyNames: { pattern: "^[a-z]+$" },
        maxProperties: 2,
      },
      ['{"ab":1,"c":2}', "{}", '{"\u0061":1}'],
      ['{"A":1}', '{"a":1,"b":2,"c":3}', '{"a":"x"}', '{"":1}'],
    ],
    [
      "propertyNames as an enum",
      {
        type: "object",
        additionalProperties: { type: "null" },
        propertyNames: { enum: ["x", "yz"] },
      },
      ['{"x":null,"yz":null}'],
      ['{"y":null}', '{"xy":null}', '{"z":null}'],
    ],
    [
      "maxProperties alone: a map of any values",
      { type: "object", maxProperties: 1 },
      ['{"a":[1,{"b":null}]}', "{}"],
      ['{"a":1,"b":2}'],
    ],
    [
      "counts that the properties decide",
      {
        type: "object",
        properties: { a: { type: "integer" }, b: { type: "integer" } },
        required: ["a"],
        minProperties: 1,
        maxProperties: 2,
        propertyNames: { maxLength: 1 },
      },
      ['{"a":1}', '{"a":1,"b":2}'],
      ["{}", '{"b":2}'],
    ],
  ] as [string, Schema, string[], string[]][])("%s", (_what, schema, good, badOnes) => {
    const root = { type: "object", properties: { v: schema }, required: ["v"] };
    for (const g of good)
      expect(check(root, `{"v":${g}}`), g).toEqual({ refusedAt: -1, done: true });
    for (const b of badOnes) {
      const r = check(root, `{"v":${b}}`);
      expect(r.refusedAt >= 0 || !r.done, b).toBe(true);
    }
  });

  it.each([
    [
      { type: "object", additionalProperties: { type: "integer" }, minProperties: 1 },
      /minProperties on an object without properties/,
    ],
    [{ type: "object", properties: { a: {} }, minProperties: 1 }, /do not decide/],
    [{ type: "object", properties: { a: {}, b: {} }, maxProperties: 1 }, /do not decide/],
    [
      { type: "object", properties: { Ab: {} }, propertyNames: { pattern: "^[a-z]+$" } },
      /'Ab' is not allowed/,
    ],
    [{ type: "object", propertyNames: { type: "integer" } }, /keys are strings/],
    [{ type: "object", maxProperties: -1 }, /'maxProperties' must be an integer/],
    [
      { type: "array", items: { type: "string" }, uniqueItems: true },
      /uniqueItems is supported where/,
    ],
    [
      { type: "array", items: { enum: [1, 2] }, uniqueItems: true, minItems: 3 },
      /minItems 3 with 2 distinct/,
    ],
  ] as [Schema, RegExp][])("refuses %o (400; lenient: not enforced)", (schema, message) => {
    const root = { type: "object", properties: { v: schema } };
    expect(() => compileSchema(root)).toThrow(message);
    if (!/must be an integer|keys are strings|distinct/.test(message.source))
      expect(() => compileSchema(root, undefined, { lenient: true })).not.toThrow();
  });

  it("keeps every reading of alternatives that start alike until one is ruled out", () => {
    const base = { size: 1, code: "ab", shape: { kind: "box", side: 2 }, deep: [] };
    const ok = (v: object) => check(UNIONS, JSON.stringify(v));
    expect(ok({ pet: { name: "c", lives: 9 }, ...base })).toEqual({ refusedAt: -1, done: true });
    expect(ok({ pet: { name: "d", good: true }, ...base })).toEqual({ refusedAt: -1, done: true });
    expect(ok({ pet: { name: "d" }, ...base })).toEqual({ refusedAt: -1, done: true });
    expect(ok({ pet: { name: "x", lives: 9, good: true }, ...base }).refusedAt).toBeGreaterThan(0);
    expect(ok({ pet: null, ...base, size: 2.5, code: "abcd" }).done).toBe(true);
    expect(ok({ pet: null, ...base, shape: { kind: "box", r: 1 } }).refusedAt).toBeGreaterThan(0);
    expect(ok({ pet: null, ...base, deep: [{ name: "n", lives: 1 }, {}] }).done).toBe(true);
    expect(ok({ pet: null, ...base, deep: [1, {}] }).refusedAt).toBeGreaterThan(0);
  });

  it("follows a recursive $ref", () => {
    const tree = {
      v: 1,
      kids: [
        { v: 2, kids: [] },
        { v: 3, kids: [{ v: 4, kids: [] }] },
      ],
    };
    expect(check(TREE, JSON.stringify(tree))).toEqual({ refusedAt: -1, done: true });
    const wide = {
      v: 1,
      kids: [
        { v: 2, kids: [] },
        { v: 3, kids: [] },
        { v: 4, kids: [] },
      ],
    };
    expect(check(TREE, JSON.stringify(wide)).refusedAt).toBeGreaterThan(0);
  });

  it("is complete at the root's closing brace and takes only whitespace after it", () => {
    const text = JSON.stringify(person);
    expect(check(PERSON, text.slice(0, -1)).done).toBe(false);
    expect(check(PERSON, `${text} \n`)).toEqual({ refusedAt: -1, done: true });
    expect(check(PERSON, `${text} x`).refusedAt).toBe(Buffer.byteLength(text) + 1);
  });
});

/**
 * A schema as Pydantic v2 writes it (model_json_schema of an Order with an Enum, Optional,
 * a union of models, constr / conint / condecimal-like bounds, datetime, dict, tuple, set).
 */
const PYDANTIC: Schema = {
  $defs: {
    Colour: { enum: ["red", "green"], title: "Colour", type: "string" },
    Card: {
      properties: {
        kind: { const: "card", title: "Kind", type: "string" },
        last4: { pattern: "^[0-9]{4}$", title: "Last4", type: "string" },
      },
      required: ["kind", "last4"],
      title: "Card",
      type: "object",
    },
    Cash: {
      properties: {
        kind: { const: "cash", title: "Kind", type: "string" },
        change: { anyOf: [{ type: "number" }, { type: "null" }], default: null, title: "Change" },
      },
      required: ["kind"],
      title: "Cash",
      type: "object",
    },
  },
  properties: {
    id: { format: "uuid", title: "Id", type: "string" },
    placed: { format: "date-time", title: "Placed", type: "string" },
    qty: { maximum: 99, minimum: 1, title: "Qty", type: "integer" },
    price: { exclusiveMinimum: 0, multipleOf: 0.01, title: "Price", type: "number" },
    note: {
      anyOf: [{ maxLength: 20, type: "string" }, { type: "null" }],
      default: null,
      title: "Note",
    },
    colours: {
      items: { $ref: "#/$defs/Colour" },
      title: "Colours",
      type: "array",
      uniqueItems: true,
    },
    payment: {
      discriminator: {
        mapping: { card: "#/$defs/Card", cash: "#/$defs/Cash" },
        propertyName: "kind",
      },
      oneOf: [{ $ref: "#/$defs/Card" }, { $ref: "#/$defs/Cash" }],
      title: "Payment",
    },
    extras: { additionalProperties: { type: "integer" }, title: "Extras", type: "object" },
    size: {
      maxItems: 2,
      minItems: 2,
      prefixItems: [{ type: "integer" }, { type: "integer" }],
      title: "Size",
      type: "array",
    },
    value: { anyOf: [{ type: "integer" }, { type: "number" }, { type: "string" }], title: "Value" },
  },
  required: ["id", "placed", "qty", "price", "colours", "payment", "extras", "size", "value"],
  title: "Order",
  type: "object",
};

describe("a schema as Pydantic writes it", () => {
  const order = {
    id: "123e4567-e89b-12d3-a456-426614174000",
    placed: "2026-11-30T12:00:00Z",
    qty: 3,
    price: 19.99,
    note: null,
    colours: ["green", "red"],
    payment: { kind: "cash", change: 0.5 },
    extras: { gift: 1 },
    size: [2, 3],
    value: 2.5,
  };

  it.each([
    ["an order", order, true],
    [
      "with a card and a note",
      { ...order, note: "ring twice", payment: { kind: "card", last4: "4242" } },
      true,
    ],
    ["a string value, no note", { ...order, note: undefined, value: "x" }, true],
    ["a price off the cent grid", { ...order, price: 19.999 }, false],
    ["a price of 0", { ...order, price: 0 }, false],
    ["qty 100", { ...order, qty: 100 }, false],
    ["a colour twice", { ...order, colours: ["red", "red"] }, false],
    ["a card without four digits", { ...order, payment: { kind: "card", last4: "42" } }, false],
    [
      "a cash payment with a card's field",
      { ...order, payment: { kind: "cash", last4: "4242" } },
      false,
    ],
    ["a bad date", { ...order, placed: "2026-13-30T12:00:00Z" }, false],
    ["a size of three", { ...order, size: [1, 2, 3] }, false],
    ["a note too long", { ...order, note: "x".repeat(21) }, false],
  ])("%s: taken and complete = %s", (_what, value, ok) => {
    const r = check(PYDANTIC, JSON.stringify(value));
    expect(r.refusedAt < 0 && r.done).toBe(ok);
  });
});

describe("contains and minContains", () => {
  const wrap = (a: object) => ({ type: "object", properties: { a }, required: ["a"] });
  const COLORS = wrap({ type: "array", items: { type: "string" }, contains: { const: "red" } });
  const TWO = wrap({
    type: "array",
    items: { type: "integer" },
    contains: { minimum: 10 },
    minContains: 2,
    maxItems: 3,
  });
  const TUPLE = wrap({
    type: "array",
    prefixItems: [{ type: "integer" }, { type: "string" }],
    items: false,
    contains: { type: "string" },
  });
  const result = (schema: Schema, a: string) => {
    const r = check(schema, `{"a":${a}}`);
    return r.refusedAt < 0 && r.done;
  };
  it.each<[string, Schema, string, boolean]>([
    ["the item it contains, alone", COLORS, '["red"]', true],
    ["among others, anywhere", COLORS, '["blue","green","red","x"]', true],
    ["none of it", COLORS, '["blue","green"]', false],
    ["empty (minContains 1 is a minItems too)", COLORS, "[]", false],
    ["a contained item of the wrong type for items", COLORS, '["red",1]', false],
    ["two of three above 10", TWO, "[1,10,11]", true],
    ["the two first", TWO, "[12,13]", true],
    ["only one", TWO, "[12,1,2]", false],
    ["a number that is no integer, though above 10", TWO, "[10.5,11]", false],
    ["a tuple whose string is the contained item", TUPLE, '[1,"x"]', true],
    ["a tuple cut before it", TUPLE, "[1]", false],
  ])("%s: %s", (_, schema, a, ok) => {
    expect(result(schema, a)).toBe(ok);
  });

  it("never leaves the output where no item can be written: the last places go to the contained", () => {
    // maxItems 3, two items of 10 or more: after one below 10, both others must be.
    const a = compileSchema(TWO);
    let s: SchemaState | null = a.start;
    for (const b of bytes('{"a":[1,')) s = a.step(s!, b);
    expect(s).not.toBeNull();
    // "5" could only start an item below 10 (or 50, 500...: above): a 5 then "," is refused.
    let t: SchemaState | null = s;
    for (const b of bytes("5,")) t = t && a.step(t, b);
    expect(t).toBeNull();
    let u: SchemaState | null = s;
    for (const b of bytes("50,12]}")) u = u && a.step(u, b);
    expect(u && a.isDone(u)).toBe(true);
  });

  it.each<[string, object, RegExp]>([
    [
      "minContains above maxItems",
      { contains: {}, minContains: 3, maxItems: 2 },
      /minContains 3 is more than the 2 items/,
    ],
    ["a negative minContains", { contains: {}, minContains: -1 }, /minContains must be an integer/],
    ["maxContains", { contains: {}, maxContains: 2 }, /'maxContains' is not supported/],
    [
      "with uniqueItems",
      { items: { enum: ["a", "b"] }, uniqueItems: true, contains: { const: "a" } },
      /contains with uniqueItems/,
    ],
    [
      "no single schema for items and contains",
      { items: { type: "string" }, contains: { type: "integer" } },
      /contains: fewer than 1 items can be of both their schema and contains'/,
    ],
  ])("refuses %s", (_, a, message) => {
    expect(() => compileSchema(wrap({ type: "array", ...a }))).toThrow(message);
  });

  it("minContains 0 asks nothing", () => {
    const schema = wrap({ type: "array", contains: { const: 1 }, minContains: 0 });
    expect(result(schema, "[]")).toBe(true);
    expect(result(schema, '["x"]')).toBe(true);
  });
});

describe("what the subset does not cover is refused with 400", () => {
  it.each([
    ["a root that is not an object", { type: "array", items: {} }, /root must be an object/],
    [
      "an unsupported keyword",
      { type: "object", properties: { s: { type: "object", not: {} } } },
      /'not' is not supported/,
    ],
    [
      "oneOf alternatives starting alike, without a discriminator",
      { type: "object", properties: { a: { oneOf: [{ type: "string" }, { enum: ["x"] }] } } },
      /oneOf alternatives that can start alike/,
    ],
    [
      "an unknown $ref",
      { type: "object", properties: { a: { $ref: "#/$defs/nope" } } },
      /does not name/,
    ],
    ["an empty enum", { type: "object", properties: { a: { enum: [] } } }, /empty enum/],
    [
      "prefixItems that is not an array",
      { type: "object", properties: { a: { type: "array", prefixItems: {} } } },
      /prefixItems must be an array/,
    ],
    [
      "a required property that is not among the properties",
      { type: "object", properties: { a: {} }, required: ["b"] },
      /required names 'b'/,
    ],
    [
      "an unknown type",
      { type: "object", properties: { a: { type: "date" } } },
      /not a JSON Schema type/,
    ],
    [
      "an object enum value",
      { type: "object", properties: { a: { enum: [{}] } } },
      /strings, numbers/,
    ],
  ] as [string, Schema, RegExp][])("%s", (_what, schema, message) => {
    let err: unknown;
    try {
      compileSchema(schema);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ApiError);
    expect((err as ApiError).code).toBe("EM_GATEWAY_BAD_REQUEST");
    expect((err as ApiError).param).toBe("response_format");
    expect((err as ApiError).message).toMatch(message);
  });
});

describe("random schemas, well-formed or not", () => {
  const KEYS = [
    "type",
    "properties",
    "required",
    "items",
    "prefixItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "pattern",
    "format",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "additionalProperties",
    "propertyNames",
    "maxProperties",
    "minProperties",
    "uniqueItems",
    "minItems",
    "maxItems",
    "contains",
    "minContains",
    "discriminator",
    "title",
  ];
  const TYPES = ["string", "integer", "number", "object", "array", "boolean", "null"];
  const rng = new Prng(1);
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(rng.uniform() * xs.length)]!;
  const junk = (): unknown =>
    pick([
      null,
      true,
      false,
      0,
      -1,
      1.5,
      1e300,
      "",
      "x",
      "(",
      [],
      {},
      [1, "a"],
      { a: 1 },
      Number.NaN,
    ]);
  const schema = (d: number): unknown => {
    if (d > 3 || rng.uniform() < 0.2) return rng.uniform() < 0.3 ? junk() : { type: pick(TYPES) };
    const s: Record<string, unknown> = {};
    for (let i = Math.floor(rng.uniform() * 4); i > 0; i--) {
      const k = pick(KEYS);
      const sub = rng.uniform() < 0.7;
      s[k] =
        k === "type"
          ? sub
            ? pick(TYPES)
            : pick([["string", "null"], ["integer", "number"], junk()])
          : k === "properties"
            ? sub
              ? { a: schema(d + 1), b: schema(d + 1) }
              : junk()
            : k === "required"
              ? sub
                ? pick([["a"], ["a", "b"], ["c"]])
                : junk()
              : ["items", "additionalProperties", "propertyNames", "contains"].includes(k)
                ? sub
                  ? schema(d + 1)
                  : junk()
                : ["prefixItems", "anyOf", "oneOf", "allOf"].includes(k)
                  ? sub
                    ? pick([[], [schema(d + 1)], [schema(d + 1), schema(d + 1)]])
                    : junk()
                  : k === "enum"
                    ? sub
                      ? ["a", 1, null, "ab"]
                      : junk()
                    : k === "$ref"
                      ? pick(["#/$defs/x", "#/$defs/nope", "#/definitions/x", junk()])
                      : k === "$defs"
                        ? { x: schema(d + 1) }
                        : k === "pattern"
                          ? pick(["^[a-z]+$", "a{2,", "(?=x)", "[", "a|", "^$", junk()])
                          : k === "format"
                            ? pick(["date", "email", "color", junk()])
                            : sub
                              ? pick([0, 1, 3, 10, 0.5, -2])
                              : junk();
    }
    return s;
  };

  it("compile or answer 400, and their automata step any bytes without throwing", () => {
    let compiled = 0;
    let refused = 0;
    for (let i = 0; i < 3000; i++) {
      const root =
        rng.uniform() < 0.9
          ? {
              type: "object",
              properties: { v: schema(0) },
              required: ["v"],
              $defs: { x: schema(1) },
            }
          : schema(0);
      for (const lenient of [false, true]) {
        let a: ReturnType<typeof compileSchema>;
        try {
          a = compileSchema(root, undefined, { lenient });
        } catch (e) {
          expect(e, JSON.stringify(root)).toBeInstanceOf(ApiError);
          refused++;
          continue;
        }
        compiled++;
        let s = a.start;
        for (const b of [
          ...bytes('{"v": '),
          ...Array.from({ length: 30 }, () => Math.floor(rng.uniform() * 128)),
        ]) {
          const next = a.step(s, b);
          if (next) s = next;
          a.key(s);
          a.local(s);
        }
      }
    }
    expect(compiled).toBeGreaterThan(1000);
    expect(refused).toBeGreaterThan(1000);
  });

  it.each([
    [{ anyOf: [] }, /empty anyOf/],
    [{ oneOf: [] }, /empty oneOf/],
    [{ $ref: "#/$defs/x" }, /its own alternative/],
  ])("refuses %o", (v, message) => {
    const root = {
      type: "object",
      properties: { v },
      $defs: { x: { anyOf: [{ type: "string" }, { $ref: "#/$defs/x" }] } },
    };
    expect(() => compileSchema(root)).toThrow(message);
  });
});

describe("allOf and leniency (tools' parameters)", () => {
  const real: Schema = {
    type: "object",
    properties: {
      when: { type: "string", format: "date-time", pattern: "^2" },
      count: { type: "integer", minimum: 1, maximum: 5 },
      tags: { type: "array", items: { type: "string" }, uniqueItems: true },
      place: { allOf: [{ $ref: "#/$defs/place" }], description: "Pydantic's wrapping" },
    },
    required: ["count", "place"],
    $defs: { place: { type: "object", properties: { city: { type: "string" } } } },
  };

  it("refuses what it cannot enforce, unless lenient: then the rest of the schema writes it", () => {
    expect(() => compileSchema(real)).toThrow(/'pattern' and 'format' together/);
    const a = compileSchema(real, undefined, { lenient: true });
    const run = (text: string) => {
      const s = runBytes(a, a.start, bytes(text));
      return s !== null && a.isDone(s);
    };
    // Not enforced: the string's pattern and format, uniqueItems.
    expect(run('{"when":"x","count":3,"tags":["a","a"],"place":{"city":"Oslo"}}')).toBe(true);
    // Enforced: bounds, types, required properties, the $ref inside allOf.
    expect(run('{"count":9,"place":{}}')).toBe(false);
    expect(run('{"count":"3","place":{}}')).toBe(false);
    expect(run('{"when":"x","count":3}')).toBe(false);
    expect(run('{"count":3,"place":{"city":1}}')).toBe(false);
    expect(run('{"count":3,"place":{}}')).toBe(true);
  });

  it("takes an allOf of one schema as that schema; refuses what has no intersection unless lenient", () => {
    const one = { type: "object", properties: { a: { allOf: [{ type: "integer" }] } } };
    const a = compileSchema(one);
    expect(runBytes(a, a.start, bytes('{"a":"s"}'))).toBeNull();
    expect(a.isDone(runBytes(a, a.start, bytes('{"a":3}'))!)).toBe(true);
    const two = {
      type: "object",
      properties: {
        a: { allOf: [{ type: "string", pattern: "^a" }, { pattern: "b$" }] },
      },
    };
    expect(() => compileSchema(two)).toThrow(/allOf of two different 'pattern'/);
    const lenient = compileSchema(two, undefined, { lenient: true });
    // Lenient: written by the schema without its allOf (any value).
    expect(lenient.isDone(runBytes(lenient, lenient.start, bytes('{"a":1}'))!)).toBe(true);
  });
});

describe("allOf of several schemas: their intersection", () => {
  const defs = {
    base: {
      type: "object",
      properties: { id: { type: "integer", minimum: 1 }, name: { type: "string" } },
      required: ["id"],
    },
    closed: {
      type: "object",
      properties: { id: { type: "integer" } },
      required: ["id"],
      additionalProperties: false,
    },
    typed: { type: "object", additionalProperties: { type: "integer" } },
    self: { allOf: [{ $ref: "#/$defs/self" }, { type: "object" }] },
  };
  /** `{"v": <value>}` accepted and complete under a root whose v is `schema`. */
  const accepts = (schema: unknown, value: string) => {
    const a = compileSchema({
      type: "object",
      properties: { v: schema },
      required: ["v"],
      $defs: defs,
    });
    const s = runBytes(a, a.start, bytes(`{"v":${value}}`));
    return s !== null && a.isDone(s);
  };
  // biome-ignore format: a table
  it.each([
    {
      name: "an object extending a $ref'd base: properties and required unite, in order",
      schema: { allOf: [{ $ref: "#/$defs/base" }, { properties: { tags: { type: "array", items: { type: "string" } } }, required: ["tags"] }] },
      yes: ['{"id":2,"tags":[]}', '{"id":2,"name":"x","tags":["a"]}'],
      no: ['{"id":2}', '{"id":0,"tags":[]}', '{"tags":[],"id":2}', '{"id":2,"tags":[1]}'],
    },
    {
      name: "a property in two parts obeys both",
      schema: { allOf: [{ $ref: "#/$defs/base" }, { properties: { id: { maximum: 5 } } }] },
      yes: ['{"id":1}', '{"id":5,"name":"n"}'],
      no: ['{"id":6}', '{"id":0}', '{"id":"3"}'],
    },
    {
      name: "additionalProperties false forbids the other part's optional properties",
      schema: { allOf: [{ $ref: "#/$defs/closed" }, { properties: { extra: { type: "string" } } }] },
      yes: ['{"id":3}'],
      no: ['{"id":3,"extra":"x"}'],
    },
    {
      name: "additionalProperties as a schema joins the other part's properties",
      schema: { allOf: [{ $ref: "#/$defs/typed" }, { properties: { n: {} }, required: ["n"] }] },
      yes: ['{"n":4}'],
      no: ['{"n":"four"}', '{"n":4.5}'],
    },
    {
      name: "numbers: the tightest bounds, integer over number, the larger multipleOf",
      schema: { allOf: [{ type: "number", minimum: 0, multipleOf: 2 }, { type: "integer", maximum: 10, multipleOf: 4 }, { exclusiveMinimum: 3 }] },
      yes: ["4", "8"],
      no: ["0", "2", "6", "12", "4.5", "-4"],
    },
    {
      name: "strings: lengths and one pattern",
      schema: { allOf: [{ type: "string", minLength: 2 }, { maxLength: 3, pattern: "^[a-z]+$" }] },
      yes: ['"ab"', '"abc"'],
      no: ['"a"', '"abcd"', '"AB"'],
    },
    {
      name: "enums intersect, and keep the merged type's values",
      schema: { allOf: [{ enum: ["a", "b", 1, null] }, { enum: ["b", 1, null, "c"] }, { type: ["string", "integer"] }] },
      yes: ['"b"', "1"],
      no: ['"a"', '"c"', "null"],
    },
    {
      name: "an anyOf distributes over the other parts",
      schema: { allOf: [{ anyOf: [{ type: "string" }, { type: "integer" }] }, { minimum: 5, maxLength: 2 }] },
      yes: ['"ab"', "7"],
      no: ['"abc"', "3", "true"],
    },
    {
      name: "a $ref beside other keywords is their allOf",
      schema: { $ref: "#/$defs/base", required: ["id", "name"] },
      yes: ['{"id":1,"name":"n"}'],
      no: ['{"id":1}'],
    },
    {
      name: "items of arrays join",
      schema: { allOf: [{ type: "array", items: { type: "integer" }, maxItems: 3 }, { items: { minimum: 0 }, minItems: 1 }] },
      yes: ["[0]", "[1,2,3]"],
      no: ["[]", "[-1]", "[1,2,3,4]", '["a"]'],
    },
  ])("$name", ({ schema, yes, no }) => {
    for (const v of yes) expect(accepts(schema, v), v).toBe(true);
    for (const v of no) expect(accepts(schema, v), v).toBe(false);
  });

  // biome-ignore format: a table
  it.each([
    ["types with nothing in common", { allOf: [{ type: "string" }, { type: "integer" }] }, /types that have no value in common/],
    ["enums with nothing in common", { allOf: [{ enum: [1] }, { const: 2 }] }, /no value in common/],
    ["a required property a closed part forbids", { allOf: [{ $ref: "#/$defs/closed" }, { properties: { x: {} }, required: ["x"] }] }, /requires property 'x'/],
    ["two formats", { allOf: [{ type: "string", format: "date" }, { format: "email" }] }, /two different 'format'/],
    ["multipleOf 2 and 3", { allOf: [{ type: "integer", multipleOf: 2 }, { multipleOf: 3 }] }, /neither divides the other/],
    ["anyOf in two parts", { allOf: [{ anyOf: [{ type: "string" }] }, { anyOf: [{ type: "integer" }] }] }, /anyOf \/ oneOf in two parts/],
    ["an enum beside bounds", { allOf: [{ enum: [1, 2] }, { minimum: 2 }] }, /enum \/ const and 'minimum'/],
    ["false", { allOf: [{ type: "string" }, false] }, /allows nothing/],
    ["a cycle", { $ref: "#/$defs/self", description: "d", minProperties: 0 }, /nest too deep/],
    ["a refused keyword inside stays refused", { allOf: [{ type: "object" }, { not: { type: "string" } }] }, /'not' is not supported/],
  ])("refuses %s", (_name, schema, message) => {
    expect(() => accepts(schema, "1")).toThrow(message);
  });
});

// ---- against a validator ----

function isObject(x: unknown): x is Record<string, unknown> {
  return typeof x === "object" && x !== null && !Array.isArray(x);
}

/**
 * Whether `v` conforms to `s` as the subset writes it (properties in the schema's order, the
 * required ones all there).
 */
function conforms(v: unknown, s: Schema, root: Schema): boolean {
  if (typeof s["$ref"] === "string")
    return conforms(
      v,
      (root["$defs"] as Record<string, Schema>)[(s["$ref"] as string).split("/").pop()!]!,
      root,
    );
  if ("const" in s) return v === s["const"];
  if (Array.isArray(s["enum"])) return (s["enum"] as unknown[]).includes(v);
  if (Array.isArray(s["anyOf"])) return (s["anyOf"] as Schema[]).some((o) => conforms(v, o, root));
  if (Array.isArray(s["oneOf"]))
    return (s["oneOf"] as Schema[]).filter((o) => conforms(v, o, root)).length === 1;
  const type = s["type"];
  if (Array.isArray(type)) return type.some((t) => conforms(v, { ...s, type: t }, root));
  switch (type) {
    case "object": {
      if (!isObject(v)) return false;
      const props = s["properties"] as Record<string, Schema> | undefined;
      const extra = s["additionalProperties"];
      if (!props && extra === false) return Object.keys(v).length === 0;
      if (!props && isObject(extra)) return Object.values(v).every((x) => conforms(x, extra, root));
      if (!props) return true;
      const keys = Object.keys(props);
      const required = (s["required"] as string[] | undefined) ?? [];
      const written = Object.keys(v);
      return (
        JSON.stringify(written) === JSON.stringify(keys.filter((k) => k in v)) &&
        required.every((k) => k in v) &&
        written.every((k) => conforms(v[k], props[k]!, root))
      );
    }
    case "array": {
      if (!Array.isArray(v)) return false;
      const min = (s["minItems"] as number) ?? 0;
      const max = (s["maxItems"] as number) ?? Number.POSITIVE_INFINITY;
      const tuple = (s["prefixItems"] ?? (Array.isArray(s["items"]) ? s["items"] : [])) as Schema[];
      const rest = Array.isArray(s["items"]) ? {} : ((s["items"] as Schema | false) ?? {});
      const texts = v.map((x) => JSON.stringify(x));
      if (s["uniqueItems"] === true && new Set(texts).size < texts.length) return false;
      return (
        v.length >= min &&
        v.length <= max &&
        v.every((x, i) =>
          i < tuple.length
            ? conforms(x, tuple[i]!, root)
            : rest !== false && conforms(x, rest, root),
        )
      );
    }
    case "string":
      return typeof v === "string";
    case "number":
      return typeof v === "number";
    case "integer":
      return Number.isInteger(v);
    case "boolean":
      return typeof v === "boolean";
    case "null":
      return v === null;
    default:
      return true;
  }
}

const WORDS = ["a", "Zed", "", 'q"uote', "back\\slash", "tab\t", "é東", "\u0001"];

function instance(s: Schema, root: Schema, rng: Prng, depth = 0): unknown {
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(rng.uniform() * xs.length)]!;
  if (typeof s["$ref"] === "string")
    return instance(
      (root["$defs"] as Record<string, Schema>)[(s["$ref"] as string).split("/").pop()!]!,
      root,
      rng,
      depth + 1,
    );
  if ("const" in s) return s["const"];
  if (Array.isArray(s["enum"])) return pick(s["enum"] as unknown[]);
  const alternatives = s["anyOf"] ?? s["oneOf"];
  if (Array.isArray(alternatives))
    return instance(pick(alternatives as Schema[]), root, rng, depth);
  const type = Array.isArray(s["type"]) ? pick(s["type"] as string[]) : s["type"];
  switch (type) {
    case "object": {
      const props = s["properties"] as Record<string, Schema> | undefined;
      const extra = s["additionalProperties"];
      if (!props && extra === false) return {};
      if (!props && isObject(extra))
        return Object.fromEntries(
          Array.from({ length: Math.floor(rng.uniform() * 3) }, (_, i) => [
            pick(WORDS) + i,
            instance(extra, root, rng, depth + 1),
          ]),
        );
      if (!props) return { k: pick(WORDS), n: [1, null] };
      // Optional properties written half the time.
      const required = (s["required"] as string[] | undefined) ?? [];
      return Object.fromEntries(
        Object.entries(props)
          .filter(([k]) => required.includes(k) || rng.uniform() < 0.5)
          .map(([k, p]) => [k, instance(p, root, rng, depth + 1)]),
      );
    }
    case "array": {
      const tuple = (s["prefixItems"] ?? (Array.isArray(s["items"]) ? s["items"] : [])) as Schema[];
      const rest = Array.isArray(s["items"]) ? {} : ((s["items"] as Schema | false) ?? {});
      const min = (s["minItems"] as number) ?? 0;
      const cap = rest === false ? tuple.length : Number.POSITIVE_INFINITY;
      const max = Math.min((s["maxItems"] as number) ?? 3, cap, depth > 3 ? min : min + 3);
      const n = min + Math.floor(rng.uniform() * (max - min + 1));
      if (s["uniqueItems"] === true) {
        // Distinct values of the enum, in a random order.
        const values = [...((rest as Schema)["enum"] as unknown[])].sort(() => rng.uniform() - 0.5);
        return values.slice(0, Math.min(n, values.length));
      }
      return Array.from({ length: n }, (_, i) =>
        instance(i < tuple.length ? tuple[i]! : (rest as Schema), root, rng, depth + 1),
      );
    }
    case "string":
      return pick(WORDS) + pick(WORDS);
    case "number":
      return pick([0, -1, 2.5, 1e-7, -3.25e12, 42]);
    case "integer":
      return pick([0, -7, 10, 123456]);
    case "boolean":
      return rng.uniform() < 0.5;
    case "null":
      return null;
    default:
      return pick([1, "s", null, [true], { a: {} }]);
  }
}

// Not '.', 'e' or 'E': JSON Schema counts 1.0 and 1e0 as integers; the automaton writes
// integers without a fraction or exponent (stricter, and still valid).
const EDITS = [...JSON_CHARS, "0", "1", "t", "n", "u", "a", "x"];

describe.each([
  ["a flat and nested schema", PERSON],
  ["a schema with optional properties", OPTIONAL],
  ["a recursive schema", TREE],
  ["maps and tuples", SHAPES],
  ["alternatives that start alike", UNIONS],
])("%s against the validator", (_name, schema) => {
  const rng = new Prng(77);
  const docs = Array.from({ length: 150 }, (_, i) =>
    JSON.stringify(instance(schema, schema, rng), null, i % 3 === 0 ? undefined : i % 3),
  );

  it("accepts every prefix of 150 random instances and completes each", () => {
    const a = compileSchema(schema);
    for (const doc of docs) {
      expect(conforms(JSON.parse(doc), schema, schema)).toBe(true);
      const s = runBytes(a, a.start, bytes(doc));
      expect(s, doc).not.toBeNull();
      expect(a.isDone(s!), doc).toBe(true);
    }
  });

  it("one-character edits: accepted and complete exactly when they parse and conform", () => {
    const a = compileSchema(schema);
    let valid = 0;
    let invalid = 0;
    for (const edited of oneCharEdits(docs, rng, EDITS, 12)) {
      let want = false;
      try {
        want = conforms(JSON.parse(edited), schema, schema);
      } catch {}
      const s = runBytes(a, a.start, bytes(edited));
      expect(s !== null && a.isDone(s), edited).toBe(want);
      if (want) valid++;
      else invalid++;
    }
    expect(valid).toBeGreaterThan(100);
    expect(invalid).toBeGreaterThan(500);
  });
});

describe("a schema's masks", () => {
  const texts = [
    ...JSON_CHARS,
    ".",
    "e",
    "0",
    "1",
    "2",
    "3",
    "12",
    "123",
    "1.5",
    "true",
    "tr",
    "ue",
    "null",
    "fal",
    "se",
    "a",
    '"name',
    '":',
    '"admin"',
    '"ad',
    "min",
    '"}',
    "},",
    "],",
    '"fixed"',
    "é",
    '":"',
    '{"',
    "4.5",
    "x",
    "y",
  ];
  const tokenBytes: (Uint8Array | null)[] = [null, ...texts.map(bytes)];
  const V = tokenBytes.length + 3;
  const a = compileSchema(PERSON);
  const grammar = new TokenGrammar(a, new Vocabulary(tokenBytes, V));
  const rng = new Prng(3);
  const states: SchemaState[] = [a.start];
  for (let d = 0; d < 30; d++) {
    let s: SchemaState | null = a.start;
    for (const x of bytes(JSON.stringify(instance(PERSON, PERSON, rng), null, d % 2))) {
      s = a.step(s!, x);
      if (rng.uniform() < 0.25) states.push(s!);
    }
  }

  it(`equal checking every token, in ${states.length} states along random instances`, () => {
    expectExactMasks(grammar, a, states, tokenBytes, V);
  });

  // States with several readings at once (unions).
  const u = compileSchema(UNIONS);
  const unionGrammar = new TokenGrammar(u, new Vocabulary(tokenBytes, V));
  const unionStates: SchemaState[] = [u.start];
  for (let d = 0; d < 30; d++) {
    let s: SchemaState | null = u.start;
    for (const x of bytes(JSON.stringify(instance(UNIONS, UNIONS, rng), null, d % 2))) {
      s = u.step(s!, x);
      if (rng.uniform() < 0.25) unionStates.push(s!);
    }
  }

  it(`equal checking every token in ${unionStates.length} states of a schema of unions`, () => {
    expect(unionStates.some((s) => s.stacks.length > 1)).toBe(true);
    expectExactMasks(unionGrammar, u, unionStates, tokenBytes, V);
  });
});

describe("patternProperties: one pattern, as a map", () => {
  const accepted = (schema: Schema, text: string) => {
    const r = check(schema, text);
    return r.refusedAt < 0 && r.done;
  };
  // biome-ignore format: a table
  it.each([
    {
      name: "keys match the pattern, values its schema",
      schema: { type: "object", patternProperties: { "^x-[a-z]+$": { type: "integer" } }, additionalProperties: false },
      yes: ["{}", '{"x-a":1}', '{"x-a":1,"x-bc":-2}'],
      no: ['{"y":1}', '{"x-a":"s"}', '{"x-A":1}', '{"x-":1}'],
    },
    {
      name: "a pattern is a search, not anchored",
      schema: { type: "object", patternProperties: { ab: { type: "boolean" } } },
      yes: ['{"xaby":true}', '{"ab":false}'],
      no: ['{"xy":true}', '{"ab":1}'],
    },
    {
      name: "with maxProperties",
      schema: { type: "object", patternProperties: { "^[a-z]$": {} }, maxProperties: 1 },
      yes: ['{"a":[1]}'],
      no: ['{"a":1,"b":2}'],
    },
  ])("$name", ({ schema, yes, no }) => {
    for (const t of yes) expect(accepted(schema, t), t).toBe(true);
    for (const t of no) expect(accepted(schema, t), t).toBe(false);
  });

  // biome-ignore format: a table
  it.each([
    ["two patterns", { type: "object", patternProperties: { a: {}, b: {} } }],
    ["beside properties", { type: "object", properties: { a: {} }, patternProperties: { b: {} } }],
    ["beside propertyNames", { type: "object", propertyNames: { maxLength: 3 }, patternProperties: { b: {} } }],
    ["not an object", { type: "object", patternProperties: [] }],
  ])("refuses %s (lenient: not enforced)", (_name, schema) => {
    expect(() => compileSchema(schema)).toThrow(ApiError);
    if (_name !== "not an object")
      expect(() => compileSchema(schema, undefined, { lenient: true })).not.toThrow();
  });
});
