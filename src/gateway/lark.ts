// Lark grammars (the format of the Python parser Lark, which outlines, guidance/llguidance
// and OpenAI's custom tools take) read into cfg.ts's rules, so the GBNF recognizer
// constrains output to them. ADR 0046.
//
//   start: sum
//   ?sum: sum "+" product | product          // left recursion is fine (cfg.ts rewrites it)
//   ?product: NUMBER | "(" sum ")"
//   %import common.NUMBER
//   %import common.WS
//   %ignore WS
//
// Rules are lowercase (`?rule`, `!rule` and `_rule` read as rule), terminals uppercase;
// "literals" (the `i` flag: any case), /regular expressions/ with flags i and s (Python's
// syntax, regex.ts's Dialect), "a".."z" ranges, ( groups ), [ optional ], `?`, `*`, `+`,
// `~ n`, `~ n..m`, `-> alias` (ignored), priorities (`rule.2:`, ignored), templates
// (`_sep{x, sep}: x (sep x)*` used as `_sep{item, ","}`), `%import common.NAME [-> ALIAS]` and
// `%import common (A, B)` of Lark's common terminals, `%ignore`, `%override`, `%extend`.
// Comments are `//` and `#` to the end of the line; a newline ends a definition unless the
// next line begins with `|`.
//
// The language is Lark's Earley parser's with its default dynamic lexer: every string that
// the rules derive when each terminal is any string it matches, with ignored terminals
// allowed before each terminal and at the end. Terminals hold only terminals. A standard
// lexer's longest-match choices (which can make Lark refuse text the rules derive) are not
// modelled. `%declare` (terminals made by a post-lexer), imports of files or of Lark's other
// modules, and llguidance's extensions (`%json`, special tokens) are refused.
import {
  type Alternative,
  charClass,
  compileRules,
  type Element,
  type Grammar,
  GrammarError,
  MAX_GRAMMAR_CHARS,
  RuleSet,
} from "./cfg.ts";
import { caseFold, compilePattern, epsilonClosure, RegexError } from "./regex.ts";

/** Template instances, at most (a template that instantiates itself with new arguments). */
const MAX_INSTANCES = 256;
/** Groups nested in groups, at most (the parser recurses). */
const MAX_NESTING = 100;
/** `~ n..m` counts, at most (as GBNF's {m,n}). */
const MAX_COUNT = 1000;

/** Whether `text` is GBNF (it has a `name ::=`) rather than Lark. */
export function isGbnf(text: string): boolean {
  return /^[ \t]*[A-Za-z0-9_-]+[ \t]*::=/m.test(text);
}

// ---- tokens ----

type Kind = "rule" | "term" | "string" | "regexp" | "number" | "directive" | "nl" | "punct" | "end";

interface Token {
  readonly kind: Kind;
  readonly text: string;
  /** Offset in the grammar text. */
  readonly at: number;
}

const PUNCT = [
  "->",
  "..",
  ":",
  "|",
  "(",
  ")",
  "[",
  "]",
  "{",
  "}",
  ",",
  "~",
  ".",
  "*",
  "+",
  "?",
  "!",
];

function where(src: string, at: number): string {
  const line = src.slice(0, at).split("\n").length;
  const col = at - src.lastIndexOf("\n", at - 1);
  return `line ${line}, column ${col}`;
}

function fail(src: string, message: string, at: number): never {
  throw new GrammarError(`${message} (${where(src, at)})`);
}

