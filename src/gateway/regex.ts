// JSON Schema `pattern` (an ECMA-262 regular expression) compiled to a Thompson NFA over
// Unicode code points, which json-string.ts runs as a lazy DFA to constrain a string.
//
// The syntax is ECMA-262's with the `u` flag (characters are code points; an escape or
// brace that means nothing is an error, not a literal), and no other flag. What matches
// sets of strings is covered: characters, `.`, classes and their escapes, groups,
// alternation and every quantifier (a lazy one accepts the same strings). What looks at
// more than the next character is refused: backreferences, lookaround, \b \B, and `^` /
// `$` other than at the ends of a top-level alternative, where they say "no text before"
// / "no text after" (a pattern matches anywhere in the string). \p{..} is refused rather
// than carrying Unicode's property tables.
//
// `{n,m}` copies its operand, so the automaton's size is bounded (maxStates) while it is
// built: `(a|b){100000}` is refused after maxStates states, not after building them all.

/** A pattern the module cannot compile: message says what and where (it becomes an HTTP 400). */
export class RegexError extends Error {}

/** A Thompson NFA over Unicode code points (0..0x10FFFF). States are 0..size-1. */
export interface Nfa {
  readonly size: number;
  readonly start: number;
  /** The one accepting state. */
  readonly accept: number;
  /** Character edges per state: `ranges` is sorted, disjoint, inclusive [lo0, hi0, lo1, hi1, ...] code point pairs. */
  readonly edges: ReadonlyArray<
    ReadonlyArray<{ readonly ranges: readonly number[]; readonly to: number }>
  >;
  /** Epsilon edges per state. */
  readonly eps: ReadonlyArray<readonly number[]>;
}

const MAX_CODE_POINT = 0x10ffff;
const DEFAULT_MAX_STATES = 4096;
/** Deeper group nesting is refused rather than risking the parser's stack. */
const MAX_DEPTH = 200;

// ---- code point sets ----

/** Inclusive code point ranges [lo0, hi0, lo1, hi1, ...], sorted and disjoint. */
type Ranges = readonly number[];

/** Ranges from pairs in any order, overlapping or adjacent ones merged. */
function normalize(pairs: readonly number[]): Ranges {
  const byLo: [number, number][] = [];
  for (let i = 0; i < pairs.length; i += 2) byLo.push([pairs[i]!, pairs[i + 1]!]);
  byLo.sort((a, b) => a[0] - b[0]);
  const out: number[] = [];
  for (const [lo, hi] of byLo) {
    if (out.length > 0 && lo <= out[out.length - 1]! + 1)
      out[out.length - 1] = Math.max(out[out.length - 1]!, hi);
    else out.push(lo, hi);
  }
  return out;
}

function complement(r: Ranges): Ranges {
  const out: number[] = [];
  let next = 0;
  for (let i = 0; i < r.length; i += 2) {
    if (r[i]! > next) out.push(next, r[i]! - 1);
    next = r[i + 1]! + 1;
  }
  if (next <= MAX_CODE_POINT) out.push(next, MAX_CODE_POINT);
  return out;
}

/** Whether code point c is in r (binary search: classes can have many ranges). */
export function inRanges(r: Ranges, c: number): boolean {
  let lo = 0;
  let hi = r.length / 2 - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (c < r[2 * mid]!) hi = mid - 1;
    else if (c > r[2 * mid + 1]!) lo = mid + 1;
    else return true;
  }
  return false;
}

const ANY: Ranges = [0, MAX_CODE_POINT];
/** `.` without the `s` flag: anything but a line terminator. */
const DOT = complement([0x0a, 0x0a, 0x0d, 0x0d, 0x2028, 0x2029]);
const DIGIT: Ranges = [0x30, 0x39];
/** \w without the `i` flag is ASCII only, even with `u`. */
const WORD = normalize([0x30, 0x39, 0x41, 0x5a, 0x5f, 0x5f, 0x61, 0x7a]);
/** \s: ECMA-262's WhiteSpace (Zs included) and LineTerminator. */
const SPACE = normalize([
  0x09, 0x0d, 0x20, 0x20, 0xa0, 0xa0, 0x1680, 0x1680, 0x2000, 0x200a, 0x2028, 0x2029, 0x202f,
  0x202f, 0x205f, 0x205f, 0x3000, 0x3000, 0xfeff, 0xfeff,
]);
const CLASS_ESCAPES: Readonly<Record<string, Ranges>> = {
  d: DIGIT,
  D: complement(DIGIT),
  w: WORD,
  W: complement(WORD),
  s: SPACE,
  S: complement(SPACE),
};

