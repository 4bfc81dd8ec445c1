// Priority scheduling (`gateway --scheduling-policy priority`, vLLM's `priority` field):
// gateways started in this process on the tiny V3 checkpoint, driven by the official
// `openai` client. One running slot makes the order observable: a request of higher
// priority preempts the one running, which is recomputed later with its text unchanged.
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { waitFor } from "../support/env.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import {
  type holdable,
  metric,
  startGateway,
  startHeldGateway,
  type TestGateway,
} from "./helpers.ts";

let dir: string;
let fcfs: TestGateway;
let prio: TestGateway;
let hold: ReturnType<typeof holdable>;
let aged: TestGateway;
let agedHold: ReturnType<typeof holdable>;

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  fcfs = await startGateway(dir);
  const held = await startHeldGateway(dir, { schedulingPolicy: "priority", maxRunning: 1 });
  [prio, hold] = [held, held.hold];
  const agedHeld = await startHeldGateway(dir, {
    schedulingPolicy: "priority",
    priorityAgingMs: 200,
    maxRunning: 1,
  });
  [aged, agedHold] = [agedHeld, agedHeld.hold];
});

afterAll(async () => {
  hold?.release();
  agedHold?.release();
  await fcfs?.close();
  await prio?.close();
  await aged?.close();
});

const LOW = {
  model: "tiny",
  prompt: "one two three",
  max_tokens: 40,
  temperature: 0,
  ignore_eos: true,
};
const HIGH = {
  model: "tiny",
  prompt: "four five",
  max_tokens: 4,
  temperature: 0,
  ignore_eos: true,
};

/**
 * Runs the long request, and once it is running the short one; resolves the order they
 * finished in, their texts and the preemptions the gateway counted meanwhile.
 */
async function race(lowPriority: number, highPriority: number) {
  const g = prio;
  const before = await metric(g.url, "expertmesh_gateway_num_preemptions");
  const order: string[] = [];
  const ask = (name: string, body: object) =>
    g.client.completions.create(body as never).then((r) => {
      order.push(name);
      return (r as OpenAI.Completion).choices[0]!.text;
    });
  // The first step is held until the second request waits.
  hold.hold();
  const low = ask("low", { ...LOW, priority: lowPriority });
  await waitFor("the long request to run", async () =>
    (await metric(g.url, "expertmesh_gateway_num_requests_running")) === 1 ? true : undefined,
  );
  const high = ask("high", { ...HIGH, priority: highPriority });
  await waitFor("the short request to wait", async () =>
    (await metric(g.url, "expertmesh_gateway_num_requests_waiting")) === 1 ? true : undefined,
  );
  hold.release();
  const texts = { low: await low, high: await high };
  const preemptions = (await metric(g.url, "expertmesh_gateway_num_preemptions")) - before;
  expect(await metric(g.url, "expertmesh_gateway_kv_cache_usage_perc")).toBe(0);
  return { order, texts, preemptions };
}

describe("--scheduling-policy priority", () => {
  it("a request of higher priority preempts the running one; both texts are as alone", async () => {
    const alone = {
      low: (await prio.client.completions.create(LOW as never)).choices[0]!.text,
      high: (await prio.client.completions.create(HIGH as never)).choices[0]!.text,
    };
    const r = await race(5, -1);
    expect(r.order).toEqual(["high", "low"]);
    expect(r.preemptions).toBe(1);
    // Recomputed from its prompt and the tokens it had: the same greedy text.
    expect(r.texts).toEqual(alone);
  });

  it("equal or lower priority waits for the running one", async () => {
    for (const [low, high] of [
      [5, 5],
      [0, 3],
    ]) {
      const r = await race(low!, high!);
      expect(r.order, `${low} then ${high}`).toEqual(["low", "high"]);
      expect(r.preemptions).toBe(0);
    }
  });

  it("takes priority on chat completions and the Responses API too", async () => {
    const chat = await prio.client.chat.completions.create({
      model: "tiny",
      messages: [{ role: "user", content: "hi" }],
      max_tokens: 3,
      priority: -7,
    } as never);
    expect(chat.choices[0]!.message.role).toBe("assistant");
    const resp = await prio.client.responses.create({
      model: "tiny",
      input: "hi",
      max_output_tokens: 3,
      priority: 2,
    } as never);
    // 3 tokens: cut short by max_output_tokens, or ended before.
    expect(["completed", "incomplete"]).toContain(resp.status);
  });
});

