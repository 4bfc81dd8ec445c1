// JSON Schema patterns compiled to NFAs (src/gateway/regex.ts): checked against V8's own
// RegExp with the `u` flag on hand-picked and random strings (characters at the edges of
// the classes, line terminators, astral and lone surrogate code points), the constructs
// the module refuses, and the formats' patterns: examples either side, and ipv4 / ipv6
// against node:net on random candidates.
import { isIPv4, isIPv6 } from "node:net";
import { describe, expect, it } from "vitest";
import {
  compilePattern,
  FORMAT_PATTERNS,
  type Nfa,
  nfaMatches,
  RegexError,
} from "../../src/gateway/regex.ts";
import { Prng } from "../../src/model/prng.ts";

const pick = <T>(rng: Prng, xs: readonly T[]): T => xs[Math.floor(rng.uniform() * xs.length)]!;

/** Characters every pattern is tried on: syntax characters, class edges, \s's, astral, lone surrogates. */
const BASE = [
  ..."abcdxyzABCZ019_-.@/ ^$[]{}()|*+?\\`",
  ..."\t\n\r\v\f\0\b",
  ..."\u00a0\u1680\u2000\u200a\u200b\u2028\u2029\u202f\u3000\ufeff",
  ..."éüÿ€",
  "😀",
  "😂",
  "𝒳",
  "\ud83d",
  "\ude00",
];

/** `count` strings of up to 8 characters, most from `extra` (the pattern's own) when given. */
function randomStrings(rng: Prng, extra: string[], count: number): string[] {
  return Array.from({ length: count }, () =>
    Array.from({ length: Math.floor(rng.uniform() * 9) }, () =>
      extra.length > 0 && rng.uniform() < 0.7 ? pick(rng, extra) : pick(rng, BASE),
    ).join(""),
  );
}