function tokenize(src: string): Token[] {
  const out: Token[] = [];
  let depth = 0;
  let i = 0;
  const push = (kind: Kind, from: number) => out.push({ kind, text: src.slice(from, i), at: from });
  while (i < src.length) {
    const c = src[i]!;
    if (c === " " || c === "\t" || c === "\f" || c === "\r") {
      i++;
    } else if (c === "\\" && /^\\[ \t]*\r?\n/.test(src.slice(i, i + 64))) {
      i = src.indexOf("\n", i) + 1; // a backslash ends the line: the definition goes on
    } else if (c === "#" || (c === "/" && src[i + 1] === "/")) {
      while (i < src.length && src[i] !== "\n") i++;
    } else if (c === "\n") {
      if (depth === 0 && out.at(-1)?.kind !== "nl") out.push({ kind: "nl", text: "\n", at: i });
      i++;
    } else if (c === '"') {
      const from = i++;
      while (i < src.length && src[i] !== '"' && src[i] !== "\n") i += src[i] === "\\" ? 2 : 1;
      if (src[i] !== '"') fail(src, "unterminated string", from);
      i++;
      if (src[i] === "i" && !/[A-Za-z0-9_]/.test(src[i + 1] ?? "")) i++;
      push("string", from);
    } else if (c === "/") {
      const from = i++;
      while (i < src.length && src[i] !== "/") i += src[i] === "\\" ? 2 : 1;
      if (src[i] !== "/") fail(src, "unterminated regular expression", from);
      i++;
      while (/[a-z]/.test(src[i] ?? "")) i++;
      push("regexp", from);
    } else if (/[0-9]/.test(c) || (c === "-" && /[0-9]/.test(src[i + 1] ?? ""))) {
      const from = i++;
      while (/[0-9]/.test(src[i] ?? "")) i++;
      push("number", from);
    } else if (c === "%") {
      const from = i++;
      while (/[a-z_]/.test(src[i] ?? "")) i++;
      push("directive", from);
    } else if (/[A-Za-z_]/.test(c)) {
      const from = i;
      while (/[A-Za-z0-9_]/.test(src[i] ?? "")) i++;
      const name = src.slice(from, i);
      if (/^_*[a-z][_a-z0-9]*$/.test(name)) push("rule", from);
      else if (/^_*[A-Z][_A-Z0-9]*$/.test(name)) push("term", from);
      else
        fail(src, `'${name}' is neither a rule (lowercase) nor a terminal (uppercase) name`, from);
    } else {
      const p = PUNCT.find((q) => src.startsWith(q, i));
      if (!p) {
        const why = c === "<" ? " (llguidance's special tokens are not read)" : "";
        fail(src, `unexpected '${c}'${why}`, i);
      }
      if ("([{".includes(p)) depth++;
      if (")]}".includes(p)) depth = Math.max(0, depth - 1);
      out.push({ kind: "punct", text: p, at: i });
      i += p.length;
    }
  }
  out.push({ kind: "end", text: "", at: src.length });
  // A newline followed by `|` continues the definition.
  return out.filter((t, k) => !(t.kind === "nl" && out[k + 1]?.text === "|"));
}

// ---- parsing ----

type Node =
  | { readonly k: "seq"; readonly items: readonly Node[] }
  | { readonly k: "alt"; readonly options: readonly Node[] }
  | { readonly k: "repeat"; readonly item: Node; readonly min: number; readonly max: number }
  | {
      readonly k: "literal";
      readonly text: string;
      readonly ignoreCase: boolean;
      readonly at: number;
    }
  | { readonly k: "regexp"; readonly source: string; readonly flags: string; readonly at: number }
  | { readonly k: "range"; readonly lo: number; readonly hi: number; readonly at: number }
  | { readonly k: "ref"; readonly name: string; readonly at: number }
  | {
      readonly k: "template";
      readonly name: string;
      readonly args: readonly Node[];
      readonly at: number;
    };

interface Definition {
  readonly name: string;
  readonly terminal: boolean;
  readonly params: readonly string[];
  body: Node;
  readonly at: number;
}

/** What a grammar text says: its definitions, imports (name to common's name) and ignores. */
interface Parsed {
  readonly definitions: Map<string, Definition>;
  readonly imports: Map<string, { name: string; at: number }>;
  readonly ignores: Node[];
}