// ---- parsing ----

type Ast =
  | { kind: "set"; ranges: Ranges }
  | { kind: "seq"; items: Ast[] }
  | { kind: "alt"; options: Ast[] }
  | { kind: "repeat"; item: Ast; min: number; max: number };

/** A top-level alternative: whether it has `^` before it and `$` after it. */
interface TopAlternative {
  readonly body: Ast;
  readonly anchoredStart: boolean;
  readonly anchoredEnd: boolean;
}

/** Characters with a meaning of their own, literal when escaped (and `/`, as in a literal). */
const SYNTAX = new Set("^$\\.*+?()[]{}|/");
const CONTROL_ESCAPES: Readonly<Record<string, number>> = { t: 9, n: 10, v: 11, f: 12, r: 13 };

/**
 * How a pattern is read beside ECMA-262 with the `u` flag (JSON Schema's): Python's `re`
 * as Lark's terminals use it (lark.ts).
 */
export interface Dialect {
  /**
   * Python's syntax where it differs: `.` is anything but a newline, a backslash before any ASCII
   * character other than a letter or digit is that character, `(?P<name>...)` is a named
   * group. (\d, \w and \s stay ECMA-262's, where Python's also take other scripts' digits
   * and letters.)
   */
  readonly python?: boolean;
  /** The `i` flag: characters match their other cases too (Unicode simple case folding). */
  readonly ignoreCase?: boolean;
  /** The `s` flag: `.` is any character. */
  readonly dotAll?: boolean;
}