/** [pattern, characters relevant to it, hand-picked strings]. */
const PATTERNS: [string, string[], string[]][] = [
  ["abc", [..."abcd"], ["abc", "xabcx", "ab", "aabbcc", ""]],
  ["^abc$", [..."abc"], ["abc", "abcc", "\nabc"]],
  ["^a.c$", [..."ac\n\r\u2028\u2029", "😀"], ["abc", "a\nc", "a😀c", "a\u2028c", "a\u2027c"]],
  [".", ["\n", "\r", "\u2028", "\u2029", "\u2030"], ["\n", "\n\r", "\u2030", ""]],
  ["^.*$", [..."a\n\r", "😀"], ["", "anything", "a\nb"]],
  ["^\\d+$", [..."0189/:a٣"], ["0", "123", "12a", "٣"]],
  ["^\\D\\w\\W$", [..."0aZ_-`{@[", "😀"], ["a_-", "0_-", "-a😀"]],
  [
    "^\\s+\\S$",
    [..."\t\n\v\f\r a\u00a0\u1680\u2000\u200a\u200b\u2028\u202f\u205f\u3000\ufeff"],
    [],
  ],
  ["^[a-f0-9]+$", [..."`afg/09:"], ["deadbeef", "g", "0f"]],
  ["^[^a-f]*$", [..."`afg\n", "😀"], ["xyz\n😀", "xaz"]],
  ["^[\\d_-]{2,3}$", [..."09_-,./"], ["__", "0-9", "0-9_", "-"]],
  ["^[-a]b[a-]$", [..."-ab"], ["-ba", "ab-", "bba"]],
  ["^[\\w.]+@[\\w.]+$", [..."a_.@-"], ["a.b@c", "@c", "a@@b"]],
  ["^[\\s\\S]$", ["\n", "a", "😀", "\ud83d"], ["😀", "\ud83d\ude00", "ab"]],
  ["^[^\\s]+$", [..."a \u00a0\ufeff\u200b"], ["a\u200b", "a b"]],
  ["^[\\b]$", ["\b", "b", "\\"], ["\b", "b"]],
  ["^\\t\\n\\r\\f\\v\\0$", [..."\t\n\r\f\v\0"], ["\t\n\r\f\v\0"]],
  ["^\\x41\\u0042\\u{43}\\u{1F600}$", [..."ABC", "😀"], ["ABC😀", "ABC"]],
  ["^\\uD83D\\uDE00$", ["😀", "\ud83d", "\ude00"], ["😀", "\ud83d"]],
  ["^\\uD83D$", ["😀", "\ud83d", "\ude00"], ["\ud83d", "😀"]],
  ["^😀{2}$", ["😀", "\ud83d", "\ude00"], ["😀😀", "😀\ude00"]],
  ["^[😀-😂]+$", ["😀", "😁", "😂", "😃", "\ud83d"], ["😁😂"]],
  ["^[\\u{1F600}-\\u{1F64F}a]{1,2}$", ["😀", "🙏", "🚀", "a"], ["a🙏", "🚀"]],
  ["^[é-ü]+$", [..."äéüýe"], ["äü", "e"]],
  ["^[\\u2000-\\u200a]$", ["\u1fff", "\u2000", "\u2005", "\u200a", "\u200b"], []],
  ["^[^😀]$", ["😀", "😁", "\ud83d", "\ude00", "a"], ["\ud83d", "😁"]],
  ["^.{2}$", ["😀", "a", "\n", "\ud83d"], ["😀😀", "a😀", "\ud83da"]],
  ["^\\cJ\\ca$", ["\n", "\u0001", "J", "a"], ["\n\u0001"]],
  [
    "^\\.\\*\\\\\\/\\[\\]\\(\\)\\{\\}\\|\\^\\$\\?\\+$",
    [..."./*\\[](){}|^$?+"],
    [".*\\/[](){}|^$?+"],
  ],
  ["^[\\]\\[\\-\\\\^]+$", [..."][-\\^a"], ["]-[^\\"]],
  ["^[a^]$", [..."a^b"], ["^"]],
  ["a\\/b", [..."ab/"], ["a/b"]],
  ["^(?:ab|cd)*$", [..."abcd"], ["", "abcd", "abc", "cdab"]],
  ["^(ab|c)+?d$", [..."abcd"], ["abd", "cabcd", "d"]],
  ["^(?<year>\\d{2})-(?<m>\\d)$", [..."019-"], ["19-1", "1-1"]],
  ["a|b", [..."abc"], ["c", "xbx"]],
  ["^a|b$", [..."abc"], ["ac", "cb", "ca", "bc"]],
  ["^a|b", [..."abc"], ["ca", "cbc"]],
  ["a$|^b", [..."abc"], ["ba", "cac", "cb"]],
  ["^ab$|c|^d", [..."abcd"], ["ab", "abc", "dx", "xd"]],
  ["^$", [..."a\n"], ["", "\n"]],
  ["", [..."a"], ["", "a"]],
  ["^(?:)$", [..."a"], [""]],
  ["^(a|)+$", [..."ab"], ["", "aaa", "b"]],
  ["^(?:a?){3}$", [..."ab"], ["aaa", "aaaa", ""]],
  ["^a{3}$", [..."ab"], ["aaa", "aa"]],
  ["a{2,}", [..."ab"], ["baab", "ab"]],
  ["^a{1,3}b{0,2}$", [..."ab"], ["abb", "aaaa", "b"]],
  ["^(?:ab){2,3}?$", [..."ab"], ["abab", "ababab", "ab"]],
  ["^a{0}b$", [..."ab"], ["b", "ab"]],
  ["^(a*)*b$", [..."ab"], ["b", "aab", "aba"]],
  ["^(?:a*b*)*c$", [..."abc"], ["abbac", "c"]],
  ["^(?:a|b)*c(?:a|b)*$", [..."abc"], ["acb", "cc"]],
  ["^(?:(?:a|b)c)?d+$", [..."abcd"], ["acdd", "cd"]],
  ["^(?:a+|b+)+?$", [..."ab"], ["abba"]],
  ["x*?y", [..."xy"], ["y", "xxy", "x"]],
  ["^[^\\n]*$", [..."a\n\r"], ["a\rb", "a\n"]],
  ["[]", [..."a"], ["", "a"]],
  ["^[^]*$", ["\n", "😀", "\ud83d"], ["\n😀"]],
  ["^(?:[a-c][x-z]|[^a-c]){2}$", [..."abcdxyz"], ["axd", "dd", "ab"]],
];

