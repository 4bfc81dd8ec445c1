// A thinking budget (reasoning.ts ThinkingBudget): vLLM's thinking_token_budget on chat
// completions and Responses, Anthropic's thinking.budget_tokens. The tiny model never closes
// its thought by itself, so every answer here thinks until the budget: its first `budget`
// tokens are the unbudgeted answer's (greedy), then `</think>`'s tokens forced, then the
// answer; streamed the same; under a grammar (JSON) the answer follows it; an answer that
// does not think (V3.1 without `thinking`) is as without a budget.
import Anthropic from "@anthropic-ai/sdk";
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tinyCheckpointFor } from "../support/golden.ts";
import { refusalOf, startGateway, type TestGateway } from "./helpers.ts";

let r1: TestGateway;
let v31: TestGateway;
/** R1 with a default budget (--thinking-token-budget 3). */
let bounded: TestGateway;

beforeAll(async () => {
  const dir = await tinyCheckpointFor("tiny-v3");
  r1 = await startGateway(dir, { reasoningParser: "deepseek-r1" });
  v31 = await startGateway(dir, { reasoningParser: "deepseek-v3" });
  bounded = await startGateway(dir, { reasoningParser: "deepseek-r1", thinkingTokenBudget: 3 });
});
afterAll(async () => {
  await r1?.close();
  await v31?.close();
  await bounded?.close();
});

type Thinking = { content: string | null; reasoning_content?: string };
const body = {
  model: "tiny",
  messages: [{ role: "user" as const, content: "What is 2 + 2?" }],
  max_tokens: 24,
  temperature: 0,
  logprobs: true,
  return_tokens_as_token_ids: true,
};

/** A chat answer's token ids (return_tokens_as_token_ids: "token_id:N"). */
const idsOf = (r: OpenAI.ChatCompletion) =>
  r.choices[0]!.logprobs!.content!.map((t) => Number(t.token.split(":")[1]));