function parse(pattern: string, dialect: Dialect = {}): TopAlternative[] {
  // Code points: a position is an index in these, as messages give it.
  const cps = Array.from(pattern);
  const fold = (r: Ranges): Ranges => (dialect.ignoreCase ? caseFold(r) : r);
  const char = (c: number): Ast => ({ kind: "set", ranges: fold([c, c]) });
  let i = 0;
  let depth = 0;
  const fail = (what: string, at = i): never => {
    throw new RegexError(`${what} (at offset ${at})`);
  };
  const unsupported = (what: string, at: number): never => fail(`${what} is not supported`, at);
  const eat = (c: string): boolean => {
    if (cps[i] !== c) return false;
    i++;
    return true;
  };
  const isDigit = (c: string | undefined) => c !== undefined && c >= "0" && c <= "9";
  const isHex = (c: string | undefined) => c !== undefined && /^[0-9a-fA-F]$/.test(c);

  const disjunction = (): Ast => {
    const options = [alternative(false).body];
    while (eat("|")) options.push(alternative(false).body);
    return options.length === 1 ? options[0]! : { kind: "alt", options };
  };

  // `^` / `$` are allowed (top) only as the first / last thing of a top-level alternative.
  const alternative = (top: boolean): TopAlternative => {
    const anchoredStart = top && eat("^");
    const items: Ast[] = [];
    let anchoredEnd = false;
    for (;;) {
      const c = cps[i];
      if (c === undefined || c === "|" || c === ")") break;
      if (c === "$") {
        const next = cps[i + 1];
        if (top && (next === undefined || next === "|")) {
          i++;
          anchoredEnd = true;
          break;
        }
        unsupported("'$' other than at the end of the pattern or of a top-level alternative", i);
      }
      if (c === "^")
        unsupported("'^' other than at the start of the pattern or of a top-level alternative", i);
      items.push(quantified(atom()));
    }
    const body: Ast = items.length === 1 ? items[0]! : { kind: "seq", items };
    return { body, anchoredStart, anchoredEnd };
  };

  const atom = (): Ast => {
    const at = i;
    const c = cps[i++]!;
    switch (c) {
      case ".":
        return {
          kind: "set",
          ranges: dialect.dotAll ? ANY : dialect.python ? complement([0x0a, 0x0a]) : DOT,
        };
      case "(":
        return group(at);
      case "[":
        return { kind: "set", ranges: characterClass(at) };
      case "\\":
        return atomEscape(at);
      case "*":
      case "+":
      case "?":
        return fail(`nothing to repeat before '${c}'`, at);
      case "{":
        return fail("'{' that does not follow an atom as {n}, {n,} or {n,m} (escape it: \\{)", at);
      case "}":
        return fail("lone '}' (escape it: \\})", at);
      case "]":
        return fail("lone ']' (escape it: \\])", at);
      default:
        return char(c.codePointAt(0)!);
    }
  };

  const group = (at: number): Ast => {
    if (eat("?")) {
      if (eat("=")) unsupported("lookahead '(?='", at);
      if (eat("!")) unsupported("negative lookahead '(?!'", at);
      if (eat("<")) {
        if (eat("=")) unsupported("lookbehind '(?<='", at);
        if (eat("!")) unsupported("negative lookbehind '(?<!'", at);
        groupName(at);
      } else if (dialect.python && eat("P")) {
        if (!eat("<")) unsupported(`'(?P${cps[i] ?? ""}' (a backreference or other extension)`, at);
        groupName(at);
      } else if (!eat(":")) {
        unsupported(`group syntax '(?${cps[i] ?? ""}' (modifiers and other extensions)`, at);
      }
    }
    if (++depth > MAX_DEPTH) fail(`groups nested more than ${MAX_DEPTH} deep`, at);
    const body = disjunction();
    depth--;
    if (!eat(")")) fail("unterminated group '('", at);
    return body;
  };

  // A named group is a group; its name must be an identifier, as ECMA-262 requires.
  const groupName = (at: number): void => {
    const end = cps.indexOf(">", i);
    const name = end < 0 ? "" : cps.slice(i, end).join("");
    if (!/^[$_\p{ID_Start}](?:[$\p{ID_Continue}]|\u200c|\u200d)*$/u.test(name))
      fail("invalid group name after '(?<'", at);
    i = end + 1;
  };

  const quantified = (item: Ast): Ast => {
    const at = i;
    let min: number;
    let max: number;
    if (eat("*")) [min, max] = [0, Number.POSITIVE_INFINITY];
    else if (eat("+")) [min, max] = [1, Number.POSITIVE_INFINITY];
    else if (eat("?")) [min, max] = [0, 1];
    else if (cps[i] === "{") [min, max] = braces();
    else return item;
    eat("?"); // lazy: the same strings
    if (min > max) fail("numbers out of order in a {n,m} quantifier", at);
    return { kind: "repeat", item, min, max };
  };

  // {n}, {n,} or {n,m}; in `u` mode anything else starting with '{' is an error.
  const braces = (): [number, number] => {
    const at = i++;
    const number = (): number | undefined => {
      const from = i;
      while (isDigit(cps[i])) i++;
      return i > from ? Number(cps.slice(from, i).join("")) : undefined;
    };
    const min = number();
    let max = min;
    if (min !== undefined && eat(",")) max = number() ?? Number.POSITIVE_INFINITY;
    if (min === undefined || !eat("}"))
      fail("'{' that is not a quantifier {n}, {n,} or {n,m} (escape it: \\{)", at);
    return [min!, max!];
  };

  const atomEscape = (at: number): Ast => {
    const c = cps[i];
    if (c === undefined) return fail("'\\' at the end of the pattern", at);
    const cls = CLASS_ESCAPES[c];
    if (cls) {
      i++;
      return { kind: "set", ranges: cls };
    }
    if (c === "b" || c === "B") unsupported(`word boundary '\\${c}'`, at);
    if (c === "p" || c === "P") unsupported(`Unicode property escape '\\${c}{...}'`, at);
    if (c === "k") unsupported("backreference '\\k<...>'", at);
    if (c >= "1" && c <= "9") unsupported(`backreference '\\${c}'`, at);
    return char(characterEscape(at));
  };

  // After '\' (at `at`): the code point an escape that stands for one character means.
  const characterEscape = (at: number): number => {
    const c = cps[i++];
    if (c === undefined) return fail("'\\' at the end of the pattern", at);
    if (Object.hasOwn(CONTROL_ESCAPES, c)) return CONTROL_ESCAPES[c]!;
    if (SYNTAX.has(c) || c === "-") return c.codePointAt(0)!;
    if (dialect.python && c < "\x80" && !/[A-Za-z0-9]/.test(c)) return c.codePointAt(0)!;
    switch (c) {
      case "0":
        if (isDigit(cps[i])) fail("'\\0' followed by a digit (octal escapes are not ECMA-262)", at);
        return 0;
      case "x":
        return hexDigits(2, at);
      case "u":
        return unicodeEscape(at);
      case "c": {
        const letter = cps[i];
        if (letter === undefined || !/^[A-Za-z]$/.test(letter))
          return fail("'\\c' not followed by a letter", at);
        i++;
        return letter.codePointAt(0)! % 32;
      }
      default:
        return fail(`invalid escape '\\${c}'`, at);
    }
  };

  const hexDigits = (n: number, at: number): number => {
    const digits = cps.slice(i, i + n);
    if (digits.length < n || !digits.every(isHex))
      fail(`'\\${cps[i - 1]}' not followed by ${n} hex digits`, at);
    i += n;
    return Number.parseInt(digits.join(""), 16);
  };

  // \u{H..}, or \uHHHH, where a lead surrogate's \uHHHH followed by a trail surrogate's is one code point.
  const unicodeEscape = (at: number): number => {
    if (eat("{")) {
      const from = i;
      while (isHex(cps[i])) i++;
      const value = Number.parseInt(cps.slice(from, i).join(""), 16);
      if (i === from || !eat("}") || value > MAX_CODE_POINT)
        fail("'\\u{' not followed by a code point in hex (at most 10FFFF) and '}'", at);
      return value;
    }
    const unit = hexDigits(4, at);
    if (unit >= 0xd800 && unit <= 0xdbff && cps[i] === "\\" && cps[i + 1] === "u") {
      const digits = cps.slice(i + 2, i + 6);
      const trail =
        digits.length === 4 && digits.every(isHex) ? Number.parseInt(digits.join(""), 16) : -1;
      if (trail >= 0xdc00 && trail <= 0xdfff) {
        i += 6;
        return 0x10000 + ((unit - 0xd800) << 10) + (trail - 0xdc00);
      }
    }
    return unit;
  };

  const characterClass = (at: number): Ranges => {
    const negated = eat("^");
    const pairs: number[] = [];
    for (;;) {
      if (cps[i] === undefined) fail("unterminated character class '['", at);
      if (eat("]")) break;
      const from = i;
      const a = classAtom();
      if (cps[i] === "-" && cps[i + 1] !== undefined && cps[i + 1] !== "]") {
        i++;
        const b = classAtom();
        if (typeof a !== "number" || typeof b !== "number")
          fail("a class escape (\\d, \\w, \\s, ...) as the end of a range", from);
        if ((a as number) > (b as number)) fail("range out of order in a character class", from);
        pairs.push(a as number, b as number);
      } else if (typeof a === "number") pairs.push(a, a);
      else pairs.push(...a);
    }
    // Folded before the complement: [^a] with the i flag takes neither a nor A.
    const ranges = fold(normalize(pairs));
    return negated ? complement(ranges) : ranges;
  };

  // One character of a class, or the set of a class escape (\d, ...).
  const classAtom = (): number | Ranges => {
    const at = i;
    const c = cps[i++]!;
    if (c !== "\\") return c.codePointAt(0)!;
    const e = cps[i];
    if (e === undefined) return fail("'\\' at the end of the pattern", at);
    const cls = CLASS_ESCAPES[e];
    if (cls) {
      i++;
      return cls;
    }
    if (e === "b") {
      i++;
      return 0x08; // backspace, in a class
    }
    if (e === "p" || e === "P") unsupported(`Unicode property escape '\\${e}{...}'`, at);
    if (e === "B" || e === "k" || (e >= "1" && e <= "9"))
      fail(`invalid escape '\\${e}' in a character class`, at);
    return characterEscape(at);
  };

  const top = [alternative(true)];
  while (eat("|")) top.push(alternative(true));
  if (i < cps.length) fail("unmatched ')'");
  return top;
}