/** A Python string literal's characters (Lark reads them with literal_eval). */
function stringValue(src: string, token: Token): string {
  const body = token.text.slice(1, token.text.lastIndexOf('"'));
  let out = "";
  for (let i = 0; i < body.length; i++) {
    const c = body[i]!;
    if (c !== "\\") {
      out += c;
      continue;
    }
    const e = body[++i];
    const simple: Record<string, string> = {
      n: "\n",
      r: "\r",
      t: "\t",
      f: "\f",
      v: "\v",
      a: "\x07",
      b: "\b",
      "0": "\0",
      "\\": "\\",
      '"': '"',
      "'": "'",
    };
    if (e !== undefined && e in simple) {
      out += simple[e];
      continue;
    }
    const hex = { x: 2, u: 4, U: 8 }[e as "x" | "u" | "U"];
    if (hex) {
      const digits = body.slice(i + 1, i + 1 + hex);
      const v = Number.parseInt(digits, 16);
      if (!/^[0-9a-fA-F]+$/.test(digits) || digits.length !== hex || v > 0x10ffff)
        fail(src, `\\${e} needs ${hex} hex digits of a character`, token.at + 1 + i);
      out += String.fromCodePoint(v);
      i += hex;
      continue;
    }
    out += `\\${e ?? ""}`; // as Python keeps an escape it does not know
  }
  return out;
}

class Parser {
  readonly #src: string;
  readonly #tokens: Token[];
  #i = 0;
  #depth = 0;
  readonly parsed: Parsed = { definitions: new Map(), imports: new Map(), ignores: [] };

  constructor(src: string) {
    this.#src = src;
    this.#tokens = tokenize(src);
  }

  parse(): Parsed {
    for (;;) {
      while (this.#peek().kind === "nl") this.#i++;
      const t = this.#peek();
      if (t.kind === "end") return this.parsed;
      if (t.kind === "directive") this.#directive();
      else this.#define(this.#definition());
      const after = this.#peek();
      if (after.kind !== "nl" && after.kind !== "end")
        this.#fail(`unexpected '${after.text}' (a definition ends at the end of its line)`, after);
    }
  }

  #peek(): Token {
    return this.#tokens[this.#i]!;
  }

