// How a step's chunks are split into two micro-batches (gateway --micro-batches 2): every
// chunk in exactly one half, both halves non-empty, about the same number of tokens.
import { describe, expect, it } from "vitest";
import { splitByTokens } from "../../src/gateway/engine.ts";

const chunks = (sizes: number[]) => sizes.map((numTokens) => ({ numTokens }));
const tokens = (sizes: number[], g: number[]) => g.reduce((s, i) => s + sizes[i]!, 0);

describe("splitByTokens", () => {
  it.each([
    [
      [1, 1],
      [[0], [1]],
    ],
    [
      [1, 1, 1, 1, 1],
      [
        [0, 2, 4],
        [1, 3],
      ],
    ],
    // A prefill chunk against decodes: the decodes go to the other half.
    [
      [1, 1, 20, 1],
      [[2], [0, 1, 3]],
    ],
    [
      [8, 3, 5, 4],
      [
        [0, 1],
        [2, 3],
      ],
    ],
  ])("%j -> %j", (sizes, want) => {
    expect(splitByTokens(chunks(sizes))).toEqual(want);
  });

  it("puts every chunk in exactly one non-empty half, balanced within the largest chunk", () => {
    for (let n = 2; n <= 40; n++) {
      const sizes = Array.from({ length: n }, (_, i) => 1 + ((i * 7919) % 13));
      const [a, b] = splitByTokens(chunks(sizes));
      expect(a.length).toBeGreaterThan(0);
      expect(b.length).toBeGreaterThan(0);
      expect([...a, ...b].sort((p, q) => p - q)).toEqual(sizes.map((_, i) => i));
      expect(Math.abs(tokens(sizes, a) - tokens(sizes, b))).toBeLessThanOrEqual(Math.max(...sizes));
    }
  });
});
