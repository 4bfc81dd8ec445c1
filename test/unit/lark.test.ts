// Lark grammars (src/gateway/lark.ts): which texts each accepts whole, which only as a prefix,
// which not at all (byte by byte, as the token masks step it), the grammars refused with the
// reason and where, and the regular-expression terminals against node's RegExp.
import { describe, expect, it } from "vitest";
import { JSON_LARK as BENCH_JSON_LARK } from "../../bench/json.ts";
import { GrammarError, GrammarText } from "../../src/gateway/cfg.ts";
import { SYMBOL_BASE } from "../../src/gateway/grammar.ts";
import { compileLark, isGbnf } from "../../src/gateway/lark.ts";
import { Prng } from "../../src/model/prng.ts";
import { cfgVerdict, expectExactMasks, jsonMaskCase } from "../support/grammar.ts";

const EOS = SYMBOL_BASE + 3;

const verdict = (a: GrammarText, text: string) => cfgVerdict(a, text, EOS);

const CALC = `
?start: sum
?sum: product
    | sum "+" product   -> add
    | sum "-" product   -> sub
?product: atom
    | product "*" atom  -> mul
    | product "/" atom  -> div
?atom: NUMBER           -> number
     | "-" atom         -> neg
     | NAME             -> var
     | "(" sum ")"
%import common.CNAME -> NAME
%import common.NUMBER
%import common.WS_INLINE
%ignore WS_INLINE
`;

const JSON_LARK = `
?start: value
?value: object
      | array
      | string
      | SIGNED_NUMBER      -> number
      | "true"             -> true
      | "false"            -> false
      | "null"             -> null
array  : "[" [value ("," value)*] "]"
object : "{" [pair ("," pair)*] "}"
pair   : string ":" value
string : ESCAPED_STRING
%import common.ESCAPED_STRING
%import common.SIGNED_NUMBER
%import common.WS
%ignore WS
`;

// biome-ignore format: a table
const cases: [string, string, [string, "whole" | "prefix" | "no"][]][] = [
  ["Lark's calculator (left recursion, aliases, imports, ignored spaces)", CALC, [["1+2*3", "whole"], [" 1 + x1 * (2 - -y) ", "whole"], ["2.5e3/ 4", "whole"], ["(1+", "prefix"], ["1+*2", "no"], ["1\n+2", "no"]]],
  ["Lark's JSON example", JSON_LARK, [['{"a": [1, -2.5e3, true, null], "b": {}}', "whole"], ['\n[ "x\\"y" ,{"k":false}]\n', "whole"], ['{"a" 1}', "no"], ["[1,]", "no"], ['{"a": [', "prefix"], ["tru", "prefix"]]],
  ["optional parts, repetition counts, ranges", `start: "a" ["b"] "c"~2 DIGIT~1..3\nDIGIT: "0".."9"`, [["acc1", "whole"], ["abcc123", "whole"], ["acc1234", "no"], ["ac", "prefix"], ["abbcc1", "no"]]],
  ["case-insensitive literals and regular expressions", `start: "select"i /[a-c]+/i "!"`, [["SeLeCt aB!", "no"], ["SELECTaBc!", "whole"], ["selectD!", "no"]]],
  ["regular expressions with Python's syntax", String.raw`start: /(?P<word>[a-z]+)\:\#/ /./ /x.y/s`, [["ab:#zx\ny", "whole"], ["ab:#\nx\ny", "no"], ["ab:", "prefix"]]],
  ["terminals made of terminals, ignore before each terminal", `start: WORD ("," WORD)*\nWORD: LETTER+\nLETTER: "a".."z"\n%ignore " "`, [["ab, cd ,e ", "whole"], [" ab", "whole"], ["a b", "no"], ["a,,b", "no"]]],
  ["a space inside a terminal is not ignored", `start: PAIR\nPAIR: "a" "b"\n%ignore " "`, [["ab", "whole"], [" ab ", "whole"], ["a b", "no"]]],
  ["templates", `start: _sep{item, ","} ";" _sep{"x", "|"}\n_sep{x, sep}: x (sep x)*\nitem: "a" | "b"`, [["a,b,a;x|x", "whole"], ["a;x", "whole"], ["a,;x", "no"], ["a;x|", "prefix"]]],
  ["a template of a template", `start: pair{list{"a"}}\npair{x}: x "=" x\nlist{y}: "[" y ("," y)* "]"`, [["[a,a]=[a]", "whole"], ["[a]=", "prefix"], ["a=a", "no"]]],
  ["%override and %extend", `start: A B\nA: "a"\n%override A: "x"\nB: "b"\n%extend B: "c"`, [["xb", "whole"], ["xc", "whole"], ["ab", "no"]]],
  ["%extend of an import, comments both ways", `start: DIGIT+ # digits\n%import common.DIGIT // and hex\n%extend DIGIT: "a".."f"`, [["09af", "whole"], ["g", "no"]]],
  ["%import of several names", `start: WORD WS INT\n%import common (WORD, WS, INT)`, [["abc \\n 12".replace("\\n", "\n"), "whole"], ["abc12", "no"]]],
  ["escapes in strings", String.raw`start: "\x41\u00e9\n\"\\" "\q"`, [['Aé\n"\\\\q', "whole"], ["A", "prefix"]]],
  ["a definition across lines, and a backslash continuation", `start: "a"\n     | "b" \\\n       "c"\n`, [["a", "whole"], ["bc", "whole"], ["b", "prefix"]]],
  ["unused rules are checked but do not matter", `start: "a"\nunused: "b" start`, [["a", "whole"], ["b", "no"]]],
  ["C comments, and what they cannot hold", `start: C_COMMENT\n%import common.C_COMMENT`, [["/* a * / b **/", "whole"], ["/**/", "whole"], ["/* a */ */", "no"]]],
  ["an empty start", `start: \n%ignore " "`, [["", "whole"], ["   ", "whole"], ["x", "no"]]],
];

