// Context-free grammars in GBNF (llama.cpp's grammar format, which xgrammar's EBNF and vLLM's
// `guided_grammar` also take) as a byte automaton for constrained decoding (guided.ts).
//
//   root   ::= answer ("," answer)*      # rules: name ::= alternatives; `root` is the start
//   answer ::= "yes" | "no" | [0-9]+ | ( "maybe" ws )? [a-z]{2,4} | .
//
// Elements: "literals" and 'literals' (escapes \n \r \t \\ \" \' \xHH \uHHHH \UHHHHHHHH),
// character classes [a-z_] and [^"\\] (the same escapes, ranges), `.` (any character),
// rule names, ( groups ); postfix `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`. `#` starts a comment.
// Newlines are spaces: a rule ends where the next `name ::=` begins.
//
// The recognizer is llama.cpp's: a state is a set of stacks of grammar positions, each stack
// one way the text so far can continue, its top the character class the next character must
// match. A character advances every stack whose top matches it; rule references on top are
// expanded into their alternatives at once. Characters arrive as UTF-8 bytes: between a
// character's bytes the state keeps what the character can still become, and a byte is
// allowed while some stack accepts one of those characters. Compile-time work keeps the
// expansion finite and every state alive: left recursion is rewritten to right recursion
// (ADR 0046); undefined rules, left recursion behind a rule that can be empty, and rules that
// derive no finite string are refused (alternatives using the latter are dropped). Stacks
// are hash-consed linked nodes, so a step costs the same at any nesting depth; inside a
// string, a frame on every stack that only a quote can complete gives grammar.ts's local
// part (quote-free tokens judged once per kind of string). ADRs 0018, 0046.
import type { ByteAutomaton } from "./grammar.ts";
import { SYMBOL_BASE } from "./grammar.ts";

/** A grammar that cannot be compiled; the message says where. */
export class GrammarError extends Error {}

const MAX_CP = 0x10ffff;
/** Grammar text, at most (characters). */
export const MAX_GRAMMAR_CHARS = 64 * 1024;
/** Positions in the compiled grammar, at most (repetitions expand). */
const MAX_POSITIONS = 100_000;
/** Ways to continue a state keeps, at most: past it an ambiguous grammar keeps a subset. */
const MAX_STACKS = 512;
/**
 * Stacks one step visits, at most: past it the step keeps the ways found so far (a grammar
 * whose start needs more is refused).
 */
const MAX_EXPANSIONS = 20_000;
/** Entries of each table that only saves work (nodes, stack sets, steps) before it starts over. */
const MAX_TABLE = 200_000;
/** Groups nested in groups, at most (the parser recurses). */
const MAX_NESTING = 100;

// ---- parsing: text to rules of alternatives of elements ----

/** A character class: sorted, disjoint, inclusive ranges [lo0, hi0, lo1, hi1, ...]. */
export type Ranges = readonly number[];
export type Element = { readonly chars: Ranges } | { readonly rule: number };
export type Alternative = Element[];

/**
 * A class from inclusive ranges in any order (complemented when negated): sorted and merged,
 * surrogates taken out.
 */
export function charClass(ranges: readonly (readonly [number, number])[], negated = false): Ranges {
  const r = characters(ranges, negated);
  const out: number[] = [];
  for (let i = 0; i < r.length; i += 2) {
    const lo = r[i]!;
    const hi = r[i + 1]!;
    if (lo < 0xd800) out.push(lo, Math.min(hi, 0xd7ff));
    if (hi > 0xdfff) out.push(Math.max(lo, 0xe000), hi);
  }
  return out;
}

function characters(ranges: readonly (readonly [number, number])[], negated: boolean): Ranges {
  const sorted = ranges.filter(([lo, hi]) => lo <= hi).sort((a, b) => a[0] - b[0]);
  const merged: [number, number][] = [];
  for (const [lo, hi] of sorted) {
    const last = merged.at(-1);
    if (last && lo <= last[1] + 1) last[1] = Math.max(last[1], hi);
    else merged.push([lo, hi]);
  }
  if (!negated) return merged.flat();
  const out: number[] = [];
  let next = 0;
  for (const [lo, hi] of merged) {
    if (lo > next) out.push(next, lo - 1);
    next = hi + 1;
  }
  if (next <= MAX_CP) out.push(next, MAX_CP);
  return out;
}

/**
 * Rules as they are read: named ones (a name used before its definition gets its id then)
 * and generated ones (groups, repetitions). GBNF's parser fills one; so does lark.ts.
 */
