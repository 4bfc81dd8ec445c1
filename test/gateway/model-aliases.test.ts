// --served-model-alias (spec.gateway.modelAliases): other names the model answers to, for
// clients that ask for a name of their own (Claude Code's background work asks for a Haiku
// model by name). Through the official openai and @anthropic-ai/sdk clients and KServe v2
// REST, against a gateway on the tiny V3 checkpoint started in this process.
import Anthropic from "@anthropic-ai/sdk";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { tinyCheckpointFor } from "../support/golden.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

let gw: TestGateway;

beforeAll(async () => {
  gw = await startGateway(await tinyCheckpointFor("tiny-v3"), {
    modelAliases: ["claude-haiku-5-5", "gpt-x"],
  });
});
afterAll(async () => {
  await gw?.close();
});

describe("model aliases", () => {
  it("an alias is answered as the served model: the same tokens, the served name in the answer", async () => {
    const ask = (model: string) =>
      gw.client.chat.completions.create({
        model,
        messages: [{ role: "user", content: "Hello" }],
        max_tokens: 6,
        temperature: 0,
      });
    const [byName, byAlias] = [await ask("tiny"), await ask("gpt-x")];
    expect(byAlias.model).toBe("tiny");
    expect(byAlias.choices[0]!.message.content).toBe(byName.choices[0]!.message.content);
    const anthropic = new Anthropic({ apiKey: "none", baseURL: gw.url, maxRetries: 0 });
    const m = await anthropic.messages.create({
      model: "claude-haiku-5-5",
      messages: [{ role: "user", content: "Hello" }],
      max_tokens: 4,
    });
    expect(m.model).toBe("tiny");
    const r = await fetch(`${gw.url}/v2/models/gpt-x/ready`);
    expect(r.status).toBe(200);
  });

  it("/v1/models lists each name, retrieve finds an alias; another name is refused naming them all", async () => {
    const page = await gw.client.models.list();
    expect(page.data.map((x) => x.id)).toEqual(["tiny", "claude-haiku-5-5", "gpt-x"]);
    expect((await gw.client.models.retrieve("gpt-x")).id).toBe("gpt-x");
    const err = await gw.client.chat.completions
      .create({ model: "other", messages: [{ role: "user", content: "hi" }], max_tokens: 1 })
      .then(
        () => expect.unreachable("another model's name"),
        (e: unknown) => e as InstanceType<typeof OpenAI.APIError>,
      );
    expect(err).toBeInstanceOf(OpenAI.NotFoundError);
    expect(err.message).toContain("'tiny' (also as 'claude-haiku-5-5', 'gpt-x')");
  });
});
