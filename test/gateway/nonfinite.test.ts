// A checkpoint whose numbers overflow: the tiny V3 with its final norm's weights set to
// +Infinity, so every logit is NaN or infinite. Served, each request ends with
// EM_ENGINE_NONFINITE instead of a token picked at random, and the gateway goes on serving;
// `generate` stops with the same code. (A real broken checkpoint, not an injected fault:
// the numbers go through the whole native forward.)
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import OpenAI, { type APIError } from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { generate } from "../../src/engine/generate.ts";
import { nativeBackend } from "../../src/engine/native.ts";
import { localModel, tinyCheckpointFor } from "../support/golden.ts";
import { startGateway, type TestGateway } from "./helpers.ts";

/** Sets every element of `name` in `dir`'s model.safetensors to `value` (F32 or BF16). */
function overwriteTensor(dir: string, name: string, value: number): void {
  const file = join(dir, "model.safetensors");
  const buf = readFileSync(file);
  const headerLen = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + headerLen).toString()) as Record<
    string,
    { dtype: string; data_offsets: [number, number] }
  >;
  const t = header[name];
  if (!t) throw new Error(`${name} is not in ${file}`);
  const [from, to] = t.data_offsets.map((o) => 8 + headerLen + o) as [number, number];
  const f32 = Buffer.alloc(4);
  f32.writeFloatLE(value);
  const bytes = t.dtype === "F32" ? f32 : f32.subarray(2, 4);
  for (let o = from; o < to; o += bytes.length) bytes.copy(buf, o);
  writeFileSync(file, buf);
}

let dir: string;
let gw: TestGateway;
beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  overwriteTensor(dir, "model.norm.weight", Number.POSITIVE_INFINITY);
  gw = await startGateway(dir);
});
afterAll(async () => {
  await gw?.close();
});

describe("a checkpoint whose numbers overflow", () => {
  it("ends each request with EM_ENGINE_NONFINITE (500), streamed or not, and goes on serving", async () => {
    for (const temperature of [0, 1]) {
      const e = await gw.client.chat.completions
        .create({
          model: "tiny",
          messages: [{ role: "user", content: "Hello" }],
          max_tokens: 4,
          temperature,
        })
        .catch((err: APIError) => err);
      expect(e, `temperature ${temperature}`).toBeInstanceOf(OpenAI.InternalServerError);
      expect((e as APIError).code).toBe("EM_ENGINE_NONFINITE");
      expect((e as APIError).message).toMatch(/logits at output position 0 hold NaN or infinity/);
    }
    const stream = await gw.client.completions.create({
      model: "tiny",
      prompt: "Hello",
      max_tokens: 4,
      stream: true,
    });
    const streamed: string[] = [];
    const err = await (async () => {
      for await (const chunk of stream) streamed.push(chunk.choices[0]?.text ?? "");
    })().catch((e: Error) => e);
    expect(streamed.join("")).toBe("");
    expect((err as Error).message).toMatch(/hold NaN or infinity/);
    // The process and its engine are fine: the next request gets the same clear answer.
    expect((await gw.client.models.list()).data.map((m) => m.id)).toEqual(["tiny"]);
    const again = await gw.client.completions
      .create({ model: "tiny", prompt: "Hi", max_tokens: 2 })
      .catch((e: APIError) => e);
    expect((again as APIError).code).toBe("EM_ENGINE_NONFINITE");
  });

  it("stops `generate` with the same code", async () => {
    const { model } = await localModel(dir, nativeBackend());
    await expect(generate(model, [1, 2, 3], { maxTokens: 4 })).rejects.toMatchObject({
      code: "EM_ENGINE_NONFINITE",
    });
  });
});