export class RuleSet {
  readonly names = new Map<string, number>();
  /** Per rule: its alternatives (null: used, not defined yet). */
  readonly rules: (Alternative[] | null)[] = [];
  readonly ruleNames: string[] = [];
  /** Where each named rule was first used ("line 3"), for the message when it is undefined. */
  readonly usedAt = new Map<number, string>();
  #generated = 0;

  /** The id of the rule named `name` (a new, undefined one the first time). */
  ruleId(name: string): number {
    let id = this.names.get(name);
    if (id === undefined) {
      id = this.rules.length;
      this.names.set(name, id);
      this.rules.push(null);
      this.ruleNames.push(name);
    }
    return id;
  }

  /** A rule without a name of its own (`label` says what it is in messages). */
  newRule(alts: Alternative[] | null, label = "generated"): number {
    const id = this.rules.length;
    this.rules.push(alts);
    this.ruleNames.push(`(${label} ${++this.#generated})`);
    return id;
  }

  /** `item` min to max (Infinity: unbounded) times, as elements of a sequence. */
  repeat(item: Element, min: number, max: number): Element[] {
    const seq: Element[] = [];
    for (let i = 0; i < min; i++) seq.push(item);
    if (max === Number.POSITIVE_INFINITY) {
      // star ::= item star | ""  (right recursion: the stack does not grow)
      const star = this.newRule(null);
      this.rules[star] = [[item, { rule: star }], []];
      seq.push({ rule: star });
    } else if (max > min) {
      // opt_k ::= item opt_{k-1} | ""  for the max - min optional copies
      let tail: number | null = null;
      for (let k = 0; k < max - min; k++)
        tail = this.newRule([tail === null ? [item] : [item, { rule: tail }], []]);
      seq.push({ rule: tail! });
    }
    return seq;
  }
}

class Parser {
  readonly #src: string;
  #at = 0;
  readonly set = new RuleSet();
  /** Groups open around the current position. */
  #depth = 0;

  constructor(src: string) {
    this.#src = src;
  }

