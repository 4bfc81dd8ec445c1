// The continuous-batching scheduler and the KV block allocator: pure logic, table-driven.
import { describe, expect, it } from "vitest";
import { BlockAllocator } from "../../src/engine/kv-blocks.ts";
import { type ScheduledChunk, Scheduler, Sequence } from "../../src/engine/scheduler.ts";

const seq = (id: number, prompt: number, maxTotal = prompt + 8) =>
  new Sequence(
    id,
    Array.from({ length: prompt }, (_, i) => i + 1),
    maxTotal,
  );

/** "id:start+n" per chunk, "!" when the chunk completes the sequence. */
const show = (chunks: ScheduledChunk[]) =>
  chunks.map((c) => `${c.seq.id}:${c.start}+${c.numTokens}${c.isComplete ? "!" : ""}`);

/** Runs a step: commits the chunks and appends a sampled token to complete ones. */
function step(s: Scheduler) {
  const r = s.schedule();
  s.commit(r.chunks);
  for (const c of r.chunks) if (c.isComplete) c.seq.outputTokens.push(99);
  return { chunks: show(r.chunks), preempted: r.preempted.map((p) => p.id) };
}

describe("BlockAllocator", () => {
  // biome-ignore format: a table
  it.each([
    // [blocks, blockSize, reservations [seq, tokens], expected results, free after]
    [4, 4, [[1, 4], [2, 5], [3, 1], [4, 1]], [true, true, true, false], 0],
    [4, 4, [[1, 3], [1, 4], [1, 5]], [true, true, true], 2],
    [2, 16, [[1, 33]], [false], 2],
    [3, 1, [[1, 1], [2, 2], [1, 1]], [true, true, true], 0],
  ] as const)("%i blocks of %i: %j", (blocks, size, reqs, want, free) => {
    const a = new BlockAllocator(blocks, size);
    expect(reqs.map(([s, n]) => a.reserve(s, n))).toEqual(want);
    expect(a.numFreeBlocks).toBe(free);
  });

  it("frees a sequence's blocks and hands them out again", () => {
    const a = new BlockAllocator(4, 2);
    a.reserve(1, 4);
    a.reserve(2, 4);
    expect(a.usage).toBe(1);
    expect(a.free(1)).toBe(2);
    expect(a.free(1)).toBe(0);
    expect(a.reserve(3, 3)).toBe(true);
    expect(new Set([...a.table(2), ...a.table(3)]).size).toBe(4);
  });

  it("refuses an empty pool", () => {
    expect(() => new BlockAllocator(0, 16)).toThrow(/EM_KV_BUDGET|at least one block/);
  });
});

describe("BlockAllocator prefix cache", () => {
  it("shares registered blocks, keeps them when freed, and forgets the oldest when needed", () => {
    const a = new BlockAllocator(4, 2);
    expect(a.reserve(1, 4)).toBe(true); // blocks 0, 1
    a.register(1, 0, "h0");
    a.register(1, 1, "h01");
    // Another sequence with the same first two blocks shares them; a third block is its own.
    expect(a.attachPrefix(2, ["h0", "h01", "h012"])).toBe(2);
    expect(a.table(2)).toEqual(a.table(1));
    expect(a.reserve(2, 5)).toBe(true);
    expect(a.numUsedBlocks).toBe(3);
    // Freed by one holder, still held by the other; freed by both: cached, not used.
    a.free(1);
    expect(a.numUsedBlocks).toBe(3);
    a.free(2);
    expect(a.numUsedBlocks).toBe(0);
    expect(a.numCachedBlocks).toBe(2);
    expect(a.numFreeBlocks).toBe(4);
    // A later sequence finds them again.
    expect(a.attachPrefix(3, ["h0", "h01"])).toBe(2);
    a.free(3);
    // A reservation takes the empty blocks first, then the cached ones, the later block of
    // the prefix first: the prefix is then one block shorter.
    expect(a.reserve(4, 4)).toBe(true);
    expect(a.numCachedBlocks).toBe(2);
    expect(a.reserve(5, 2)).toBe(true);
    expect(a.numCachedBlocks).toBe(1);
    expect(a.attachPrefix(6, ["h0", "h01"])).toBe(1);
    // A hash is registered once; a block once.
    a.register(4, 0, "h0");
    a.register(6, 0, "other");
    expect(a.attachPrefix(7, ["other"])).toBe(0);
  });
});