describe("patterns against RegExp with the u flag", () => {
  it.each(PATTERNS)("%j", (pattern, extra, examples) => {
    const nfa = compilePattern(pattern);
    const re = new RegExp(pattern, "u");
    const rng = new Prng(7, pattern);
    const strings = [...examples, ...randomStrings(rng, extra, 300)];
    const wrong = strings.filter((s) => nfaMatches(nfa, s) !== re.test(s));
    expect(wrong).toEqual([]);
    // Both outcomes are exercised (a pattern that matches nothing or everything aside).
    if (pattern !== "[]" && pattern !== "" && pattern !== "^[^]*$")
      expect(new Set(strings.map((s) => re.test(s))).size).toBe(2);
  });

  it("the NFA has the documented shape", () => {
    const nfa = compilePattern("^(?:[a-c]|[b-d0])*x?$");
    expect(nfa.edges.length).toBe(nfa.size);
    expect(nfa.eps.length).toBe(nfa.size);
    expect(nfa.edges[nfa.accept]).toEqual([]);
    for (const out of nfa.edges)
      for (const { ranges, to } of out) {
        expect(to).toBeLessThan(nfa.size);
        expect(ranges.length % 2).toBe(0);
        for (let i = 0; i < ranges.length; i += 2) {
          expect(ranges[i]!).toBeLessThanOrEqual(ranges[i + 1]!);
          if (i > 0) expect(ranges[i]!).toBeGreaterThan(ranges[i - 1]! + 1);
        }
      }
    // Merged: [a-c] and [b-d0] stay separate alternatives, but one class merges its ranges.
    const merged = compilePattern("^[a-cb-d0]$");
    expect(merged.edges.flat().map((e) => e.ranges)).toEqual([[0x30, 0x30, 0x61, 0x64]]);
  });

  it("accepts \\- outside a class (a literal '-', which the u flag alone would refuse)", () => {
    const nfa = compilePattern("^a\\-b$");
    expect(nfaMatches(nfa, "a-b")).toBe(true);
    expect(nfaMatches(nfa, "ab")).toBe(false);
  });
});