  parse(): void {
    this.#space();
    if (this.#at >= this.#src.length) this.#fail("the grammar is empty");
    while (this.#at < this.#src.length) {
      const start = this.#at;
      const name = this.#name();
      this.#space();
      if (!this.#src.startsWith("::=", this.#at))
        this.#fail(`expected '::=' after rule name '${name}'`);
      this.#at += 3;
      const id = this.set.ruleId(name);
      if (this.set.rules[id]) this.#fail(`rule '${name}' is defined twice`, start);
      this.set.rules[id] = this.#alternatives(false);
    }
  }

  #fail(message: string, at = this.#at): never {
    const line = this.#src.slice(0, at).split("\n").length;
    const col = at - this.#src.lastIndexOf("\n", at - 1);
    throw new GrammarError(`${message} (line ${line}, column ${col})`);
  }

  /** Spaces, newlines and comments. */
  #space(): void {
    const s = this.#src;
    while (this.#at < s.length) {
      const c = s[this.#at]!;
      if (c === "#") while (this.#at < s.length && s[this.#at] !== "\n") this.#at++;
      else if (c === " " || c === "\t" || c === "\n" || c === "\r") this.#at++;
      else break;
    }
  }

  #name(): string {
    const m = /^[A-Za-z0-9_-]+/.exec(this.#src.slice(this.#at, this.#at + 256));
    if (!m) this.#fail("expected a rule name");
    this.#at += m[0].length;
    return m[0];
  }

  /** Whether a `name ::=` starts here (the current rule ends before it). */
  #ruleStart(): boolean {
    return /^[A-Za-z0-9_-]+[ \t\r\n]*::=/.test(this.#src.slice(this.#at, this.#at + 300));
  }

  #alternatives(nested: boolean): Alternative[] {
    const alts: Alternative[] = [this.#sequence(nested)];
    while (this.#src[this.#at] === "|") {
      this.#at++;
      alts.push(this.#sequence(nested));
    }
    return alts;
  }

  #sequence(nested: boolean): Alternative {
    const seq: Alternative = [];
    for (;;) {
      this.#space();
      const c = this.#src[this.#at];
      if (c === undefined || c === "|" || c === ")") break;
      if (!nested && this.#ruleStart()) break;
      const start = seq.length;
      this.#element(seq);
      this.#space();
      // Operators apply in turn to what is there ("a"*? is ("a"*)?, as llama.cpp reads it).
      while ("*+?{".includes(this.#src[this.#at] ?? " ")) {
        this.#postfix(seq, start);
        this.#space();
      }
    }
    return seq;
  }

  /** One element (a literal: one per character) appended to `seq`. */
  #element(seq: Alternative): void {
    const s = this.#src;
    const c = s[this.#at]!;
    if (c === '"' || c === "'") {
      this.#at++;
      while (s[this.#at] !== c) {
        if (this.#at >= s.length) this.#fail("unterminated literal");
        const cp = this.#char();
        seq.push({ chars: [cp, cp] });
      }
      this.#at++;
      return;
    }
    if (c === "[") {
      this.#at++;
      const negated = s[this.#at] === "^";
      if (negated) this.#at++;
      const ranges: [number, number][] = [];
      while (s[this.#at] !== "]") {
        if (this.#at >= s.length) this.#fail("unterminated character class");
        const lo = this.#char();
        let hi = lo;
        if (s[this.#at] === "-" && s[this.#at + 1] !== "]") {
          this.#at++;
          hi = this.#char();
          if (hi < lo) this.#fail("a character range runs backwards");
        }
        ranges.push([lo, hi]);
      }
      this.#at++;
      const chars = charClass(ranges, negated);
      if (chars.length === 0) this.#fail("the character class matches no character");
      seq.push({ chars });
      return;
    }
    if (c === ".") {
      this.#at++;
      seq.push({ chars: [0, MAX_CP] });
      return;
    }
    if (c === "(") {
      if (++this.#depth > MAX_NESTING) this.#fail(`groups nested more than ${MAX_NESTING} deep`);
      this.#at++;
      const alts = this.#alternatives(true);
      this.#depth--;
      if (s[this.#at] !== ")") this.#fail("expected ')'");
      this.#at++;
      seq.push({ rule: this.set.newRule(alts) });
      return;
    }
    if (/[A-Za-z0-9_-]/.test(c)) {
      const at = this.#at;
      const id = this.set.ruleId(this.#name());
      if (!this.set.usedAt.has(id))
        this.set.usedAt.set(id, `line ${this.#src.slice(0, at).split("\n").length}`);
      seq.push({ rule: id });
      return;
    }
    this.#fail(`unexpected '${c}'`);
  }

  /** One character of a literal or class, escapes decoded. */
  #char(): number {
    const s = this.#src;
    const cp = s.codePointAt(this.#at)!;
    if (cp !== 0x5c) {
      if (cp >= 0xd800 && cp <= 0xdfff) this.#fail("a lone surrogate is not a character");
      this.#at += cp > 0xffff ? 2 : 1;
      return cp;
    }
    const e = s[this.#at + 1];
    this.#at += 2;
    const simple: Record<string, number> = { n: 10, r: 13, t: 9, "0": 0 };
    if (e !== undefined && e in simple) return simple[e]!;
    const hex = { x: 2, u: 4, U: 8 }[e as "x" | "u" | "U"];
    if (hex) {
      const digits = s.slice(this.#at, this.#at + hex);
      if (!new RegExp(`^[0-9a-fA-F]{${hex}}$`).test(digits))
        this.#fail(`\\${e} needs ${hex} hex digits`);
      this.#at += hex;
      const v = Number.parseInt(digits, 16);
      if (v > MAX_CP || (v >= 0xd800 && v <= 0xdfff))
        this.#fail(`\\${e}${digits} is not a character`);
      return v;
    }
    if (e === undefined) this.#fail("a lone backslash");
    return e.codePointAt(0)!; // \\ \" \' \[ \] \- \^ \/ ...: the character itself
  }

  /** `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}` on the element(s) from `start` (one element). */
  #postfix(seq: Alternative, start: number): void {
    const s = this.#src;
    const op = s[this.#at];
    if (op !== "*" && op !== "+" && op !== "?" && op !== "{") return;
    // A literal's characters: the operator binds to the whole literal, as in llama.cpp.
    const item: Element =
      seq.length - start === 1 ? seq[start]! : { rule: this.set.newRule([seq.slice(start)]) };
    seq.length = start;
    let min: number;
    let max: number;
    if (op === "{") {
      const m = /^\{\s*(\d+)\s*(,\s*(\d*)\s*)?\}/.exec(s.slice(this.#at, this.#at + 32));
      if (!m) this.#fail("expected {m}, {m,} or {m,n}");
      this.#at += m[0].length;
      min = Number(m[1]);
      max = m[2] === undefined ? min : m[3] === "" ? Number.POSITIVE_INFINITY : Number(m[3]);
      if (max < min) this.#fail("{m,n} with n < m");
      if (min > 1000 || (Number.isFinite(max) && max > 1000))
        this.#fail("repetition counts above 1000");
    } else {
      this.#at++;
      [min, max] =
        op === "*"
          ? [0, Number.POSITIVE_INFINITY]
          : op === "+"
            ? [1, Number.POSITIVE_INFINITY]
            : [0, 1];
    }
    seq.push(...this.set.repeat(item, min, max));
  }
}

// ---- compiling: checks, then rules flattened into positions ----

/** A compiled grammar: positions, each a character class or a rule reference or an end. */
export class Grammar {
  /** Per position: -1 the end of an alternative, -2 - ruleId a reference, else a class index. */
  readonly code: Int32Array;
  readonly classes: Ranges[];
  /** Per rule: the positions its alternatives start at. */
  readonly starts: number[][];
  readonly root: number;

  constructor(code: Int32Array, classes: Ranges[], starts: number[][], root: number) {
    this.code = code;
    this.classes = classes;
    this.starts = starts;
    this.root = root;
  }
}

/** Compiles GBNF text (GrammarError for anything wrong, with line and column). */
export function compileGrammar(text: string, rootName = "root"): Grammar {
  if (text.length > MAX_GRAMMAR_CHARS)
    throw new GrammarError(`the grammar is longer than ${MAX_GRAMMAR_CHARS} characters`);
  const p = new Parser(text);
  p.parse();
  return compileRules(p.set, rootName);
}

/**
 * Compiles rules read from a grammar (GrammarError for a rule used but not defined, a root
 * that derives nothing, left recursion that cannot be rewritten, a grammar too large).
 */
export function compileRules(set: RuleSet, rootName: string): Grammar {
  const root = set.names.get(rootName);
  if (root === undefined || !set.rules[root])
    throw new GrammarError(`the grammar has no '${rootName}' rule`);
  for (const [id, at] of set.usedAt)
    if (!set.rules[id])
      throw new GrammarError(`rule '${set.ruleNames[id]}' is used (${at}) but not defined`);
  const rules = set.rules as Alternative[][];
  const isRef = (e: Element): e is { rule: number } => "rule" in e;

  // Rules that derive a finite string; alternatives through the others are dropped.
  let n = rules.length;
  const productive = new Uint8Array(n);
  for (let changed = true; changed; ) {
    changed = false;
    for (let r = 0; r < n; r++)
      if (
        !productive[r] &&
        rules[r]!.some((alt) => alt.every((e) => !isRef(e) || productive[e.rule]))
      ) {
        productive[r] = 1;
        changed = true;
      }
  }
  if (!productive[root])
    throw new GrammarError(`'${rootName}' derives no finite string (every way recurses forever)`);
  for (let r = 0; r < n; r++)
    rules[r] = rules[r]!.filter((alt) => alt.every((e) => !isRef(e) || productive[e.rule]));

  rewriteLeftRecursion(set);
  n = rules.length;

  // Left recursion (through nullable prefixes) would make the expansion endless.
  const nullable = new Uint8Array(n);
  for (let changed = true; changed; ) {
    changed = false;
    for (let r = 0; r < n; r++)
      if (!nullable[r] && rules[r]!.some((alt) => alt.every((e) => isRef(e) && nullable[e.rule]))) {
        nullable[r] = 1;
        changed = true;
      }
  }
  const left: number[][] = rules.map((alts) => {
    const out: number[] = [];
    for (const alt of alts)
      for (const e of alt) {
        if (!isRef(e)) break;
        out.push(e.rule);
        if (!nullable[e.rule]) break;
      }
    return out;
  });
  const mark = new Uint8Array(n); // 1 on the path, 2 done
  const path: number[] = [];
  const visit = (r: number): void => {
    mark[r] = 1;
    path.push(r);
    for (const s of left[r]!) {
      if (mark[s] === 1) {
        const cycle = [...path.slice(path.indexOf(s)), s].map((x) => set.ruleNames[x]);
        throw new GrammarError(
          `left recursion through a rule that can be empty: ${cycle.join(" -> ")} (rewrite it with repetition)`,
        );
      }
      if (mark[s] === 0) visit(s);
    }
    path.pop();
    mark[r] = 2;
  };
  for (let r = 0; r < n; r++) if (mark[r] === 0) visit(r);

  // Flatten: each alternative's elements, then -1.
  const code: number[] = [];
  const classes: Ranges[] = [];
  const classIds = new Map<string, number>();
  const starts: number[][] = rules.map((alts) =>
    alts.map((alt) => {
      const at = code.length;
      for (const e of alt) {
        if ("rule" in e) code.push(-2 - e.rule);
        else {
          const k = e.chars.join(",");
          let id = classIds.get(k);
          if (id === undefined) {
            id = classes.length;
            classes.push(e.chars);
            classIds.set(k, id);
          }
          code.push(id);
        }
      }
      code.push(-1);
      if (code.length > MAX_POSITIONS)
        throw new GrammarError(`the grammar expands to more than ${MAX_POSITIONS} positions`);
      return at;
    }),
  );
  return new Grammar(Int32Array.from(code), classes, starts, root);
}

/**
 * Left recursion (`expr ::= expr "+" term | term`, directly or through other rules' first
 * elements) rewritten to right recursion, which the recognizer's expansion can follow:
 * within each cycle of rules that begin with one another, rules in turn take the
 * alternatives of earlier ones in place of a leading reference (Paull's algorithm), then
 * `a ::= a x | y` becomes `a ::= y a'`, `a' ::= x a' | ""`. The language is the same. Left
 * recursion hidden behind a rule that can be empty is left for compileRules to refuse.
 */
function rewriteLeftRecursion(set: RuleSet): void {
  const rules = set.rules as Alternative[][];
  const lead = (alt: Alternative): number => {
    const e = alt[0];
    return e !== undefined && "rule" in e ? e.rule : -1;
  };
  let size = 0;
  for (const alts of rules) for (const alt of alts) size += alt.length + 1;
  const grow = (name: string, by: number): void => {
    size += by;
    if (size > MAX_POSITIONS)
      throw new GrammarError(
        `rewriting the left recursion through '${name}' makes the grammar larger than ${MAX_POSITIONS} positions`,
      );
  };
  for (const cycle of leadCycles(rules, lead)) {
    for (let i = 0; i < cycle.length; i++) {
      const a = cycle[i]!;
      const name = set.ruleNames[a]!;
      for (let j = 0; j < i; j++) {
        const b = cycle[j]!;
        if (!rules[a]!.some((alt) => lead(alt) === b)) continue;
        const out: Alternative[] = [];
        for (const alt of rules[a]!) {
          if (lead(alt) !== b) {
            out.push(alt);
            continue;
          }
          for (const d of rules[b]!) {
            out.push([...d, ...alt.slice(1)]);
            grow(name, d.length + alt.length);
          }
        }
        rules[a] = out;
      }
      const recursive = rules[a]!.filter((alt) => lead(alt) === a);
      if (recursive.length === 0) continue;
      // a ::= a (alone) adds nothing; a ::= a x | y is y x*.
      const tails = recursive.map((alt) => alt.slice(1)).filter((t) => t.length > 0);
      const bases = rules[a]!.filter((alt) => lead(alt) !== a);
      if (tails.length === 0) {
        rules[a] = bases;
        continue;
      }
      const tail = set.newRule(null, `${name}, left recursion rewritten`);
      rules[tail] = [...tails.map((t) => [...t, { rule: tail }]), []];
      rules[a] = bases.map((b) => [...b, { rule: tail }]);
      grow(name, tails.length + bases.length + 1);
    }
  }
}

/**
 * The rules of each cycle of first references (strongly connected components of "an
 * alternative of r begins with s" that hold a cycle), each in the order found (Tarjan).
 */
function leadCycles(
  rules: readonly Alternative[][],
  lead: (alt: Alternative) => number,
): number[][] {
  const n = rules.length;
  const index = new Int32Array(n).fill(-1);
  const low = new Int32Array(n);
  const onStack = new Uint8Array(n);
  const stack: number[] = [];
  const out: number[][] = [];
  let next = 0;
  const succ = (r: number): number[] => [...new Set(rules[r]!.map(lead).filter((s) => s >= 0))];
  // Iterative: a grammar's chains of first references can be long.
  for (let root = 0; root < n; root++) {
    if (index[root]! >= 0) continue;
    const work: { r: number; edges: number[]; k: number }[] = [];
    const open = (r: number) => {
      index[r] = low[r] = next++;
      stack.push(r);
      onStack[r] = 1;
      work.push({ r, edges: succ(r), k: 0 });
    };
    open(root);
    while (work.length > 0) {
      const top = work.at(-1)!;
      if (top.k < top.edges.length) {
        const s = top.edges[top.k++]!;
        if (index[s]! < 0) open(s);
        else if (onStack[s]) low[top.r] = Math.min(low[top.r]!, index[s]!);
        continue;
      }
      work.pop();
      const parent = work.at(-1);
      if (parent) low[parent.r] = Math.min(low[parent.r]!, low[top.r]!);
      if (low[top.r] !== index[top.r]) continue;
      const component: number[] = [];
      let s: number;
      do {
        s = stack.pop()!;
        onStack[s] = 0;
        component.push(s);
      } while (s !== top.r);
      if (component.length > 1 || rules[top.r]!.some((alt) => lead(alt) === top.r))
        out.push(component.reverse());
    }
  }
  return out;
}

// ---- recognizing: stack sets, stepped by code points, fed by UTF-8 bytes ----

/** Whether the class has a character in [lo, hi]. */
function meets(r: Ranges, lo: number, hi: number): boolean {
  if (lo > hi) return false;
  for (let i = 0; i < r.length; i += 2) {
    if (r[i]! > hi) return false;
    if (r[i + 1]! >= lo) return true;
  }
  return false;
}

function contains(r: Ranges, cp: number): boolean {
  return meets(r, cp, cp);
}

/**
 * A stack of grammar positions as a linked list, top first, hash-consed: one node per
 * (position, rest), so equal stacks are one object with one id, and a step costs the same
 * at any depth. The empty stack (the text is complete) is null.
 */
interface Node {
  readonly pos: number;
  readonly up: Node | null;
  readonly id: number;
}

/** Ways the text so far can continue: stacks, each with a class on top, or empty. */
interface StackSet {
  readonly id: number;
  readonly stacks: readonly (Node | null)[];
  /** Some stack is empty: the text so far is in the language. */
  readonly accepting: boolean;
  /** Some stack has a character class on top: more text may follow. */
  readonly open: boolean;
  /** The state between characters with these stacks (one object per set). */
  state?: CfgState;
  /** Its local part (GrammarText.local), once worked out. */
  local?: { key: string; byte: number } | null;
}

/** Between characters (n 0), or n continuation bytes still to come of `bits`. */
export interface CfgState {
  readonly set: StackSet;
  readonly n: number;
  readonly bits: number;
  /** The first code point of the character's UTF-8 length (no overlong forms). */
  readonly floor: number;
}

/** Automata made so far (each one's local keys name it). */
let automata = 0;
/** Positions a local key looks at, down each stack, at most. */
const MAX_LOCAL_DEPTH = 64;

/**
 * The local part's byte: the quote alone. The vocabulary's split by it is made at startup
 * (JSON mode's), and strings are where whole-vocabulary walks repeat. Another byte's split
 * would cost a first mask ~0.1 s, for states (numbers, structure) whose walks are cheap anyway.
 */
const LOCAL_BYTE = 0x22;

/**
 * Per position of `g`: 1 where the rest of its alternative, from it on, cannot be matched
 * without a quote: an element that is the quote alone, or a rule every way through which
 * holds one (a string's closing quote in GBNF; the state inside a string of a regular
 * expression's rules, lark.ts, whose every way out ends with the quote).
 */
function quoteGuards(g: Grammar): Uint8Array {
  const { code, classes, starts } = g;
  const quoteOnly = (c: number) => {
    const r = classes[c]!;
    return r.length === 2 && r[0] === LOCAL_BYTE && r[1] === LOCAL_BYTE;
  };
  // Rules with a way through that holds no quote (fixpoint).
  const free = new Uint8Array(starts.length);
  const altFree = (a: number): boolean => {
    for (let p = a; code[p] !== -1; p++) {
      const c = code[p]!;
      if (c >= 0 ? quoteOnly(c) : !free[-2 - c]) return false;
    }
    return true;
  };
  for (let changed = true; changed; ) {
    changed = false;
    for (let r = 0; r < starts.length; r++)
      if (!free[r] && starts[r]!.some(altFree)) {
        free[r] = 1;
        changed = true;
      }
  }
  const guard = new Uint8Array(code.length);
  for (const alts of starts)
    for (const a of alts) {
      let end = a;
      while (code[end] !== -1) end++;
      let needs = false;
      for (let p = end - 1; p >= a; p--) {
        const c = code[p]!;
        needs ||= c >= 0 ? quoteOnly(c) : !free[-2 - c];
        guard[p] = needs ? 1 : 0;
      }
    }
  return guard;
}

/** After the end-of-sequence symbol. */
const DONE: CfgState = {
  set: { id: -1, stacks: [], accepting: true, open: false },
  n: 0,
  bits: 0,
  floor: 0,
};

/** A grammar's outputs as a byte automaton, then the end-of-sequence symbol where complete. */
export class GrammarText implements ByteAutomaton<CfgState> {
  readonly symbols = true;
  readonly start: CfgState;
  readonly #g: Grammar;
  readonly #eos: number | null;
  /**
   * Tables that only save work, each started over when full: nodes by (position, rest),
   * stack sets by their stacks, and steps by (set, code point). Ids never repeat, so a set
   * made again after a table starts over has a new key (a mask computed again), never a
   * wrong one.
   */
  readonly #nodes = new Map<string, Node>();
  readonly #sets = new Map<string, StackSet>();
  readonly #steps = new Map<string, StackSet | null>();
  #ids = 0;
  /**
   * Steps that kept only some of the ways on (MAX_STACKS, MAX_EXPANSIONS): a grammar ambiguous
   * enough that text in its language may be refused after them.
   */
  truncated = 0;
  /** This automaton among all (local keys are kept per vocabulary, for every grammar). */
  readonly #uid = ++automata;
  /**
   * Per position: what is left of its alternative from it on cannot be matched without a
   * quote (LOCAL_BYTE), so a token without one never gets past it.
   */
  readonly #guard: Uint8Array;

  /** `eos`: the end-of-sequence token's symbol (none: the output ends only where forced). */
  constructor(g: Grammar, eos: number | null) {
    this.#g = g;
    this.#eos = eos;
    this.#guard = quoteGuards(g);
    const first: (Node | null)[] = g.starts[g.root]!.map((a) =>
      g.code[a] === -1 ? null : this.#node(a, null),
    );
    const found = this.#expand(first);
    if (found.budgetHit)
      throw new GrammarError(
        `the grammar is too ambiguous: its start expands into more than ${MAX_EXPANSIONS} ways`,
      );
    this.start = this.#at(this.#intern(found.out));
  }

  step(s: CfgState, b: number): CfgState | null {
    if (s === DONE) return null;
    if (b >= SYMBOL_BASE) return b === this.#eos && s.n === 0 && s.set.accepting ? DONE : null;
    const { set } = s;
    if (s.n === 0) {
      if (b < 0x80) {
        const next = this.#advance(set, b);
        return next ? this.#at(next) : null;
      }
      let n: number;
      let bits: number;
      let floor: number;
      if (b >= 0xc2 && b <= 0xdf) [n, bits, floor] = [1, b & 0x1f, 0x80];
      else if (b >= 0xe0 && b <= 0xef) [n, bits, floor] = [2, b & 0x0f, 0x800];
      else if (b >= 0xf0 && b <= 0xf4) [n, bits, floor] = [3, b & 0x07, 0x10000];
      else return null;
      return this.#possible(set, n, bits, floor) ? { set, n, bits, floor } : null;
    }
    if (b < 0x80 || b > 0xbf) return null;
    const bits = (s.bits << 6) | (b & 0x3f);
    const n = s.n - 1;
    if (n > 0)
      return this.#possible(set, n, bits, s.floor) ? { set, n, bits, floor: s.floor } : null;
    if (bits < s.floor || bits > MAX_CP || (bits >= 0xd800 && bits <= 0xdfff)) return null;
    const next = this.#advance(set, bits);
    return next ? this.#at(next) : null;
  }

  isDone(s: CfgState): boolean {
    return s === DONE || (s.n === 0 && s.set.accepting && !s.set.open);
  }

  key(s: CfgState): string {
    return s === DONE
      ? "done"
      : s.n === 0
        ? `${s.set.id}`
        : `${s.set.id}:${s.n}:${s.bits}:${s.floor}`;
  }

  /**
   * grammar.ts's local part: when every stack holds, from its top down, a position whose rest
   * of alternative cannot be matched without a quote (a string's closing quote; in a regular
   * expression's rules, the state inside a string, every way out of which ends with its
   * quote), no token without a quote can get past it, so such tokens are judged by the
   * positions down to it alone. Those positions, per stack, are the key (with this grammar's
   * id: within it, every string of a kind shares the part of the vocabulary without a quote,
   * walked once).
   */
  local(s: CfgState): { key: string; byte: number } | null {
    if (s === DONE || s.n !== 0) return null;
    const set = s.set;
    if (set.local === undefined) set.local = this.#local(set);
    return set.local;
  }

  #local(set: StackSet): { key: string; byte: number } | null {
    const guard = this.#guard;
    // Positions from the top down to the first whose rest needs a quote (null: none within
    // the limit): a token without a quote is judged by those alone.
    const above = (st: Node | null): number[] | null => {
      const out: number[] = [];
      for (let n = st; n !== null && out.length < MAX_LOCAL_DEPTH; n = n.up) {
        out.push(n.pos);
        if (guard[n.pos]) return out;
      }
      return null;
    };
    const parts: string[] = [];
    for (const st of set.stacks) {
      const a = above(st);
      if (a === null) return null;
      parts.push(a.join(","));
    }
    return { key: `gbnf ${this.#uid} ${LOCAL_BYTE} ${parts.sort().join("|")}`, byte: LOCAL_BYTE };
  }

  #at(set: StackSet): CfgState {
    set.state ??= { set, n: 0, bits: 0, floor: 0 };
    return set.state;
  }

  #node(pos: number, up: Node | null): Node {
    const key = `${pos}:${up === null ? -1 : up.id}`;
    let n = this.#nodes.get(key);
    if (n === undefined) {
      if (this.#nodes.size >= MAX_TABLE) this.#nodes.clear();
      n = { pos, up, id: this.#ids++ };
      this.#nodes.set(key, n);
    }
    return n;
  }

  /** Some character that `bits` with n more bytes can become is accepted by some stack. */
  #possible(set: StackSet, n: number, bits: number, floor: number): boolean {
    const span = 2 ** (6 * n); // the code points the n bytes still to come can add
    const lo = Math.max(bits * span, floor);
    const hi = Math.min(bits * span + span - 1, MAX_CP);
    const { code, classes } = this.#g;
    for (const st of set.stacks) {
      if (st === null) continue;
      const r = classes[code[st.pos]!]!;
      // Surrogates are not characters (classes hold none; this is for the range's ends).
      if (meets(r, lo, Math.min(hi, 0xd7ff)) || meets(r, Math.max(lo, 0xe000), hi)) return true;
    }
    return false;
  }

  /** The stacks after code point `cp`, or null when none accepts it. */
  #advance(set: StackSet, cp: number): StackSet | null {
    const key = `${set.id},${cp}`;
    const memo = this.#steps.get(key);
    if (memo !== undefined) return memo;
    const { code, classes } = this.#g;
    const moved: (Node | null)[] = [];
    for (const st of set.stacks)
      if (st !== null && contains(classes[code[st.pos]!]!, cp)) moved.push(this.#pop(st));
    const next = moved.length === 0 ? null : this.#intern(this.#expand(moved).out);
    if (this.#steps.size >= MAX_TABLE) this.#steps.clear();
    this.#steps.set(key, next);
    return next;
  }

  /** The stack after its top position is done: the next position of its sequence, if any. */
  #pop(st: Node): Node | null {
    const after = st.pos + 1;
    return this.#g.code[after] === -1 ? st.up : this.#node(after, st.up);
  }

  /**
   * The stacks with rule references on top replaced by their alternatives, until every top
   * is a character class (or the stack is empty); each stack reached is expanded once, and
   * at most MAX_EXPANSIONS are (past that, the ways found so far).
   */
  #expand(todo: (Node | null)[]): { out: Map<number, Node | null>; budgetHit: boolean } {
    const { code, starts } = this.#g;
    const out = new Map<number, Node | null>();
    const seen = new Set<number>();
    while (todo.length > 0) {
      if (out.size >= MAX_STACKS || seen.size >= MAX_EXPANSIONS) {
        this.truncated++;
        return { out, budgetHit: seen.size >= MAX_EXPANSIONS };
      }
      const st = todo.pop()!;
      if (st === null) {
        out.set(-1, null);
        continue;
      }
      if (seen.has(st.id)) continue; // reached before by another path: the same stacks follow
      seen.add(st.id);
      const c = code[st.pos]!;
      if (c >= 0) {
        out.set(st.id, st);
        continue;
      }
      const rest = this.#pop(st);
      for (const a of starts[-2 - c]!) todo.push(code[a] === -1 ? rest : this.#node(a, rest));
    }
    return { out, budgetHit: false };
  }

  #intern(out: Map<number, Node | null>): StackSet {
    const ids = [...out.keys()].sort((a, b) => a - b);
    const key = ids.join(",");
    const found = this.#sets.get(key);
    if (found) return found;
    if (this.#sets.size >= MAX_TABLE) this.#sets.clear();
    const { code } = this.#g;
    const stacks: (Node | null)[] = ids.map((id) => out.get(id) ?? null);
    const set: StackSet = {
      id: this.#ids++,
      stacks,
      accepting: stacks.includes(null),
      open: stacks.some((st) => st !== null && code[st.pos]! >= 0),
    };
    this.#sets.set(key, set);
    return set;
  }
}