/** Per code point with other cases: all of its case-folding class (built on first use). */
let caseClasses: Map<number, readonly number[]> | undefined;

/** `r` with every other case of its characters (simple case folding, through lower case). */
export function caseFold(r: Ranges): Ranges {
  if (!caseClasses) {
    const byLower = new Map<number, number[]>();
    for (let cp = 0; cp <= 0x1ffff; cp++) {
      if (cp >= 0xd800 && cp <= 0xdfff) continue;
      const lower = String.fromCodePoint(cp).toLowerCase();
      const l = lower.codePointAt(0)!;
      if (lower.length !== String.fromCodePoint(l).length) continue; // not one character
      const members = byLower.get(l) ?? [l];
      byLower.set(l, members);
      if (cp !== l) members.push(cp);
    }
    caseClasses = new Map();
    for (const members of byLower.values())
      if (members.length > 1) for (const m of members) caseClasses.set(m, members);
  }
  const extra: number[] = [];
  for (const [cp, members] of caseClasses)
    if (inRanges(r, cp)) for (const m of members) if (m !== cp) extra.push(m, m);
  return extra.length === 0 ? r : normalize([...r, ...extra]);
}

// ---- the automaton ----

/**
 * States are added as built. `build(node, from)` adds the states and edges reading node from
 * state `from` and returns the state after it; every edge it adds leaves `from` or a state
 * it created, and enters a state it created, so the returned state is where what follows
 * goes on (a loop always re-enters a state of its own, never `from`).
 */