describe("refusals", () => {
  /** Valid ECMA-262, but not supported: [pattern, what the message names]. */
  const unsupported: [string, RegExp][] = [
    ["(a)\\1", /backreference/],
    ["(?<n>a)\\k<n>", /backreference/],
    ["(?=a)b", /lookahead/],
    ["(?!a)b", /negative lookahead/],
    ["(?<=a)b", /lookbehind/],
    ["(?<!a)b", /negative lookbehind/],
    ["\\bword\\b", /word boundary/],
    ["a\\Bb", /word boundary/],
    ["\\p{L}", /property/],
    ["\\P{Lu}", /property/],
    ["[\\p{L}a]", /property/],
    ["a^b", /'\^'/],
    ["(^a)", /'\^'/],
    ["^^a", /'\^'/],
    ["a$b", /'\$'/],
    ["(a$)", /'\$'/],
    ["(a|b$)c", /'\$'/],
    ["a$$", /'\$'/],
  ];
  it.each(unsupported)("%j", (pattern, what) => {
    expect(() => new RegExp(pattern, "u")).not.toThrow();
    expect(() => compilePattern(pattern)).toThrow(RegexError);
    expect(() => compilePattern(pattern)).toThrow(what);
  });

  /** Not ECMA-262 with the u flag: RegExp refuses them too. */
  const syntaxErrors = [
    "(",
    "(a",
    ")",
    "a)",
    "[a",
    "[",
    "[z-a]",
    "[\\d-z]",
    "[a-\\w]",
    "a{2,1}",
    "a{",
    "a{1",
    "a{1,2",
    "a{,2}",
    "a{x}",
    "{",
    "{1}",
    "}",
    "a}",
    "]",
    "*a",
    "a**",
    "+",
    "a|?",
    "a{1}{2}",
    "^*",
    "\\",
    "\\x4",
    "\\xg0",
    "\\u12",
    "\\u{110000}",
    "\\u{}",
    "\\u{12",
    "\\c1",
    "\\c",
    "\\01",
    "\\a",
    "\\z",
    "\\_",
    "[\\B]",
    "[\\1]",
    "[\\c1]",
    "(?<1a>x)",
    "(?<a",
    "(?<>a)",
    "(?",
    "(?a)",
  ];
  it.each(syntaxErrors)("%j", (pattern) => {
    expect(() => new RegExp(pattern, "u")).toThrow(SyntaxError);
    expect(() => compilePattern(pattern)).toThrow(RegexError);
  });

  it("messages say where", () => {
    expect(() => compilePattern("ab(?=c)")).toThrow(
      /lookahead '\(\?=' is not supported \(at offset 2\)/,
    );
    expect(() => compilePattern("😀a{")).toThrow(/at offset 2/);
  });

  it("refuses what would exceed maxStates, without building it", () => {
    expect(() => compilePattern("(?:abcdefgh){1000}")).toThrow(/exceeds 4096 states/);
    expect(() => compilePattern("(a|b){0,100000}")).toThrow(RegexError);
    expect(() => compilePattern("a{99999999999}")).toThrow(RegexError);
    expect(() => compilePattern("((a{100}){100}){100}")).toThrow(RegexError);
    expect(() => compilePattern("a{4000}")).not.toThrow();
    expect(() => compilePattern("a{100}", { maxStates: 50 })).toThrow(/exceeds 50 states/);
    expect(() => compilePattern("x".repeat(5000))).toThrow(RegexError);
  });

  it("refuses groups nested too deeply rather than overflowing the stack", () => {
    expect(() => compilePattern("(".repeat(5000) + ")".repeat(5000))).toThrow(/nested/);
  });
});

// ---- formats ----

