// Fill in the middle (`suffix` on /v1/completions, DeepSeek's FIM completions) with the
// official openai client: on a copy of the tiny V3 checkpoint whose tokenizer has DeepSeek's
// three FIM tokens (in place of three tool tokens this test never uses), the answer is the
// completion of `<｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>` written out by hand;
// on the plain checkpoint, whose tokenizer lacks them, the request is refused.
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { credentials, type ServiceError, status } from "@grpc/grpc-js";
import type OpenAI from "openai";
import type { APIError } from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startGrpcGateway } from "../../src/gateway/grpc.ts";
import { FIM_TOKENS } from "../../src/gateway/openai.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { GenerationClient } from "../support/grpc.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

let plainDir: string;
let fimDir: string;
let fim: TestGateway;
let plain: TestGateway;

beforeAll(async () => {
  plainDir = await tinyCheckpointFor("tiny-v3");
  fimDir = mkdtempSync(join(tmpdir(), "em-fim-"));
  cpSync(plainDir, fimDir, { recursive: true });
  const path = join(fimDir, "tokenizer.json");
  const tok = JSON.parse(readFileSync(path, "utf8"));
  // The last three added tokens (tool-output tokens) become the FIM tokens, ids unchanged.
  const renamed = tok.added_tokens.slice(-3);
  for (const [i, t] of renamed.entries()) {
    const content = Object.values(FIM_TOKENS)[i]!;
    delete tok.model.vocab[t.content];
    tok.model.vocab[content] = t.id;
    t.content = content;
  }
  writeFileSync(path, JSON.stringify(tok));
  fim = await startGateway(fimDir);
  plain = await startGateway(plainDir);
});
afterAll(async () => {
  await fim?.close();
  await plain?.close();
  if (fimDir) rmSync(fimDir, { recursive: true, force: true });
});

const prefix = "def add(a, b):\n";
const suffix = "\n    return c\n";
const body = { model: "tiny", max_tokens: 8, temperature: 0 };

async function refusal(gw: TestGateway, req: object): Promise<APIError> {
  const err = await gw.client.completions
    .create(req as OpenAI.CompletionCreateParamsNonStreaming)
    .then(
      () => null,
      (e: APIError) => e,
    );
  expect(err, JSON.stringify(req)).not.toBeNull();
  return err!;
}

describe("fill in the middle (suffix)", () => {
  it("completes prefix-hole-suffix as DeepSeek's FIM prompt written out", async () => {
    const t = fim.ctx.tokenizer;
    const hand = `${FIM_TOKENS.begin}${prefix}${FIM_TOKENS.hole}${suffix}${FIM_TOKENS.end}`;
    const want = await fim.client.completions.create({ ...body, prompt: hand });
    const got = await fim.client.completions.create({ ...body, prompt: prefix, suffix });
    expect(got.choices[0]!.text).toBe(want.choices[0]!.text);
    expect(got.usage!.prompt_tokens).toBe(want.usage!.prompt_tokens);
    // BOS, the three FIM tokens, the prefix and the suffix.
    expect(got.usage!.prompt_tokens).toBe(
      4 + t.encode(prefix, false).length + t.encode(suffix, false).length,
    );
    // Token ids as the prompt frame the same way (their own BOS, if any, is the frame's).
    for (const prompt of [t.encode(prefix, false), t.encode(prefix, true)]) {
      const ids = await fim.client.completions.create({ ...body, prompt, suffix });
      expect(ids.choices[0]!.text).toBe(want.choices[0]!.text);
      expect(ids.usage!.prompt_tokens).toBe(want.usage!.prompt_tokens);
    }
    // Streamed, the same middle.
    let text = "";
    for await (const chunk of await fim.client.completions.create({
      ...body,
      prompt: prefix,
      suffix,
      stream: true,
    }))
      for (const c of chunk.choices) text += c.text;
    expect(text).toBe(want.choices[0]!.text);
  });

  it("over gRPC: GenerateStream's suffix gives the same middle; without FIM tokens INVALID_ARGUMENT", async () => {
    const http = await fim.client.completions.create({ ...body, prompt: prefix, suffix });
    for (const [gw, ok] of [
      [fim, true],
      [plain, false],
    ] as const) {
      const g = await startGrpcGateway({ ctx: gw.ctx }, { port: 0, host: "127.0.0.1" });
      const client = new GenerationClient(`127.0.0.1:${g.port}`, credentials.createInsecure());
      try {
        const messages: { text: string }[] = [];
        const error = await new Promise<ServiceError | null>((resolve) => {
          const s = (client as any).GenerateStream({ ...body, prompt: prefix, suffix });
          s.on("data", (m: { text: string }) => messages.push(m));
          s.on("error", resolve);
          s.on("end", () => resolve(null));
        });
        if (ok) {
          expect(error).toBeNull();
          expect(messages.map((m) => m.text).join("")).toBe(http.choices[0]!.text);
        } else {
          expect(error?.code).toBe(status.INVALID_ARGUMENT);
          expect(error?.metadata.get("em-param")[0]).toBe("suffix");
        }
      } finally {
        client.close();
        await g.close();
      }
    }
  });

  it("refuses echo with a suffix, and a suffix that is not text", async () => {
    for (const req of [
      { ...body, prompt: prefix, suffix, echo: true },
      { ...body, prompt: prefix, suffix: 42 },
    ]) {
      const err = await refusal(fim, req);
      expect(err.status).toBe(400);
      expect((err.error as { param?: string }).param).toBe("suffix");
    }
  });

  it("a tokenizer without DeepSeek's FIM tokens: 400 naming them", async () => {
    const err = await refusal(plain, { ...body, prompt: prefix, suffix });
    expect(err.status).toBe(400);
    expect((err.error as { code?: string }).code).toBe("EM_GATEWAY_BAD_REQUEST");
    expect(err.message).toContain(FIM_TOKENS.begin);
    // No suffix (or an empty one): a plain completion.
    const a = await plain.client.completions.create({ ...body, prompt: prefix });
    const b = await plain.client.completions.create({ ...body, prompt: prefix, suffix: "" });
    expect(b.choices[0]!.text).toBe(a.choices[0]!.text);
  });
});