describe("Scheduler", () => {
  const config = { maxBatchTokens: 8, maxRunning: 4, maxQueueDepth: 2 };

  it.each([
    {
      name: "chunked prefill under the token budget, then decodes batched",
      prompts: [10, 3],
      steps: [["1:0+8"], ["1:8+2!", "2:0+3!"], ["1:10+1!", "2:3+1!"]],
    },
    {
      name: "decodes first, then a new prompt takes what budget is left",
      prompts: [2, 12],
      steps: [
        ["1:0+2!", "2:0+6"],
        ["1:2+1!", "2:6+6!"],
        ["1:3+1!", "2:12+1!"],
      ],
    },
  ])("$name", ({ prompts, steps }) => {
    const s = new Scheduler(config, new BlockAllocator(64, 4));
    expect(prompts.map((p, i) => s.add(seq(i + 1, p)))).toEqual(prompts.map(() => "ok"));
    for (const want of steps) expect(step(s).chunks).toEqual(want);
  });

  // Sequences wanting every row's logits (prompt logprobs) share maxLogitRows per step;
  // the others are not limited by it. [wantsAll per prompt, prompts, steps]
  // biome-ignore format: a table
  it.each([
    {
      name: "a prompt with logprobs is chunked by the logit rows, another runs beside it",
      wants: [true, false], prompts: [7, 3],
      steps: [["1:0+3", "2:0+3!"], ["1:3+3", "2:3+1!"], ["1:6+1!", "2:4+1!"]],
    },
    {
      name: "two such prompts share the rows: the second waits its turn, keeping its place",
      wants: [true, true], prompts: [4, 2],
      steps: [["1:0+3"], ["1:3+1!", "2:0+2!"], ["1:4+1!", "2:2+1!"]],
    },
    {
      name: "after its prompt, decodes want one row each and are not limited",
      wants: [true], prompts: [3],
      steps: [["1:0+3!"], ["1:3+1!"]],
    },
  ])("$name", ({ wants, prompts, steps }) => {
    const s = new Scheduler({ ...config, maxLogitRows: 3 }, new BlockAllocator(64, 4));
    const seqs = prompts.map((p, i) => seq(i + 1, p));
    seqs.forEach((q, i) => {
      q.wantsAllLogits = wants[i]!;
      s.add(q);
    });
    for (const want of steps) {
      expect(step(s).chunks).toEqual(want);
      // The engine stops asking for every row once a prompt's logprobs are complete.
      for (const q of seqs) if (q.numComputed >= q.promptTokens.length) q.wantsAllLogits = false;
    }
  });

  it("with prefix caching, starts a sequence after the cached blocks of its prefix", () => {
    const blocks = new BlockAllocator(16, 4);
    const s = new Scheduler({ ...config, prefixCaching: true }, blocks);
    const prompt = (tail: number[]) => [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...tail];
    const a = new Sequence(1, prompt([11]), 20);
    s.add(a);
    expect(step(s).chunks).toEqual(["1:0+8"]);
    expect(step(s).chunks).toEqual(["1:8+3!"]);
    // Same 8 first tokens (two blocks), other tail: computing starts at 8.
    const b = new Sequence(2, prompt([12, 13]), 20);
    s.add(b);
    expect(step(s).chunks).toEqual(["1:11+1!", "2:8+4!"]);
    expect(blocks.table(2).slice(0, 2)).toEqual(blocks.table(1).slice(0, 2));
    expect([s.prefixQueryTokens, s.prefixHitTokens]).toEqual([11 + 12, 8]);
    // A prompt that is all cached blocks still computes its last token (for its logits).
    const c = new Sequence(3, [1, 2, 3, 4, 5, 6, 7, 8], 20);
    s.add(c);
    expect(step(s).chunks).toContain("3:4+4!");
    // Prompt logprobs need every row: no lookup.
    const d = new Sequence(4, prompt([]), 20);
    d.wantsAllLogits = true;
    s.add(d);
    expect(step(s).chunks.find((x) => x.startsWith("4:"))).toMatch(/^4:0\+/);
  });

  it("with prefix caching, another choice of a request waits for the first's prompt, then shares it", () => {
    const blocks = new BlockAllocator(16, 4);
    const s = new Scheduler({ ...config, maxQueueDepth: 4, prefixCaching: true }, blocks);
    const prompt = Array.from({ length: 11 }, (_, i) => i + 1);
    const a = new Sequence(1, prompt, 20);
    const b = new Sequence(2, prompt, 20);
    b.promptFrom = a;
    const c = seq(3, 2);
    expect([a, b, c].map((q) => s.add(q))).toEqual(["ok", "ok", "ok"]);
    // b (and c behind it: admission is in order) wait while a's prompt is computed; then
    // b starts after a's two full blocks.
    expect(step(s).chunks).toEqual(["1:0+8"]);
    expect(step(s).chunks).toEqual(["1:8+3!"]);
    expect(step(s).chunks).toEqual(["1:11+1!", "2:8+3!", "3:0+2!"]);
    expect(blocks.table(2).slice(0, 2)).toEqual(blocks.table(1).slice(0, 2));
  });

  it("refuses a maxLogitRows that is no positive integer", () => {
    expect(() => new Scheduler({ ...config, maxLogitRows: 0 }, new BlockAllocator(4, 4))).toThrow(
      /maxLogitRows must be a positive integer/,
    );
  });

  it("limits the running sequences", () => {
    const s = new Scheduler({ ...config, maxRunning: 1 }, new BlockAllocator(64, 4));
    s.add(seq(1, 2));
    s.add(seq(2, 2));
    expect(step(s).chunks).toEqual(["1:0+2!"]);
    expect(s.numWaiting).toBe(1);
    expect(step(s).chunks).toEqual(["1:2+1!"]);
  });

  it("refuses sequences past the queue depth and ones too large for the cache", () => {
    const s = new Scheduler(config, new BlockAllocator(4, 4));
    expect(s.add(seq(1, 4))).toBe("ok");
    expect(s.add(seq(2, 4))).toBe("ok");
    expect(s.add(seq(3, 4))).toBe("queue_full");
    expect(s.add(seq(4, 4, 17))).toBe("too_large");
  });

  it("preempts the newest sequence when blocks run out, and recomputes it later", () => {
    // 3 blocks of 4 tokens; two sequences of 4 prompt tokens each need a 2nd block.
    const blocks = new BlockAllocator(3, 4);
    const s = new Scheduler(config, blocks);
    const a = seq(1, 4);
    const b = seq(2, 4);
    s.add(a);
    s.add(b);
    expect(step(s)).toEqual({ chunks: ["1:0+4!", "2:0+4!"], preempted: [] });
    // Both need a 5th position: a gets the free block, b needs one more: b is preempted.
    expect(step(s)).toEqual({ chunks: ["1:4+1!"], preempted: [2] });
    expect(b.numComputed).toBe(0);
    expect(b.status).toBe("waiting");
    expect(blocks.numFreeBlocks).toBe(1);
    // b waits until a finishes, then recomputes prompt + its sampled token in one chunk.
    expect(step(s)).toEqual({ chunks: ["1:5+1!"], preempted: [] });
    s.finish(a);
    expect(blocks.numFreeBlocks).toBe(3);
    expect(step(s)).toEqual({ chunks: ["2:0+5!"], preempted: [] });
    expect(b.outputTokens).toEqual([99, 99]);
    expect(b.numPreemptions).toBe(1);
  });

  it("cancelling frees blocks of running and drops waiting sequences", () => {
    const blocks = new BlockAllocator(8, 4);
    const s = new Scheduler({ ...config, maxRunning: 1 }, blocks);
    const a = seq(1, 6);
    const b = seq(2, 3);
    s.add(a);
    s.add(b);
    step(s);
    expect(blocks.numFreeBlocks).toBe(6);
    s.finish(a);
    s.finish(b);
    expect(blocks.numFreeBlocks).toBe(8);
    expect(s.isIdle).toBe(true);
    expect(a.status).toBe("finished");
  });
});

