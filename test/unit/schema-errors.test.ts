// The gateway's wording of request-schema failures: the errors fastify's validator (with the
// options app.ts gives it) finds in bodies against the real request schemas, read back as one
// sentence per failure.
import Fastify from "fastify";
import { afterAll, describe, expect, it } from "vitest";
import { describeSchemaErrors, type SchemaError } from "../../src/gateway/errors.ts";
import { ChatCompletionRequest, CompletionRequest } from "../../src/gateway/schemas.ts";

const app = Fastify({
  ajv: { customOptions: { coerceTypes: false, removeAdditional: false, allErrors: false } },
});
const seen: SchemaError[][] = [];
app.setErrorHandler((err: { validation?: SchemaError[] }, _req, reply) => {
  seen.push(err.validation ?? []);
  reply.status(400).send();
});
app.post("/chat", { schema: { body: ChatCompletionRequest } }, async () => "valid");
app.post("/completion", { schema: { body: CompletionRequest } }, async () => "valid");
afterAll(() => app.close());

const chat = "/chat";
const completion = "/completion";
const user = [{ role: "user", content: "hi" }];

async function errorsOf(url: string, body: unknown): Promise<SchemaError[]> {
  const r = await app.inject({ method: "POST", url, payload: body as object });
  expect(r.statusCode).toBe(400);
  return seen.pop()!;
}

describe("describeSchemaErrors", () => {
  it.each([
    // a nullable field: only the failure of its real branch
    ["n over its bound", chat, { model: "m", messages: user, n: 1000 }, "body/n must be <= 16"],
    [
      "a float max_tokens",
      chat,
      { model: "m", messages: user, max_tokens: 2.5 },
      "body/max_tokens must be integer",
    ],
    [
      "a string temperature",
      chat,
      { model: "m", messages: user, temperature: "NaN" },
      "body/temperature must be number",
    ],
    // the failure is inside the field: the null branch's failure on the field left out
    [
      "a logit bias over 100",
      chat,
      { model: "m", messages: user, logit_bias: { "5": 1000 } },
      "body/logit_bias/5 must be <= 100",
    ],
    // an unknown key named
    [
      "a logit bias key that is no token id",
      chat,
      { model: "m", messages: user, logit_bias: { abc: 1 } },
      "body/logit_bias must NOT have additional properties ('abc')",
    ],
    // a role's const failures as one list
    [
      "an unknown role",
      chat,
      { model: "m", messages: [{ role: "wizard", content: "x" }] },
      'body/messages/0/role must be one of "system", "developer", "user", "assistant", "tool"',
    ],
    // a union of non-null branches: each branch's failure, once
    [
      "five stop strings",
      chat,
      { model: "m", messages: user, stop: ["a", "b", "c", "d", "e"] },
      "body/stop must be string, body/stop must NOT have more than 4 items",
    ],
    ["a missing field", chat, { model: "m" }, "body must have required property 'messages'"],
    [
      "an empty prompt list",
      completion,
      { model: "m", prompt: [] },
      "body/prompt must be string, body/prompt must NOT have fewer than 1 items",
    ],
  ] as const)("%s", async (_what, url, body, expected) => {
    expect(describeSchemaErrors(await errorsOf(url, body))).toBe(expected);
  });

  it("keeps a null branch's failure where it is the only one at its place", () => {
    const only: SchemaError[] = [
      { keyword: "type", instancePath: "/x", params: { type: "null" }, message: "must be null" },
    ];
    expect(describeSchemaErrors(only)).toBe("body/x must be null");
  });

  it("says a single allowed value as it is", () => {
    const one: SchemaError[] = [
      { keyword: "const", instancePath: "/type", params: { allowedValue: "function" } },
    ];
    expect(describeSchemaErrors(one)).toBe('body/type must be "function"');
  });
});