  #next(): Token {
    return this.#tokens[this.#i++]!;
  }

  #eat(text: string): boolean {
    const t = this.#peek();
    if (t.kind !== "punct" || t.text !== text) return false;
    this.#i++;
    return true;
  }

  #expect(text: string, what: string): void {
    if (!this.#eat(text)) this.#fail(`expected '${text}' ${what}`, this.#peek());
  }

  #fail(message: string, t: Token): never {
    return fail(this.#src, message, t.at);
  }

  #define(d: Definition): void {
    const defs = this.parsed.definitions;
    if (defs.has(d.name) || this.parsed.imports.has(d.name))
      this.#fail(
        `'${d.name}' is defined twice (%override replaces a definition)`,
        this.#tokenAt(d.at),
      );
    defs.set(d.name, d);
  }

  #tokenAt(at: number): Token {
    return { kind: "end", text: "", at };
  }

  /** `[?!] name [{params}] [.priority] : expansions` */
  #definition(): Definition {
    this.#eat("?") || this.#eat("!");
    const t = this.#next();
    if (t.kind !== "rule" && t.kind !== "term")
      this.#fail(`expected a rule or terminal name, found '${t.text}'`, t);
    const params: string[] = [];
    if (this.#eat("{")) {
      do {
        const p = this.#next();
        if (p.kind !== "rule" && p.kind !== "term") this.#fail("expected a parameter name", p);
        params.push(p.text);
      } while (this.#eat(","));
      this.#expect("}", "after the template's parameters");
    }
    if (this.#eat(".")) {
      const n = this.#next();
      if (n.kind !== "number") this.#fail("expected a priority after '.'", n);
    }
    this.#expect(":", `after '${t.text}'`);
    return {
      name: t.text,
      terminal: t.kind === "term",
      params,
      body: this.#expansions(),
      at: t.at,
    };
  }

  #directive(): void {
    const d = this.#next();
    switch (d.text) {
      case "%ignore":
        this.parsed.ignores.push(this.#expansions());
        return;
      case "%import":
        this.#import(d);
        return;
      case "%override":
      case "%extend": {
        const def = this.#definition();
        const old = this.parsed.definitions.get(def.name);
        const imported = this.parsed.imports.get(def.name);
        if (!old && !imported) this.#fail(`${d.text} of '${def.name}', which is not defined`, d);
        if (d.text === "%override") {
          this.parsed.imports.delete(def.name);
          this.parsed.definitions.set(def.name, def);
        } else if (old) {
          old.body = { k: "alt", options: [old.body, def.body] };
        } else {
          // Extending an import: the imported terminal, or the new alternatives.
          this.parsed.imports.delete(def.name);
          const ref: Node = { k: "ref", name: `common.${imported!.name}`, at: def.at };
          this.parsed.definitions.set(def.name, {
            ...def,
            body: { k: "alt", options: [ref, def.body] },
          });
        }
        return;
      }
      case "%declare":
        this.#fail("%declare (terminals a post-lexer makes) is not supported", d);
        break;
      default:
        this.#fail(
          `unknown directive '${d.text}' (Lark's are %ignore, %import, %override, %extend; llguidance's extensions are not read)`,
          d,
        );
    }
  }

  /** `%import common.NAME [-> ALIAS]` or `%import common (A, B)`. */
  #import(d: Token): void {
    const path: Token[] = [];
    if (this.#peek().text === ".") this.#fail("imports of grammar files are not supported", d);
    do path.push(this.#next());
    while (this.#eat("."));
    if (path[0]!.text !== "common")
      this.#fail(
        `only Lark's common terminals can be imported (%import common.NAME), not '${path.map((p) => p.text).join(".")}'`,
        path[0]!,
      );
    const names: [Token, Token][] = [];
    if (path.length === 1) {
      this.#expect("(", "after %import common (or %import common.NAME)");
      do {
        const n = this.#next();
        names.push([n, n]);
      } while (this.#eat(","));
      this.#expect(")", "after the names imported");
    } else if (path.length === 2) {
      let as = path[1]!;
      if (this.#eat("->")) as = this.#next();
      names.push([path[1]!, as]);
    } else {
      this.#fail("expected %import common.NAME", path[2]!);
    }
    for (const [name, as] of names) {
      if (!COMMON.has(name.text)) this.#fail(`Lark's common module has no '${name.text}'`, name);
      if (as.kind !== "term") this.#fail(`'${as.text}' names a terminal: use uppercase`, as);
      if (this.parsed.definitions.has(as.text) || this.parsed.imports.has(as.text))
        this.#fail(`'${as.text}' is defined twice`, as);
      this.parsed.imports.set(as.text, { name: name.text, at: as.at });
    }
  }

  /** alias ("|" alias)* */
  #expansions(): Node {
    if (++this.#depth > MAX_NESTING)
      this.#fail(`groups nested more than ${MAX_NESTING} deep`, this.#peek());
    const options = [this.#alias()];
    while (this.#eat("|")) options.push(this.#alias());
    this.#depth--;
    return options.length === 1 ? options[0]! : { k: "alt", options };
  }

  /** expr* ["->" alias] */
  #alias(): Node {
    const items: Node[] = [];
    for (;;) {
      const t = this.#peek();
      if (t.kind === "nl" || t.kind === "end") break;
      if (t.kind === "punct" && ["|", ")", "]", "}", ",", "->"].includes(t.text)) break;
      items.push(this.#expr());
    }
    if (this.#eat("->")) {
      const a = this.#next();
      if (a.kind !== "rule") this.#fail("expected a rule name after '->'", a);
    }
    return items.length === 1 ? items[0]! : { k: "seq", items };
  }

  /** atom, then ?, *, +, ~ n, ~ n..m */
  #expr(): Node {
    let node = this.#atom();
    for (;;) {
      const t = this.#peek();
      if (this.#eat("?")) node = { k: "repeat", item: node, min: 0, max: 1 };
      else if (this.#eat("*"))
        node = { k: "repeat", item: node, min: 0, max: Number.POSITIVE_INFINITY };
      else if (this.#eat("+"))
        node = { k: "repeat", item: node, min: 1, max: Number.POSITIVE_INFINITY };
      else if (this.#eat("~")) {
        const min = this.#count();
        const max = this.#eat("..") ? this.#count() : min;
        if (max < min) this.#fail("~ n..m with m < n", t);
        node = { k: "repeat", item: node, min, max };
      } else return node;
    }
  }

  #count(): number {
    const n = this.#next();
    if (n.kind !== "number" || Number(n.text) < 0) this.#fail("expected a count", n);
    const v = Number(n.text);
    if (v > MAX_COUNT) this.#fail(`repetition counts above ${MAX_COUNT}`, n);
    return v;
  }

  #atom(): Node {
    const t = this.#next();
    if (t.kind === "punct" && (t.text === "(" || t.text === "[")) {
      const body = this.#expansions();
      if (t.text === "(") {
        this.#expect(")", "to close the group");
        return body;
      }
      this.#expect("]", "to close the optional part");
      return { k: "repeat", item: body, min: 0, max: 1 };
    }
    if (t.kind === "string") {
      const text = stringValue(this.#src, t);
      if (this.#eat("..")) {
        const u = this.#next();
        if (u.kind !== "string") this.#fail("expected a string after '..'", u);
        const hi = stringValue(this.#src, u);
        const [a, b] = [[...text], [...hi]];
        if (a.length !== 1 || b.length !== 1)
          this.#fail(`a range's ends are single characters ("a".."z")`, t);
        const range: Node = {
          k: "range",
          lo: a[0]!.codePointAt(0)!,
          hi: b[0]!.codePointAt(0)!,
          at: t.at,
        };
        if (range.hi < range.lo) this.#fail("a character range runs backwards", t);
        return range;
      }
      return { k: "literal", text, ignoreCase: t.text.endsWith("i"), at: t.at };
    }
    if (t.kind === "regexp") {
      const end = t.text.lastIndexOf("/");
      return { k: "regexp", source: t.text.slice(1, end), flags: t.text.slice(end + 1), at: t.at };
    }
    if (t.kind === "rule" || t.kind === "term") {
      if (!this.#eat("{")) return { k: "ref", name: t.text, at: t.at };
      const args: Node[] = [];
      do args.push(this.#expansions());
      while (this.#eat(","));
      this.#expect("}", "after the template's arguments");
      return { k: "template", name: t.text, args, at: t.at };
    }
    return this.#fail(
      t.kind === "end" || t.kind === "nl"
        ? "unexpected end of the definition"
        : `unexpected '${t.text}'`,
      t,
    );
  }
}

// ---- Lark's common terminals (lark/grammars/common.lark) ----

/**
 * As Lark defines them, but ESCAPED_STRING and C_COMMENT spelled without the lookbehind and
 * lazy matching Lark's regexes use (the same strings).
 */
const COMMON_TEXT = String.raw`
DIGIT: "0".."9"
HEXDIGIT: "a".."f" | "A".."F" | DIGIT
INT: DIGIT+
SIGNED_INT: ["+" | "-"] INT
DECIMAL: INT "." INT? | "." INT
_EXP: ("e" | "E") SIGNED_INT
FLOAT: INT _EXP | DECIMAL _EXP?
SIGNED_FLOAT: ["+" | "-"] FLOAT
NUMBER: FLOAT | INT
SIGNED_NUMBER: ["+" | "-"] NUMBER
ESCAPED_STRING: /"(?:[^"\\\n]|\\.)*"/
LCASE_LETTER: "a".."z"
UCASE_LETTER: "A".."Z"
LETTER: UCASE_LETTER | LCASE_LETTER
WORD: LETTER+
CNAME: ("_" | LETTER) ("_" | LETTER | DIGIT)*
WS_INLINE: (" " | /\t/)+
WS: /[ \t\f\r\n]/+
CR: /\r/
LF: /\n/
NEWLINE: (CR? LF)+
SH_COMMENT: /#[^\n]*/
CPP_COMMENT: /\/\/[^\n]*/
C_COMMENT: /\/\*(?:[^*]|\*+[^*\/])*\*+\//
SQL_COMMENT: /--[^\n]*/
`;

const COMMON: ReadonlyMap<string, Definition> = new Parser(COMMON_TEXT).parse().definitions;

// ---- compiling: definitions to cfg.ts rules ----

/** Where a name is looked up: the grammar's own, or common's (imported terminals' bodies). */
type Scope = "grammar" | "common";

/** A template's arguments: its parameters' nodes, read where the template was used. */
interface Env {
  readonly args: ReadonlyMap<string, Arg>;
}

/** An argument: its node, where it was written, and its key (instances are kept by them). */
interface Arg {
  readonly node: Node;
  readonly scope: Scope;
  readonly env: Env | null;
  readonly key: string;
}

class Compiler {
  readonly set = new RuleSet();
  readonly #src: string;
  readonly #p: Parsed;
  /** The rule of ignored terminals, repeated (null: no %ignore). */
  #ignore: Element | null = null;
  /** Rules made for definitions and template instances, by key. */
  readonly #made = new Map<string, number>();
  readonly #regexps = new Map<string, Element>();
  #instances = 0;
  /** Arguments' texts as short keys, so that keys of nested instances do not grow. */
  readonly #keys = new Map<string, string>();

  constructor(src: string, parsed: Parsed) {
    this.#src = src;
    this.#p = parsed;
  }

  compile(): Grammar {
    const { definitions, ignores } = this.#p;
    if (ignores.length > 0) {
      const alts = ignores.map((n) => this.#seq(n, true, "grammar", null));
      const any = this.set.newRule(alts, "ignored");
      this.#ignore = this.set.repeat({ rule: any }, 0, Number.POSITIVE_INFINITY)[0]!;
    }
    const start = definitions.get("start");
    if (!start || start.terminal || start.params.length > 0)
      throw new GrammarError("the grammar has no 'start' rule");
    // Every definition, used or not, as Lark checks them all (templates where used).
    for (const d of definitions.values())
      if (d.params.length === 0) this.#definition(d, "grammar", d.name, null);
    const root = this.set.ruleId("%start");
    this.set.rules[root] = [[{ rule: this.#made.get(`grammar:start`)! }, ...this.#ignored()]];
    return compileRules(this.set, "%start");
  }

  #fail(message: string, at: number): never {
    return fail(this.#src, message, at);
  }

  #ignored(): Element[] {
    return this.#ignore ? [this.#ignore] : [];
  }

  /** The rule of definition `d` (made on first use). */
  #definition(d: Definition, scope: Scope, key: string, env: Env | null): number {
    const full = `${scope}:${key}`;
    let id = this.#made.get(full);
    if (id !== undefined) return id;
    id = this.set.ruleId(scope === "common" ? `common.${key}` : key);
    this.#made.set(full, id);
    const options = d.body.k === "alt" ? d.body.options : [d.body];
    this.set.rules[id] = options.map((o) => this.#seq(o, d.terminal, scope, env));
    return id;
  }

  /** Node `n` as a sequence of elements; `terminal`: inside a terminal (nothing ignored). */
  #seq(n: Node, terminal: boolean, scope: Scope, env: Env | null): Alternative {
    switch (n.k) {
      case "seq":
        return n.items.flatMap((item) => this.#seq(item, terminal, scope, env));
      case "alt":
        return [
          { rule: this.set.newRule(n.options.map((o) => this.#seq(o, terminal, scope, env))) },
        ];
      case "repeat": {
        const body = this.#seq(n.item, terminal, scope, env);
        const item: Element = body.length === 1 ? body[0]! : { rule: this.set.newRule([body]) };
        return this.set.repeat(item, n.min, n.max);
      }
      case "literal":
        return this.#lexeme(terminal, this.#literal(n.text, n.ignoreCase));
      case "range":
        return this.#lexeme(terminal, [{ chars: charClass([[n.lo, n.hi]]) }]);
      case "regexp":
        return this.#lexeme(terminal, [this.#regexp(n.source, n.flags, n.at)]);
      case "ref":
        return this.#ref(n, terminal, scope, env);
      case "template":
        return this.#template(n, terminal, scope, env);
    }
  }

  /** A terminal's elements, after what is ignored where a rule uses it. */
  #lexeme(terminal: boolean, elements: Element[]): Element[] {
    return terminal ? elements : [...this.#ignored(), ...elements];
  }

  #literal(text: string, ignoreCase: boolean): Element[] {
    return [...text].map((ch) => {
      const c = ch.codePointAt(0)!;
      return { chars: charClass(pairs(ignoreCase ? caseFold([c, c]) : [c, c])) };
    });
  }

  #ref(n: Node & { k: "ref" }, terminal: boolean, scope: Scope, env: Env | null): Element[] {
    const arg = env?.args.get(n.name);
    if (arg) return this.#seq(arg.node, terminal, arg.scope, arg.env);
    const { definition, scope: found, key } = this.#lookup(n.name, scope, n.at);
    if (definition.params.length > 0)
      this.#fail(`'${n.name}' is a template: use it as ${n.name}{...}`, n.at);
    if (!definition.terminal) {
      if (terminal) this.#fail(`terminals hold only terminals, and '${n.name}' is a rule`, n.at);
      return [{ rule: this.#definition(definition, found, key, null) }];
    }
    return this.#lexeme(terminal, [{ rule: this.#definition(definition, found, key, null) }]);
  }

  #lookup(
    name: string,
    scope: Scope,
    at: number,
  ): { definition: Definition; scope: Scope; key: string } {
    if (name.startsWith("common.")) {
      const key = name.slice("common.".length);
      return { definition: COMMON.get(key)!, scope: "common", key };
    }
    if (scope === "common") {
      const d = COMMON.get(name);
      if (d) return { definition: d, scope, key: name };
    } else {
      const d = this.#p.definitions.get(name);
      if (d) return { definition: d, scope, key: name };
      const imported = this.#p.imports.get(name);
      if (imported)
        return { definition: COMMON.get(imported.name)!, scope: "common", key: imported.name };
    }
    return this.#fail(`'${name}' is used but not defined`, at);
  }

  #template(
    n: Node & { k: "template" },
    terminal: boolean,
    scope: Scope,
    env: Env | null,
  ): Element[] {
    const { definition: d, scope: found, key } = this.#lookup(n.name, scope, n.at);
    if (d.params.length !== n.args.length)
      this.#fail(
        `template '${n.name}' takes ${d.params.length} argument(s), given ${n.args.length}`,
        n.at,
      );
    if (terminal && !d.terminal)
      this.#fail(`terminals hold only terminals, and '${n.name}' is a rule`, n.at);
    // Arguments are read where the template is used; instances are kept by their text.
    const args = new Map<string, Arg>(
      d.params.map((p, k) => [
        p,
        { node: n.args[k]!, scope, env, key: this.#key(n.args[k]!, scope, env) },
      ]),
    );
    const instance = `${key}{${[...args.values()].map((a) => a.key).join(", ")}}`;
    if (!this.#made.has(`${found}:${instance}`) && ++this.#instances > MAX_INSTANCES)
      this.#fail(
        `more than ${MAX_INSTANCES} template instances (a template that grows its own arguments?)`,
        n.at,
      );
    const id = this.#definition(d, found, instance, { args });
    return d.terminal ? this.#lexeme(terminal, [{ rule: id }]) : [{ rule: id }];
  }

  /** A short key for node `n`'s text where it is written. */
  #key(n: Node, scope: Scope, env: Env | null): string {
    const text = nodeKey(n, scope, env);
    let k = this.#keys.get(text);
    if (k === undefined) {
      k = `#${this.#keys.size}`;
      this.#keys.set(text, k);
    }
    return k;
  }

  /** A regular expression as right-linear rules: one per state of its automaton. */
  #regexp(source: string, flags: string, at: number): Element {
    const cacheKey = `${flags}/${source}`;
    const made = this.#regexps.get(cacheKey);
    if (made) return made;
    for (const f of flags)
      if (!"imsu".includes(f))
        this.#fail(`the regular expression flag '${f}' is not supported`, at);
    let nfa: ReturnType<typeof compilePattern>;
    try {
      nfa = compilePattern(source, {
        fullMatch: true,
        dialect: { python: true, ignoreCase: flags.includes("i"), dotAll: flags.includes("s") },
      });
    } catch (err) {
      if (!(err instanceof RegexError)) throw err;
      this.#fail(
        `/${source.length > 40 ? `${source.slice(0, 40)}...` : source}/: ${err.message}`,
        at,
      );
    }
    // A state's rule: per state its ε-closure reaches by a character, that character class
    // then the state's rule ("" where the closure accepts). A state whose closure only
    // accepts ends the alternative instead.
    const rules = new Map<number, number>();
    const todo: number[] = [];
    const closures = new Map<number, number[]>();
    const closure = (q: number) => {
      let c = closures.get(q);
      if (!c) {
        c = epsilonClosure(nfa, [q]);
        closures.set(q, c);
      }
      return c;
    };
    const final = (q: number) => closure(q).every((s) => nfa.edges[s]!.length === 0);
    const ruleOf = (q: number): number => {
      let id = rules.get(q);
      if (id === undefined) {
        id = this.set.newRule(null, "regular expression");
        rules.set(q, id);
        todo.push(q);
      }
      return id;
    };
    const start = ruleOf(nfa.start);
    while (todo.length > 0) {
      const q = todo.pop()!;
      const byTarget = new Map<number, [number, number][]>();
      for (const s of closure(q))
        for (const e of nfa.edges[s]!) {
          const list = byTarget.get(e.to) ?? [];
          byTarget.set(e.to, list);
          list.push(...pairs(e.ranges));
        }
      const alts: Alternative[] = [];
      for (const [to, ranges] of byTarget) {
        const chars = charClass(ranges);
        if (chars.length === 0) continue; // surrogates only
        alts.push(final(to) ? [{ chars }] : [{ chars }, { rule: ruleOf(to) }]);
      }
      if (closure(q).includes(nfa.accept)) alts.push([]);
      this.set.rules[rules.get(q)!] = alts;
    }
    const out: Element = { rule: start };
    this.#regexps.set(cacheKey, out);
    return out;
  }
}

/** Flat ranges as pairs. */
function pairs(r: readonly number[]): [number, number][] {
  const out: [number, number][] = [];
  for (let i = 0; i < r.length; i += 2) out.push([r[i]!, r[i + 1]!]);
  return out;
}

/** A node's text for an instance key (its parameters as their arguments' keys). */
function nodeKey(n: Node, scope: Scope, env: Env | null): string {
  switch (n.k) {
    case "seq":
      return `(${n.items.map((i) => nodeKey(i, scope, env)).join(" ")})`;
    case "alt":
      return `(${n.options.map((i) => nodeKey(i, scope, env)).join(" | ")})`;
    case "repeat":
      return `${nodeKey(n.item, scope, env)}~${n.min}..${n.max}`;
    case "literal":
      return `${JSON.stringify(n.text)}${n.ignoreCase ? "i" : ""}`;
    case "regexp":
      return `/${n.source}/${n.flags}`;
    case "range":
      return `${n.lo}..${n.hi}`;
    case "ref":
      return env?.args.get(n.name)?.key ?? `${scope}:${n.name}`;
    case "template":
      return `${scope}:${n.name}{${n.args.map((a) => nodeKey(a, scope, env)).join(", ")}}`;
  }
}

/** Compiles a Lark grammar (GrammarError for anything wrong, with line and column). */
export function compileLark(text: string): Grammar {
  if (text.length > MAX_GRAMMAR_CHARS)
    throw new GrammarError(`the grammar is longer than ${MAX_GRAMMAR_CHARS} characters`);
  return new Compiler(text, new Parser(text).parse()).compile();
}
