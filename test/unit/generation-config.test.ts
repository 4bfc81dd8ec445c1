// The sampling defaults a gateway reads from a model's generation_config.json (and
// --generation-config / --override-generation-config): which fields, their ranges, where
// the file comes from.
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import {
  describeSamplingDefaults,
  loadSamplingDefaults,
  parseGenerationConfigFlag,
  samplingDefaults,
} from "../../src/model/generation-config.ts";

const code = (f: () => unknown) => {
  try {
    f();
  } catch (e) {
    return `${(e as { code?: string }).code}: ${(e as Error).message}`;
  }
  return "no error";
};

describe("samplingDefaults", () => {
  const ok: [string, unknown, object][] = [
    // DeepSeek-V3's and R1's file.
    [
      "DeepSeek-V3's file: its sampling fields, token ids and flags ignored",
      {
        _from_model_config: true,
        bos_token_id: 0,
        eos_token_id: 1,
        do_sample: true,
        temperature: 0.6,
        top_p: 0.95,
        transformers_version: "4.46.3",
      },
      { temperature: 0.6, top_p: 0.95 },
    ],
    [
      "every field read",
      { temperature: 0, top_p: 1, top_k: 20, min_p: 0.05, repetition_penalty: 1.1 },
      { temperature: 0, top_p: 1, top_k: 20, min_p: 0.05, repetition_penalty: 1.1 },
    ],
    ["null fields are absent", { temperature: null, top_k: -1 }, { top_k: -1 }],
    ["max_new_tokens is not read", { max_new_tokens: 512 }, {}],
  ];
  it.each(ok)("%s", (_what, json, want) => {
    expect(samplingDefaults(json, "g.json")).toEqual(want);
  });

  const bad: [string, unknown, RegExp][] = [
    [
      "temperature past 2",
      { temperature: 2.5 },
      /g\.json: temperature must be in 0\.\.2, got 2\.5/,
    ],
    ["top_p 0", { top_p: 0 }, /top_p must be in \(0, 1\]/],
    ["top_k not an integer", { top_k: 1.5 }, /top_k must be an integer >= -1/],
    ["min_p past 1", { min_p: 2 }, /min_p must be in 0\.\.1/],
    [
      "repetition_penalty 0",
      { repetition_penalty: 0 },
      /repetition_penalty must be in 0\.01\.\.100/,
    ],
    [
      "a repetition_penalty that divides logits to infinity",
      { repetition_penalty: 1e-320 },
      /repetition_penalty must be in 0\.01\.\.100/,
    ],
    ["a string", { temperature: "0.6" }, /temperature must be in 0\.\.2, got "0\.6"/],
    ["not an object", [1], /g\.json: not a JSON object/],
  ];
  it.each(bad)("refuses %s", (_what, json, message) => {
    const got = code(() => samplingDefaults(json, "g.json"));
    expect(got).toMatch(/^EM_GENERATION_CONFIG_INVALID: /);
    expect(got).toMatch(message);
  });

  it("strict (an override) refuses fields it does not read", () => {
    expect(code(() => samplingDefaults({ max_new_tokens: 5 }, "o", true))).toMatch(
      /EM_GENERATION_CONFIG_INVALID: o: 'max_new_tokens' is not a sampling field read here/,
    );
  });
});

describe("loadSamplingDefaults", () => {
  const folder = (files: Record<string, string>) => {
    const dir = mkdtempSync(join(tmpdir(), "em-gencfg-"));
    for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
    return dir;
  };
  const model = folder({ "generation_config.json": '{"temperature": 0.6, "top_p": 0.95}' });
  const other = folder({ "generation_config.json": '{"top_k": 40}' });
  const bare = folder({});

  const table: [string, string, string | undefined, string | undefined, object, boolean][] = [
    [
      "auto: the model's file",
      model,
      undefined,
      undefined,
      { temperature: 0.6, top_p: 0.95 },
      true,
    ],
    ["auto without a file: none", bare, "auto", undefined, {}, false],
    ["none: none", model, "none", undefined, {}, false],
    ["vllm (vLLM's name for none)", model, "vllm", undefined, {}, false],
    ["a folder's file", model, other, undefined, { top_k: 40 }, true],
    [
      "an override over the file",
      model,
      undefined,
      '{"temperature": 0.3, "min_p": 0.1}',
      { temperature: 0.3, top_p: 0.95, min_p: 0.1 },
      true,
    ],
    ["an override alone", model, "none", '{"top_p": 0.5}', { top_p: 0.5 }, false],
  ];
  it.each(table)("%s", (_what, dir, flag, override, want, read) => {
    const got = loadSamplingDefaults(dir, parseGenerationConfigFlag(flag), override);
    expect(got.defaults).toEqual(want);
    expect(got.file).toBe(
      read ? join(flag && flag !== "auto" ? flag : dir, "generation_config.json") : null,
    );
  });

  it("refuses a folder without the file, a file that is not JSON, an override that is not", () => {
    expect(code(() => loadSamplingDefaults(model, parseGenerationConfigFlag(bare)))).toMatch(
      /^EM_GENERATION_CONFIG_INVALID: cannot read .*generation_config\.json/,
    );
    const broken = folder({ "generation_config.json": "{temperature" });
    expect(code(() => loadSamplingDefaults(broken, "auto"))).toMatch(
      /^EM_GENERATION_CONFIG_INVALID: .*generation_config\.json is not JSON/,
    );
    expect(code(() => loadSamplingDefaults(bare, "auto", "{"))).toMatch(
      /^EM_GENERATION_CONFIG_INVALID: --override-generation-config is not JSON/,
    );
    expect(code(() => parseGenerationConfigFlag(""))).toMatch(/^EM_CLI_USAGE/);
  });

  it("describes the defaults for the startup log", () => {
    expect(describeSamplingDefaults({ temperature: 0.6, top_p: 0.95 })).toBe(
      "temperature 0.6, top_p 0.95",
    );
    expect(describeSamplingDefaults({})).toBe("none");
  });
});