describe("Scheduler with drafts (speculative decoding)", () => {
  const config = { maxBatchTokens: 8, maxRunning: 4, maxQueueDepth: 4 };
  /** "id:start+n!" and the draft's length, per chunk. */
  const showDraft = (chunks: ScheduledChunk[]) =>
    chunks.map((c) => `${show([c])[0]}d${c.draft.length}`);

  it("runs a decoding sequence's draft after its last token; commit counts only that token", () => {
    const blocks = new BlockAllocator(16, 4);
    const s = new Scheduler({ ...config, prefixCaching: true }, blocks);
    const a = seq(1, 3, 20);
    s.add(a);
    // In its prefill the draft is ignored.
    a.draft = [7, 7];
    expect(showDraft(s.schedule().chunks)).toEqual(["1:0+3!d0"]);
    s.commit([{ seq: a, start: 0, numTokens: 3, isComplete: true, draft: [] }]);
    a.outputTokens.push(5);
    a.draft = [6, 7, 8];
    const r = s.schedule();
    expect(showDraft(r.chunks)).toEqual(["1:3+4!d3"]);
    expect(blocks.table(1)).toHaveLength(2);
    s.commit(r.chunks);
    expect(a.numComputed).toBe(4);
    // Two of the draft accepted (then the sampled token): positions 4 and 5 computed, and
    // the block they completed is registered for prefix caching.
    a.outputTokens.push(6, 7, 9);
    s.accept(a, 2);
    expect(a.numComputed).toBe(6);
    const b = new Sequence(2, [1, 2, 3, 5, 6, 7, 1], 20);
    s.add(b);
    a.draft = [];
    expect(showDraft(s.schedule().chunks)).toEqual(["1:6+1!d0", "2:4+3!d0"]);
  });

  it("accepting past the sequence's tokens is an internal error", () => {
    const s = new Scheduler(config, new BlockAllocator(16, 4));
    const a = seq(1, 3);
    s.add(a);
    step(s);
    expect(() => s.accept(a, 2)).toThrow(/accepts 2 positions past its 4 tokens/);
  });

  // biome-ignore format: a table
  it.each([
    { name: "the token budget trims drafts, in running order", budget: 8, rows: undefined, want: ["1:2+5!d4", "2:2+3!d2"] },
    { name: "drafts never take the token a later sequence needs", budget: 3, rows: undefined, want: ["1:2+2!d1", "2:2+1!d0"] },
    { name: "a budget of one token per sequence leaves no room for drafts", budget: 2, rows: undefined, want: ["1:2+1!d0", "2:2+1!d0"] },
    { name: "drafts count against maxLogitRows (a plain decode does not)", budget: 16, rows: 4, want: ["1:2+4!d3", "2:2+1!d0"] },
  ])("$name", ({ budget, rows, want }) => {
    const s = new Scheduler(
      { ...config, maxBatchTokens: budget, ...(rows ? { maxLogitRows: rows } : {}) },
      new BlockAllocator(16, 4),
    );
    const [a, b] = [seq(1, 1, 20), seq(2, 1, 20)];
    s.add(a);
    s.add(b);
    step(s);
    step(s);
    a.draft = [1, 2, 3, 4];
    b.draft = [1, 2, 3, 4];
    expect(showDraft(s.schedule().chunks)).toEqual(want);
  });

  it("drops a draft whose blocks do not fit rather than preempt", () => {
    // 2 blocks of 4: a holds one (4 tokens computed + 1 sampled needs a second), b the other.
    const blocks = new BlockAllocator(3, 4);
    const s = new Scheduler(config, blocks);
    const [a, b] = [seq(1, 4, 12), seq(2, 4, 12)];
    expect([s.add(a), s.add(b)]).toEqual(["ok", "ok"]);
    step(s);
    // a takes the free block for its 5th position; a draft of 4 would need a 3rd block.
    a.draft = [1, 2, 3, 4];
    const r = s.schedule();
    expect(showDraft(r.chunks)).toEqual(["1:4+1!d0"]);
    expect(blocks.table(1)).toHaveLength(2);
    // b needs a block too: it is preempted, as without drafts.
    expect(r.preempted).toEqual([b]);
  });
});