describe("--priority-aging", () => {
  /**
   * The long request runs; a low-priority one waits, and 1.5 s later a high-priority one
   * (equal to the running one's: it preempts nothing). Resolves the order they finished in.
   */
  async function queueBehind(g: TestGateway, h: ReturnType<typeof holdable>) {
    const before = await metric(g.url, "expertmesh_gateway_num_preemptions");
    const order: string[] = [];
    const ask = (name: string, body: object) =>
      g.client.completions.create(body as never).then(() => order.push(name));
    const count = (what: "running" | "waiting", n: number) => async () =>
      (await metric(g.url, `expertmesh_gateway_num_requests_${what}`)) === n ? true : undefined;
    h.hold();
    const running = ask("running", { ...LOW, priority: 0 });
    await waitFor("the long request to run", count("running", 1));
    const low = ask("low", { ...HIGH, priority: 5 });
    await waitFor("the low request to wait", count("waiting", 1));
    // 1.5 s at 0.2 s per level: the low one ranks 7.5 levels better than it arrived.
    await new Promise((r) => setTimeout(r, 1500));
    const high = ask("high", { ...HIGH, priority: 0 });
    await waitFor("the high request to wait", count("waiting", 2));
    h.release();
    await Promise.all([running, low, high]);
    expect(await metric(g.url, "expertmesh_gateway_num_preemptions")).toBe(before);
    return order;
  }

  it("admits a low priority that waited long enough before a newer high one", async () => {
    expect(await queueBehind(aged, agedHold)).toEqual(["running", "low", "high"]);
  });

  it("without aging the newer high one goes first", async () => {
    expect(await queueBehind(prio, hold)).toEqual(["running", "high", "low"]);
  });
});

describe("an fcfs gateway (the default)", () => {
  it("refuses a non-zero priority with 400 naming it, and takes 0", async () => {
    const c = fcfs.client;
    const attempts: [string, () => Promise<unknown>][] = [
      ["completions", () => c.completions.create({ ...LOW, max_tokens: 2, priority: 1 } as never)],
      [
        "chat",
        () =>
          c.chat.completions.create({
            model: "tiny",
            messages: [{ role: "user", content: "hi" }],
            max_tokens: 2,
            priority: -1,
          } as never),
      ],
      [
        "responses",
        () =>
          c.responses.create({
            model: "tiny",
            input: "hi",
            max_output_tokens: 2,
            priority: 4,
          } as never),
      ],
    ];
    for (const [what, attempt] of attempts) {
      const err = await attempt().then(
        () => null,
        (e: unknown) => e,
      );
      expect(err, what).toBeInstanceOf(OpenAI.BadRequestError);
      const e = err as InstanceType<typeof OpenAI.BadRequestError>;
      expect(e.param, what).toBe("priority");
      expect((e.error as { code?: string }).code, what).toBe("EM_GATEWAY_BAD_REQUEST");
      expect(e.message, what).toMatch(/--scheduling-policy priority/);
    }
    const ok = await c.completions.create({ ...LOW, max_tokens: 2, priority: 0 } as never);
    expect(ok.choices[0]!.finish_reason).toBe("length");
    // Not an integer, or past 32 bits: refused by the request schema.
    for (const priority of [1.5, 2 ** 31]) {
      const err = await c.completions.create({ ...LOW, max_tokens: 2, priority } as never).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err, String(priority)).toBeInstanceOf(OpenAI.BadRequestError);
    }
  });
});