const FORMATS: Record<string, { valid: string[]; invalid: string[] }> = {
  "date-time": {
    valid: [
      "2024-01-31T12:34:56Z",
      "2024-02-30T00:00:00z",
      "1999-12-31t23:59:60.123456+05:30",
      "2024-06-01T08:00:00-00:00",
      "0000-01-01T00:00:00.0Z",
    ],
    invalid: [
      "2024-13-01T00:00:00Z",
      "2024-00-10T00:00:00Z",
      "2024-01-32T00:00:00Z",
      "2024-01-00T00:00:00Z",
      "2024-01-01T24:00:00Z",
      "2024-01-01T23:60:00Z",
      "2024-01-01T23:59:61Z",
      "2024-01-01T23:59:59",
      "2024-01-01 23:59:59Z",
      "2024-01-01T23:59:59.Z",
      "2024-01-01T23:59:59+24:00",
      "2024-01-01T23:59:59+0530",
      "24-01-01T00:00:00Z",
      "2024-1-01T00:00:00Z",
      " 2024-01-01T00:00:00Z",
      "2024-01-01T00:00:00Z ",
      "2024-01-01",
    ],
  },
  time: {
    valid: ["00:00:00Z", "23:59:60.5-12:00", "12:00:00+14:00", "08:30:15.000z"],
    invalid: ["24:00:00Z", "12:00:00", "12:00Z", "1:00:00Z", "12:61:00Z", "12:00:00+1:00"],
  },
  date: {
    valid: ["2024-01-01", "2024-02-30", "1970-12-31", "9999-10-19"],
    invalid: ["2024-13-01", "2024-1-01", "2024-01-1", "2024-01-32", "20240101", "2024/01/01", ""],
  },
  duration: {
    valid: [
      "P1Y",
      "P1Y2M3DT4H5M6S",
      "P4DT12H30M5S",
      "PT0S",
      "P0D",
      "P1M",
      "PT1M",
      "PT36H",
      "P2W",
      "P1Y1D",
      "PT1H30S",
      "P10Y10M",
    ],
    invalid: [
      "P",
      "PT",
      "P1YT",
      "PT1D",
      "P2D1Y",
      "P1D2H",
      "P2S",
      "P1",
      "1Y",
      "P1Y2W",
      "P1.5Y",
      "p1Y",
      "P1M1Y",
      "PT1S1M",
    ],
  },
  email: {
    valid: [
      "joe@example.com",
      "first.last+tag@mail.example.co.uk",
      "o'brien!#$%&*/=?^_`{|}~-@x-y.io",
      "a@b.c",
      "x@123.45.67.89",
    ],
    invalid: [
      "joe@localhost",
      "joe",
      "@example.com",
      "joe@",
      ".joe@example.com",
      "joe.@example.com",
      "jo..e@example.com",
      "joe@-example.com",
      "joe@example-.com",
      "joe@example..com",
      "joe@example.com.",
      "jo e@example.com",
      "joe@@example.com",
      "joé@example.com",
      `joe@${"a".repeat(64)}.com`,
    ],
  },
  hostname: {
    valid: [
      "localhost",
      "example.com",
      "a-b.c-d.e",
      "xn--bcher-kva.example",
      "1.2.3.4",
      "0",
      "a".repeat(63) + ".com",
    ],
    invalid: [
      "",
      "-a.com",
      "a-.com",
      "a..com",
      ".a.com",
      "a.com.",
      "a_b.com",
      "exa mple.com",
      "a".repeat(64) + ".com",
      "bücher.de",
    ],
  },
  ipv4: {
    valid: ["0.0.0.0", "192.168.1.1", "255.255.255.255", "10.0.250.9", "1.2.3.4"],
    invalid: [
      "256.1.1.1",
      "01.2.3.4",
      "1.2.3.04",
      "1.2.3",
      "1.2.3.4.5",
      "1..2.3",
      "1.2.3.4 ",
      "-1.2.3.4",
      "1.2.3.4.",
      "00.1.2.3",
      "300.1.2.3",
      "249.250.251.260",
    ],
  },
  ipv6: {
    valid: [
      "::",
      "::1",
      "1::",
      "2001:db8::8a2e:370:7334",
      "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
      "::ffff:192.0.2.1",
      "64:ff9b::192.0.2.33",
      "1:2:3:4:5:6:7:8",
      "1:2:3:4:5:6::8",
      "1::2:3:4:5:6:7",
      "1:2:3:4:5:6:7::",
      "1:2:3:4:5:6:1.2.3.4",
      "fe80::1",
      "ABCD:ef01::",
    ],
    invalid: [
      "1:2:3:4:5:6:7:8:9",
      "1:2:3:4:5:6:7",
      "1::2::3",
      ":::",
      "1:::2",
      ":1:2:3:4:5:6:7",
      "1:2:3:4:5:6:7:",
      "12345::",
      "g::1",
      "::ffff:256.0.2.1",
      "::ffff:01.0.2.1",
      "1:2:3:4:5:6:7:1.2.3.4",
      "::1.2.3.4:1",
      "fe80::1%eth0",
      "",
    ],
  },
  uuid: {
    valid: [
      "123e4567-e89b-12d3-a456-426614174000",
      "00000000-0000-0000-0000-000000000000",
      "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
    ],
    invalid: [
      "123e4567e89b12d3a456426614174000",
      "123e4567-e89b-12d3-a456-42661417400",
      "123e4567-e89b-12d3-a456-4266141740000",
      "123e4567-e89b-12d3-a456_426614174000",
      "g23e4567-e89b-12d3-a456-426614174000",
      "{123e4567-e89b-12d3-a456-426614174000}",
    ],
  },
};