describe("thinking_token_budget", () => {
  it("the thought is cut after the budget: </think> forced, then the answer (streamed the same)", async () => {
    const c = r1.client;
    const close = r1.ctx.tokenizer.encode("</think>", false);
    const text = (ids: number[]) => r1.ctx.tokenizer.decode(ids, true);
    const free = idsOf(await c.chat.completions.create(body));
    // (this model never closes its thought: without a budget all 24 tokens are thinking)
    expect(free).toHaveLength(24);
    for (const budget of [4, 9, 0]) {
      const r = await c.chat.completions.create({
        ...body,
        thinking_token_budget: budget,
      } as OpenAI.ChatCompletionCreateParamsNonStreaming);
      const ids = idsOf(r);
      expect(ids.slice(0, budget)).toEqual(free.slice(0, budget));
      expect(ids.slice(budget, budget + close.length)).toEqual(close);
      const m = r.choices[0]!.message as unknown as Thinking;
      expect(m.reasoning_content).toBe(text(ids.slice(0, budget)));
      expect(m.content).toBe(text(ids.slice(budget + close.length)));
      expect(m.content!.length).toBeGreaterThan(0);
      expect(r.usage!.completion_tokens_details?.reasoning_tokens).toBe(
        r1.ctx.tokenizer.encode(m.reasoning_content!, false).length,
      );
      // Streamed: the same thought and answer.
      let thought = "";
      let content = "";
      for await (const chunk of await c.chat.completions.create({
        ...body,
        thinking_token_budget: budget,
        stream: true,
      } as OpenAI.ChatCompletionCreateParamsStreaming)) {
        const d = chunk.choices[0]?.delta as unknown as Thinking | undefined;
        thought += d?.reasoning_content ?? "";
        content += d?.content ?? "";
      }
      expect([thought, content]).toEqual([m.reasoning_content, m.content]);
    }
    // A budget the thought does not reach changes nothing.
    const roomy = await c.chat.completions.create({
      ...body,
      thinking_token_budget: 24,
    } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    expect(idsOf(roomy)).toEqual(free);
  });

  it("under a grammar: the answer after the cut thought is JSON", async () => {
    const r = await r1.client.chat.completions.create({
      ...body,
      max_tokens: 40,
      response_format: { type: "json_object" },
      thinking_token_budget: 3,
    } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    const m = r.choices[0]!.message as unknown as Thinking;
    const ids = idsOf(r);
    expect(m.reasoning_content).toBe(r1.ctx.tokenizer.decode(ids.slice(0, 3), true));
    expect(ids.slice(3, 10)).toEqual(r1.ctx.tokenizer.encode("</think>", false));
    expect(m.content!.trimStart().startsWith("{")).toBe(true);
  });

  it("V3.1's hybrid thinking: applied when the request thinks, else nothing to cut", async () => {
    const ask = (kwargs: object | null, budget: number | null) =>
      v31.client.chat.completions.create({
        ...body,
        ...(kwargs ? { chat_template_kwargs: kwargs } : {}),
        ...(budget !== null ? { thinking_token_budget: budget } : {}),
      } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    expect(idsOf(await ask(null, 2))).toEqual(idsOf(await ask(null, null)));
    const thinking = await ask({ thinking: true }, 2);
    const m = thinking.choices[0]!.message as unknown as Thinking;
    const ids = idsOf(thinking);
    expect(m.reasoning_content).toBe(v31.ctx.tokenizer.decode(ids.slice(0, 2), true));
    expect(ids.slice(2, 2 + 7)).toEqual(v31.ctx.tokenizer.encode("</think>", false));
  });

  it("on the Responses API, and as Anthropic's thinking.budget_tokens", async () => {
    // The chat request each stands for, with the same budget.
    const chat = (
      await r1.client.chat.completions.create({
        ...body,
        thinking_token_budget: 5,
      } as OpenAI.ChatCompletionCreateParamsNonStreaming)
    ).choices[0]!.message as unknown as Thinking;
    const r = await r1.client.responses.create({
      model: "tiny",
      input: "What is 2 + 2?",
      max_output_tokens: 24,
      temperature: 0,
      thinking_token_budget: 5,
    } as OpenAI.Responses.ResponseCreateParamsNonStreaming);
    const reasoning = r.output.find((i) => i.type === "reasoning") as
      | { content?: { text: string }[] }
      | undefined;
    const thought = reasoning?.content?.[0]?.text ?? "";
    expect(thought).toBe(chat.reasoning_content);
    expect(r.output_text).toBe(chat.content);

    const anthropic = new Anthropic({ apiKey: "none", baseURL: r1.url, maxRetries: 0 });
    const msg = await anthropic.messages.create({
      model: "tiny",
      max_tokens: 24,
      temperature: 0,
      thinking: { type: "enabled", budget_tokens: 5 },
      messages: [{ role: "user", content: "What is 2 + 2?" }],
    } as Anthropic.MessageCreateParamsNonStreaming);
    const blocks = msg.content.map((b) => b.type);
    expect(blocks).toEqual(["thinking", "text"]);
    // (thinking enabled also sets the template's `thinking` switch, as for V3.1)
    const switched = (
      await r1.client.chat.completions.create({
        ...body,
        chat_template_kwargs: { thinking: true },
        thinking_token_budget: 5,
      } as OpenAI.ChatCompletionCreateParamsNonStreaming)
    ).choices[0]!.message as unknown as Thinking;
    expect((msg.content[0] as { thinking: string }).thinking).toBe(switched.reasoning_content);
    expect((msg.content[1] as { text: string }).text).toBe(switched.content);
  });

  it("a gateway's default budget (--thinking-token-budget) bounds requests that set none; a request's own wins", async () => {
    const withBudget = async (g: TestGateway, budget: number | null) =>
      idsOf(
        await g.client.chat.completions.create({
          ...body,
          ...(budget !== null ? { thinking_token_budget: budget } : {}),
        } as OpenAI.ChatCompletionCreateParamsNonStreaming),
      );
    expect(await withBudget(bounded, null)).toEqual(await withBudget(r1, 3));
    expect(await withBudget(bounded, 6)).toEqual(await withBudget(r1, 6));
    expect(await withBudget(bounded, null)).not.toEqual(await withBudget(r1, null));
  });

  it("refuses a negative budget (400 naming the field)", async () => {
    expect(
      await refusalOf(
        r1.client.chat.completions.create({
          ...body,
          thinking_token_budget: -1,
        } as OpenAI.ChatCompletionCreateParamsNonStreaming),
      ),
    ).toMatchObject({ status: 400 });
    const anthropic = new Anthropic({ apiKey: "none", baseURL: r1.url, maxRetries: 0 });
    expect(
      await refusalOf(
        anthropic.messages.create({
          model: "tiny",
          max_tokens: 8,
          thinking: { type: "enabled", budget_tokens: 0 },
          messages: [{ role: "user", content: "x" }],
        }),
      ),
    ).toMatchObject({ status: 400 });
  });
});