function buildNfa(alternatives: readonly TopAlternative[], maxStates: number): Nfa {
  const edges: { ranges: Ranges; to: number }[][] = [];
  const eps: number[][] = [];
  const state = (): number => {
    if (edges.length >= maxStates)
      throw new RegexError(`the pattern is too large: its automaton exceeds ${maxStates} states`);
    edges.push([]);
    eps.push([]);
    return edges.length - 1;
  };
  const build = (node: Ast, from: number): number => {
    switch (node.kind) {
      case "set": {
        const to = state();
        // An empty class ([]) matches nothing: no edge.
        if (node.ranges.length > 0) edges[from]!.push({ ranges: node.ranges, to });
        return to;
      }
      case "seq":
        return node.items.reduce((at, item) => build(item, at), from);
      case "alt": {
        const to = state();
        for (const option of node.options) eps[build(option, from)]!.push(to);
        return to;
      }
      case "repeat":
        return repeat(node.item, node.min, node.max, from);
    }
  };
  const repeat = (item: Ast, min: number, max: number, from: number): number => {
    let at = from;
    for (let k = 0; k < min; k++) at = build(item, at);
    if (max === Number.POSITIVE_INFINITY) {
      const loop = state();
      eps[at]!.push(loop);
      const end = build(item, loop);
      if (end !== loop) eps[end]!.push(loop);
      return loop;
    }
    if (max === min) return at;
    // x{0,3} as (x(x(x)?)?)?: each optional copy may be skipped straight to the end.
    const to = state();
    for (let k = min; k < max; k++) {
      eps[at]!.push(to);
      at = build(item, at);
    }
    eps[at]!.push(to);
    return to;
  };
  // "Any string" loops, shared by the alternatives without `^` (before) or `$` (after).
  const anyLoop = (): number => {
    const s = state();
    edges[s]!.push({ ranges: ANY, to: s });
    return s;
  };
  const start = state();
  let before: number | undefined;
  const ends: [number, boolean][] = [];
  for (const a of alternatives) {
    let from = start;
    if (!a.anchoredStart) {
      if (before === undefined) {
        before = anyLoop();
        eps[start]!.push(before);
      }
      from = before;
    }
    ends.push([build(a.body, from), a.anchoredEnd]);
  }
  const accept = state();
  let after: number | undefined;
  for (const [end, anchoredEnd] of ends) {
    if (anchoredEnd) {
      eps[end]!.push(accept);
      continue;
    }
    if (after === undefined) {
      after = anyLoop();
      eps[after]!.push(accept);
    }
    eps[end]!.push(after);
  }
  return { size: edges.length, start, accept, edges, eps };
}

/**
 * The NFA of the strings `pattern` matches in JSON Schema's sense: the regex may match
 * anywhere in the string (it is not implicitly anchored), so an alternative without a
 * leading `^` gets "any string" before it and one without a trailing `$` any string after it.
 * Throws RegexError for syntax errors and for what is not supported.
 */
export function compilePattern(
  pattern: string,
  o: {
    maxStates?: number;
    /** The whole string must match (as vLLM's guided_regex): every alternative anchored. */
    fullMatch?: boolean;
    dialect?: Dialect;
  } = {},
): Nfa {
  const alternatives = parse(pattern, o.dialect);
  return buildNfa(
    o.fullMatch
      ? alternatives.map((a) => ({ ...a, anchoredStart: true, anchoredEnd: true }))
      : alternatives,
    o.maxStates ?? DEFAULT_MAX_STATES,
  );
}

/** The pattern of "one of these strings", each matched literally (with fullMatch). */
export function choicePattern(choices: readonly string[]): string {
  return choices.map((c) => c.replace(/[\\^$.*+?()[\]{}|/-]/g, "\\$&")).join("|");
}