describe("Lark: what each grammar accepts", () => {
  it.each(cases)("%s", (_what, text, checks) => {
    const a = new GrammarText(compileLark(text), EOS);
    for (const [input, want] of checks) expect(verdict(a, input), JSON.stringify(input)).toBe(want);
  });

  it("tells GBNF from Lark", () => {
    expect(isGbnf(`root ::= "a"`)).toBe(true);
    expect(isGbnf(`# c\n  item-list ::= "a"`)).toBe(true);
    expect(isGbnf(CALC)).toBe(false);
    expect(isGbnf(`start: "::="`)).toBe(false);
  });
});

describe("Lark: refusals", () => {
  // biome-ignore format: a table
  const bad: [string, string, RegExp][] = [
    ["no start", `begin: "a"`, /no 'start' rule/],
    ["an undefined name", `start: a\n`, /'a' is used but not defined \(line 1, column 8\)/],
    ["an undefined terminal", `start: "x" NUM`, /'NUM' is used but not defined/],
    ["a rule inside a terminal", `start: T\nT: "a" r\nr: "b"`, /terminals hold only terminals, and 'r' is a rule \(line 2/],
    ["a rule ignored", `start: "a"\n%ignore r\nr: " "`, /terminals hold only terminals/],
    ["a mixed-case name", `start: Foo`, /neither a rule \(lowercase\) nor a terminal/],
    ["defined twice", `start: "a"\nstart: "b"`, /'start' is defined twice/],
    ["an import defined twice", `start: WS\nWS: " "\n%import common.WS`, /'WS' is defined twice/],
    ["an unknown common name", `start: X\n%import common.NOPE -> X`, /common module has no 'NOPE'/],
    ["an import of a file", `start: X\n%import .other.X`, /grammar files/],
    ["an import of another module", `start: X\n%import python.NAME -> X`, /only Lark's common terminals/],
    ["%declare", `start: INDENT\n%declare INDENT`, /%declare/],
    ["llguidance's %json", `start: %json {"type": "object"}`, /unexpected '%json'|unknown directive/],
    ["llguidance's special tokens", `start: <[128000]>`, /special tokens/],
    ["an unterminated string", `start: "abc\n`, /unterminated string \(line 1, column 8\)/],
    ["an unterminated regular expression", `start: /abc`, /unterminated regular expression/],
    ["a bad regular expression", `start: /a(?=b)/`, /lookahead/],
    ["a backreference", `start: /(?P<a>x)(?P=a)/`, /'\(\?P='/],
    ["an unsupported flag", `start: /a b/x`, /flag 'x'/],
    ["a range of strings", `start: "ab".."z"`, /single characters/],
    ["a backwards range", `start: "z".."a"`, /runs backwards/],
    ["a template without arguments", `start: t\nt{x}: x`, /is a template/],
    ["a template's arity", `start: t{"a", "b"}\nt{x}: x`, /takes 1 argument\(s\), given 2/],
    ["a template growing forever", `start: t{"a"}\nt{x}: "b" | t{(x x)}`, /template instances/],
    ["%override of nothing", `start: "a"\n%override B: "b"`, /not defined/],
    ["two definitions on a line", `start: "a" b: "b"`, /unexpected ':'/],
    ["an unclosed group", `start: ("a" | "b"`, /expected '\)'/],
    ["a huge count", `start: "a"~5000`, /above 1000/],
    ["a count running backwards", `start: "a"~3..1`, /m < n/],
    ["hidden left recursion", `start: n start "x" | "y"\nn: "n"?`, /left recursion/],
    ["nothing finite", `start: "a" start`, /derives no finite string/],
  ];
  it.each(bad)("%s", (_what, text, message) => {
    expect(() => compileLark(text)).toThrow(GrammarError);
    expect(() => compileLark(text)).toThrow(message);
  });

  it("caps the text", () => {
    expect(() => compileLark(`start: "${"a".repeat(70_000)}"`)).toThrow(/longer than/);
  });
});

describe("Lark: regular-expression terminals", () => {
  // Each pattern against node's RegExp (full match; the u flag, or s / i as the terminal's
  // flags say) on random strings over the characters that matter to it.
  const patterns: [string, string, string][] = [
    ["[a-c]+(x|yz)?", "", "abcxyz"],
    ["(ab|a)*b{2,3}", "", "ab"],
    ["[^\\n]*\\n", "", "ab\n"],
    ["a.b", "s", "ab\n"],
    ["[^a]b", "i", "aAbB"],
    ["k+", "i", "kK\u212a"],
    ["(é|ß)+", "i", "éÉßẞ"],
    ["\\d{2}-\\w*", "", "1-aZ_"],
  ];
  it.each(patterns)("/%s/%s", (source, flags, alphabet) => {
    const a = new GrammarText(compileLark(`start: /${source}/${flags}`), EOS);
    const re = new RegExp(`^(?:${source})$`, `u${flags}`);
    const rng = new Prng(17);
    const chars = [...alphabet];
    let matched = 0;
    for (let n = 0; n < 400; n++) {
      const len = Math.floor(rng.uniform() * 6);
      let s = "";
      for (let k = 0; k < len; k++) s += chars[Math.floor(rng.uniform() * chars.length)];
      const want = re.test(s);
      if (want) matched++;
      expect(verdict(a, s) === "whole", JSON.stringify(s)).toBe(want);
    }
    expect(matched).toBeGreaterThan(0);
  });
});

describe("Lark: masks (the JSON grammar the json bench suite measures)", () => {
  const a = new GrammarText(compileLark(BENCH_JSON_LARK), SYMBOL_BASE);
  const { units, grammar, states } = jsonMaskCase(a);

  it("use the local part inside strings (every way out of a string's rules ends with its quote)", () => {
    const inString = a.step(a.step(a.start, 0x7b)!, 0x22)!; // {"
    expect(a.local(inString)).toMatchObject({ byte: 0x22 });
    expect(a.local(a.step(a.start, 0x7b)!)).toBeNull(); // after '{': a quote opens a key
    const keyed = states.filter((st) => a.local(st));
    expect(keyed.length).toBeGreaterThan(10);
  });

  it(`equal checking every token, in ${states.length} states along documents`, () => {
    expectExactMasks(grammar, a, states, units, units.length);
  });
});