describe("formats", () => {
  const nfas = new Map<string, Nfa>();
  const nfaOf = (format: string) => {
    let nfa = nfas.get(format);
    if (!nfa) {
      nfa = compilePattern(FORMAT_PATTERNS[format]!);
      nfas.set(format, nfa);
    }
    return nfa;
  };

  it("are the formats OpenAI's structured outputs support", () => {
    expect(Object.keys(FORMAT_PATTERNS).sort()).toEqual(Object.keys(FORMATS).sort());
  });

  it.each(Object.entries(FORMATS))("%s", (format, { valid, invalid }) => {
    const nfa = nfaOf(format);
    const re = new RegExp(FORMAT_PATTERNS[format]!, "u");
    expect(nfa.size).toBeLessThan(2048);
    expect(valid.filter((s) => !nfaMatches(nfa, s))).toEqual([]);
    expect(invalid.filter((s) => nfaMatches(nfa, s))).toEqual([]);
    for (const s of [...valid, ...invalid]) expect(nfaMatches(nfa, s)).toBe(re.test(s));
  });

  it("ipv4 agrees with node:net's isIPv4 on random candidates", () => {
    const rng = new Prng(4, "ipv4");
    const parts = [
      "0",
      "00",
      "01",
      "1",
      "9",
      "10",
      "99",
      "100",
      "199",
      "249",
      "250",
      "255",
      "256",
      "260",
      "300",
      "1000",
      "",
      "a",
      "-1",
      " 1",
    ];
    const nfa = nfaOf("ipv4");
    let valid = 0;
    for (let k = 0; k < 1000; k++) {
      const n = rng.uniform() < 0.8 ? 4 : 3 + Math.floor(rng.uniform() * 3);
      // Mostly parts that are octets, so that many candidates are addresses.
      const part = () => pick(rng, rng.uniform() < 0.8 ? parts.slice(0, 12) : parts);
      const s = Array.from({ length: n }, part).join(rng.uniform() < 0.95 ? "." : ":");
      expect(nfaMatches(nfa, s), s).toBe(isIPv4(s));
      if (isIPv4(s)) valid++;
    }
    expect(valid).toBeGreaterThan(50);
  });

  it("ipv6 agrees with node:net's isIPv6 on random candidates", () => {
    const rng = new Prng(6, "ipv6");
    const groups = [
      "0",
      "1",
      "a",
      "F",
      "db8",
      "ffff",
      "0db8",
      "12345",
      "g",
      "",
      "1.2.3.4",
      "256.0.0.1",
      "01.2.3.4",
    ];
    const nfa = nfaOf("ipv6");
    let valid = 0;
    for (let k = 0; k < 1500; k++) {
      const n = 1 + Math.floor(rng.uniform() * 9);
      const parts = Array.from({ length: n }, (_, i) =>
        i === n - 1 && rng.uniform() < 0.2 ? pick(rng, groups) : pick(rng, groups.slice(0, 8)),
      );
      // "::" in up to two places (one empty part is one, at the ends two empty ones).
      for (let d = Math.floor(rng.uniform() * 3); d > 0; d--)
        parts.splice(Math.floor(rng.uniform() * (parts.length + 1)), 0, "");
      const s = parts.join(":");
      // Sound: what the pattern accepts is an address. Node's check is the same grammar
      // (plus zone ids, never generated), so they agree.
      expect(nfaMatches(nfa, s), s).toBe(isIPv6(s));
      if (isIPv6(s)) valid++;
    }
    expect(valid).toBeGreaterThan(100);
  });
});