/** The states reachable from `states` by epsilon edges (them included), ascending. */
export function epsilonClosure(nfa: Nfa, states: Iterable<number>): number[] {
  const seen = new Uint8Array(nfa.size);
  const stack = [...states];
  const out: number[] = [];
  while (stack.length > 0) {
    const s = stack.pop()!;
    if (seen[s]) continue;
    seen[s] = 1;
    out.push(s);
    for (const t of nfa.eps[s]!) if (!seen[t]) stack.push(t);
  }
  return out.sort((a, b) => a - b);
}

/** Whether the NFA accepts the whole string s (iterate by code point). For tests and callers. */
export function nfaMatches(nfa: Nfa, s: string): boolean {
  let current = epsilonClosure(nfa, [nfa.start]);
  for (const ch of s) {
    const c = ch.codePointAt(0)!;
    const next: number[] = [];
    for (const q of current)
      for (const e of nfa.edges[q]!) if (inRanges(e.ranges, c)) next.push(e.to);
    if (next.length === 0) return false;
    current = epsilonClosure(nfa, next);
  }
  return current.includes(nfa.accept);
}

// ---- formats ----

// Parts of the formats; each accepts only valid text (sound), if not every valid text.
const DATE = String.raw`\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])`;
/** RFC 3339 full-time: seconds up to 60 (leap second), an offset required. */
const TIME = String.raw`(?:[01]\d|2[0-3]):[0-5]\d:(?:[0-5]\d|60)(?:\.\d+)?(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)`;
const DUR_TIME = String.raw`T(?:\d+H(?:\d+M)?(?:\d+S)?|\d+M(?:\d+S)?|\d+S)`;
/**
 * As JSON Schema's validators take it: date components in order, each optional but one,
 * then T and time components likewise; or weeks alone (which do not combine).
 */
const DURATION = String.raw`P(?:(?:\d+Y(?:\d+M)?(?:\d+D)?|\d+M(?:\d+D)?|\d+D)(?:${DUR_TIME})?|${DUR_TIME}|\d+W)`;
/** RFC 1123: 1 to 63 letters, digits and hyphens, neither first nor last a hyphen. */
const LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
/** RFC 5322's atext: dot-atoms are runs of these joined by single dots. */
const ATEXT = String.raw`[A-Za-z0-9!#$%&'*+/=?^_\x60{|}~-]`;
/** 0 to 255 without leading zeros. */
const OCTET = String.raw`(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)`;
const IPV4 = String.raw`${OCTET}(?:\.${OCTET}){3}`;
const H16 = "[0-9A-Fa-f]{1,4}";
/** RFC 4291's textual forms, as RFC 3986 spells them out: n groups before "::", m after. */
const IPV6 = ipv6();

function ipv6(): string {
  const ls32 = `(?:${H16}:${H16}|${IPV4})`;
  const groups = (n: number) => (n === 0 ? "" : `(?:${H16}:){${n}}`);
  // Up to n groups (n >= 1), as [ *(n-1)( h16 ":" ) h16 ]: present or not.
  const upTo = (n: number) => (n === 1 ? `(?:${H16})?` : `(?:(?:${H16}:){0,${n - 1}}${H16})?`);
  const forms = [
    `${groups(6)}${ls32}`,
    `::${groups(5)}${ls32}`,
    `(?:${H16})?::${groups(4)}${ls32}`,
    `${upTo(2)}::${groups(3)}${ls32}`,
    `${upTo(3)}::${groups(2)}${ls32}`,
    `${upTo(4)}::${H16}:${ls32}`,
    `${upTo(5)}::${ls32}`,
    `${upTo(6)}::${H16}`,
    `${upTo(7)}::`,
  ];
  return `(?:${forms.join("|")})`;
}

/**
 * Patterns (anchored, for compilePattern) of the JSON Schema `format`s that OpenAI's structured outputs support:
 * "date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid".
 */
export const FORMAT_PATTERNS: Readonly<Record<string, string>> = Object.freeze({
  "date-time": `^${DATE}[Tt]${TIME}$`,
  time: `^${TIME}$`,
  date: `^${DATE}$`,
  duration: `^${DURATION}$`,
  email: `^${ATEXT}+(?:\\.${ATEXT}+)*@${LABEL}(?:\\.${LABEL})+$`,
  hostname: `^${LABEL}(?:\\.${LABEL})*$`,
  ipv4: `^${IPV4}$`,
  ipv6: `^${IPV6}$`,
  uuid: "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$",
});