describe("Scheduler with the priority policy", () => {
  // Each step: sequences added before it ([id, prompt tokens, priority, arrival ms (0 when
  // left out)]), sequences finished before it, and the chunks and preemptions it gives.
  // Every sequence may grow to its prompt + 8 tokens.
  interface Step {
    add?: ([number, number, number] | [number, number, number, number])[];
    finish?: number[];
    chunks: string[];
    preempted?: number[];
  }
  // biome-ignore format: a table
  const cases: { name: string; policy: "fcfs" | "priority"; maxRunning?: number; blocks?: number; agingMs?: number; steps: Step[] }[] = [
    {
      name: "admits in (priority, arrival) order",
      policy: "priority",
      steps: [{ add: [[1, 2, 0], [2, 2, 5], [3, 2, -1], [4, 2, 0]], chunks: ["3:0+2!", "1:0+2!", "4:0+2!", "2:0+2!"] }],
    },
    {
      name: "fcfs ignores priorities",
      policy: "fcfs",
      steps: [{ add: [[1, 2, 0], [2, 2, 5], [3, 2, -1], [4, 2, 0]], chunks: ["1:0+2!", "2:0+2!", "3:0+2!", "4:0+2!"] }],
    },
    {
      name: "a higher priority takes the running slot of the lowest, which waits behind it",
      policy: "priority", maxRunning: 2,
      steps: [
        { add: [[1, 2, 0], [2, 2, 5]], chunks: ["1:0+2!", "2:0+2!"] },
        { add: [[3, 2, 1]], chunks: ["1:2+1!", "3:0+2!"], preempted: [2] },
        { chunks: ["1:3+1!", "3:2+1!"] },
        // A slot frees: the preempted one recomputes its prompt and its sampled token.
        { finish: [1], chunks: ["3:3+1!", "2:0+3!"] },
      ],
    },
    {
      name: "under fcfs the newcomer waits for a slot",
      policy: "fcfs", maxRunning: 2,
      steps: [
        { add: [[1, 2, 0], [2, 2, 5]], chunks: ["1:0+2!", "2:0+2!"] },
        { add: [[3, 2, 1]], chunks: ["1:2+1!", "2:2+1!"] },
      ],
    },
    {
      name: "equal priority does not preempt",
      policy: "priority", maxRunning: 2,
      steps: [
        { add: [[1, 2, 0], [2, 2, 5]], chunks: ["1:0+2!", "2:0+2!"] },
        { add: [[3, 2, 5]], chunks: ["1:2+1!", "2:2+1!"] },
      ],
    },
    {
      name: "a higher priority short of blocks preempts the lowest for them",
      // 4 blocks of 4: 1 holds one, 2 holds two; 3 needs two.
      policy: "priority", blocks: 4,
      steps: [
        { add: [[1, 3, 0], [2, 5, 2]], chunks: ["1:0+3!", "2:0+5!"] },
        { add: [[3, 6, 1]], chunks: ["1:3+1!", "3:0+6!"], preempted: [2] },
      ],
    },
    {
      name: "no preemption when even all lower ones could not free enough blocks",
      // 3 needs three blocks; 1 (higher) holds three, 2 (lower) one, one is free.
      policy: "priority", blocks: 5,
      steps: [
        { add: [[1, 11, 0], [2, 3, 2]], chunks: ["1:0+11!", "2:0+3!"] },
        { add: [[3, 12, 1]], chunks: ["1:11+1!", "2:3+1!"] },
      ],
    },
    {
      name: "out of blocks, the lowest running is preempted, not the newest",
      // 3 blocks of 4: both hold one and need a second at their 5th token.
      policy: "priority", blocks: 3,
      steps: [
        { add: [[1, 4, 5]], chunks: ["1:0+4!"] },
        // Running ones first, then the one admitted; from then on in priority order.
        { add: [[2, 3, 0]], chunks: ["1:4+1!", "2:0+3!"] },
        { chunks: ["2:3+1!", "1:5+1!"] },
        { chunks: ["2:4+1!"], preempted: [1] },
      ],
    },
    {
      name: "the same under fcfs preempts the newest",
      policy: "fcfs", blocks: 3,
      steps: [
        { add: [[1, 4, 5]], chunks: ["1:0+4!"] },
        { add: [[2, 3, 0]], chunks: ["1:4+1!", "2:0+3!"] },
        { chunks: ["1:5+1!", "2:3+1!"] },
        { chunks: ["1:6+1!"], preempted: [2] },
      ],
    },
    {
      name: "a preempted sequence waits behind higher priorities and before later equals",
      policy: "priority", maxRunning: 1,
      steps: [
        { add: [[1, 2, 3]], chunks: ["1:0+2!"] },
        // 2 preempts 1; 3 (same priority as 1, later) waits behind 1.
        { add: [[2, 2, 0], [3, 2, 3]], chunks: ["2:0+2!"], preempted: [1] },
        { finish: [2], chunks: ["1:0+3!"] },
      ],
    },
    {
      name: "aging: a low priority that waited long enough is admitted before newer higher ones",
      // 1 s per level: 2 (priority 5, arrived at 0) ranks as 3 (priority 0) arriving at 5 s.
      policy: "priority", maxRunning: 1, agingMs: 1000,
      steps: [
        { add: [[1, 2, 0, 0], [2, 2, 5, 0], [3, 2, 0, 6000]], chunks: ["1:0+2!"] },
        { finish: [1], chunks: ["2:0+2!"] },
      ],
    },
    {
      name: "without aging the same newer higher one goes first",
      policy: "priority", maxRunning: 1,
      steps: [
        { add: [[1, 2, 0, 0], [2, 2, 5, 0], [3, 2, 0, 6000]], chunks: ["1:0+2!"] },
        { finish: [1], chunks: ["3:0+2!"] },
      ],
    },
    {
      name: "aging: a higher priority also first in the aged order preempts; its victim stays behind it",
      policy: "priority", maxRunning: 1, agingMs: 1000,
      steps: [
        { add: [[1, 2, 5, 5000]], chunks: ["1:0+2!"] },
        { add: [[2, 2, 0, 6000]], chunks: ["2:0+2!"], preempted: [1] },
        { chunks: ["2:2+1!"] },
      ],
    },
    {
      name: "aging: a higher priority does not preempt one the aged order puts before it",
      // 1 (priority 5, at 0) ranks as priority 0 at 5 s; 2 (priority 0) arrives at 10 s.
      policy: "priority", maxRunning: 1, agingMs: 1000,
      steps: [
        { add: [[1, 2, 5, 0]], chunks: ["1:0+2!"] },
        { add: [[2, 2, 0, 10000]], chunks: ["1:2+1!"] },
      ],
    },
    {
      name: "aging: an aged head of lower priority waits for a free slot, and so do those behind it",
      policy: "priority", maxRunning: 1, agingMs: 1000,
      steps: [
        { add: [[1, 2, 3, 0]], chunks: ["1:0+2!"] },
        // 2 (priority 5, at 0) is first in line: it may not preempt 1, so 3 waits too.
        { add: [[2, 2, 5, 0], [3, 2, 1, 10000]], chunks: ["1:2+1!"] },
        { finish: [1], chunks: ["2:0+2!"] },
      ],
    },
    {
      name: "aging: the victim is the lowest running one the head outranks, not just the last",
      // Aged ranks: 1 is 3 + 10 = 13, 2 is 5 + 0 = 5, 3 is 1 + 10 = 11: 3 outranks 1 only.
      policy: "priority", maxRunning: 2, agingMs: 1000,
      steps: [
        { add: [[1, 2, 3, 10000], [2, 2, 5, 0]], chunks: ["2:0+2!", "1:0+2!"] },
        { add: [[3, 2, 1, 10000]], chunks: ["2:2+1!", "3:0+2!"], preempted: [1] },
      ],
    },
  ];
  it.each(cases)("$name", ({ policy, maxRunning, blocks, agingMs, steps }) => {
    const s = new Scheduler(
      {
        maxBatchTokens: 16,
        maxRunning: maxRunning ?? 8,
        maxQueueDepth: 8,
        policy,
        priorityAgingMs: agingMs,
      },
      new BlockAllocator(blocks ?? 64, 4),
    );
    const all = new Map<number, Sequence>();
    for (const st of steps) {
      for (const [id, prompt, priority, arrival] of st.add ?? []) {
        const q = seq(id, prompt);
        q.priority = priority;
        q.arrivedAt = arrival ?? 0;
        all.set(id, q);
        expect(s.add(q)).toBe("ok");
      }
      for (const id of st.finish ?? []) s.finish(all.get(id)!);
      expect(step(s)).toEqual({ chunks: st.chunks, preempted: st.preempted ?? [] });
    }
  });

  it("refuses an unknown policy", () => {
    expect(
      () =>
        new Scheduler(
          { maxBatchTokens: 8, maxRunning: 1, maxQueueDepth: 1, policy: "lifo" as "fcfs" },
          new BlockAllocator(4, 4),
        ),
    ).toThrow(/scheduling policy must be fcfs or priority, got lifo/);
  });

  it.each([
    [{ policy: "fcfs", priorityAgingMs: 1000 }, /priority aging needs the priority policy/],
    [
      { policy: "priority", priorityAgingMs: -1 },
      /priority aging must be a number of ms >= 0, got -1/,
    ],
    [{ policy: "priority", priorityAgingMs: Number.NaN }, /got NaN/],
  ] as const)("refuses aging %j", (cfg, error) => {
    expect(
      () =>
        new Scheduler(
          { maxBatchTokens: 8, maxRunning: 1, maxQueueDepth: 1, ...cfg },
          new BlockAllocator(4, 4),
        ),
    ).toThrow(error);
  });
});
