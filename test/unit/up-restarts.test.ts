// `up`'s restart policy (src/local/children.ts Restarts): a child that exits while serving
// starts again after 1 s, then 2, 4, 8, 16 s for further exits within 10 minutes, and the
// 6th exit within 10 minutes stops `up`; exits older than that are forgotten,
// and each child counts its own.
import { describe, expect, it } from "vitest";
import { Restarts } from "../../src/local/children.ts";

const MIN = 60_000;

describe("up's restarts", () => {
  it.each([
    {
      name: "backs off 1, 2, 4, 8, 16 s, then gives up at the 6th exit in 10 minutes",
      exits: [0, 1, 2, 3, 4, 5].map((s) => ({ at: s * 1000, child: "shard-0.0" })),
      want: [1, 2, 4, 8, 16, "give up"],
    },
    {
      name: "an exit 10 minutes after an earlier one no longer counts it",
      exits: [
        { at: 0, child: "gateway" },
        { at: 10 * MIN, child: "gateway" },
        { at: 10 * MIN + 1, child: "gateway" },
      ],
      want: [1, 1, 2],
    },
    {
      name: "each child has its own count",
      exits: [
        { at: 0, child: "shard-0.0" },
        { at: 1, child: "shard-1.0" },
        { at: 2, child: "shard-0.0" },
      ],
      want: [1, 1, 2],
    },
  ])("$name", ({ exits, want }) => {
    let now = 0;
    const r = new Restarts(() => now);
    const got = exits.map(({ at, child }) => {
      now = at;
      const v = r.next(child);
      return v.giveUp ? "give up" : v.delayS;
    });
    expect(got).toEqual(want);
  });

  it("says why it gives up", () => {
    let now = 0;
    const r = new Restarts(() => now);
    for (let i = 0; i < Restarts.MAX; i++) {
      now += 1000;
      expect(r.next("nats").giveUp).toBeUndefined();
    }
    expect(r.next("nats").giveUp).toBe("for the 6th time in 10 minutes");
  });
});
