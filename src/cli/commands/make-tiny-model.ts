// `expertmesh make-tiny-model`: writes a deterministic random DeepSeek V2/V3 checkpoint in
// the Hugging Face layout (see docs/tiny-models.md), progress on stderr, a summary on stdout.
import { parseArgs } from "node:util";
import { formatBytes } from "../../local/progress.ts";
import {
  type TinyArch,
  type TinyModelSummary,
  type TinyPreset,
  writeTinyModel,
} from "../../model/tiny.ts";
import { ExpertMeshError } from "../../util/errors.ts";
import type { Command } from "../registry.ts";

const USAGE =
  "expertmesh make-tiny-model --arch v2|v3 --out DIR [--seed N] [--preset tiny|mini] [--fp8] [--mtp] [--shards N]\n\n" +
  "  --arch v2|v3         DeepseekV2ForCausalLM (tiny-v2) or DeepseekV3ForCausalLM (tiny-v3)\n" +
  "  --out DIR            output directory (created; old model*.safetensors in it are removed)\n" +
  "  --seed N             PRNG seed, an integer in [0, 2^32), default 0: same seed, same bytes\n" +
  "  --preset tiny|mini   tiny (default, for tests) or mini (about 1.1 GB in bf16, for benchmarks)\n" +
  "  --fp8                Linear weights as fp8 e4m3 with 128x128 weight_scale_inv blocks\n" +
  "  --mtp                one multi-token-prediction layer (v3), for --speculative-method mtp\n" +
  "  --shards N           split the weights into N files with model.safetensors.index.json";

export const makeTinyModelCommand: Command = {
  name: "make-tiny-model",
  summary: "write a deterministic random DeepSeek V2/V3 checkpoint (tests, benchmarks)",
  usage: USAGE,
  async run(argv) {
    const opts = parseOptions(argv);
    let lastPercent = -1;
    const summary = await writeTinyModel(opts.out, {
      arch: opts.arch,
      preset: opts.preset,
      seed: opts.seed,
      fp8: opts.fp8,
      mtp: opts.mtp,
      shards: opts.shards,
      onProgress: ({ bytesWritten, totalBytes, file }) => {
        // Large models report every 5%; tiny ones finish too fast to need it.
        if (totalBytes < 16 * MiB) return;
        const percent = Math.floor((bytesWritten / totalBytes) * 20) * 5;
        if (percent === lastPercent) return;
        lastPercent = percent;
        process.stderr.write(
          `make-tiny-model: ${String(percent).padStart(3)}% (${formatBytes(bytesWritten)} of ${formatBytes(totalBytes)}), writing ${file}\n`,
        );
      },
    });
    process.stdout.write(summaryText(summary, opts));
    return 0;
  },
};

const MiB = 1024 * 1024;

interface Options {
  arch: TinyArch;
  out: string;
  seed: number;
  preset: TinyPreset;
  fp8: boolean;
  mtp: boolean;
  shards: number;
}

function parseOptions(argv: string[]): Options {
  let values: Record<string, string | boolean | undefined>;
  try {
    values = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        arch: { type: "string" },
        out: { type: "string" },
        seed: { type: "string" },
        preset: { type: "string" },
        fp8: { type: "boolean" },
        mtp: { type: "boolean" },
        shards: { type: "string" },
      },
    }).values;
  } catch (err) {
    return usage(err instanceof Error ? err.message : String(err));
  }
  const arch = values["arch"];
  if (arch !== "v2" && arch !== "v3") usage("--arch must be v2 or v3");
  const out = values["out"];
  if (typeof out !== "string" || out === "") usage("--out DIR is required");
  const preset = values["preset"] ?? "tiny";
  if (preset !== "tiny" && preset !== "mini") usage("--preset must be tiny or mini");
  return {
    arch,
    out,
    preset,
    seed: intOption(values["seed"], "seed", 0, 2 ** 32 - 1) ?? 0,
    fp8: values["fp8"] === true,
    mtp: values["mtp"] === true,
    shards: intOption(values["shards"], "shards", 1, 99999) ?? 1,
  };
}

function intOption(
  v: string | boolean | undefined,
  name: string,
  min: number,
  max: number,
): number | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== "string" || !/^\d+$/.test(v) || Number(v) < min || Number(v) > max) {
    usage(`--${name} must be an integer in [${min}, ${max}], got '${v}'`);
  }
  return Number(v);
}

function usage(msg: string): never {
  throw new ExpertMeshError("EM_CLI_USAGE", `${msg}\nusage: ${USAGE.split("\n\n")[0]}`);
}

function summaryText(s: TinyModelSummary, opts: Options): string {
  const c = s.config;
  const lines = [
    `wrote ${c.architecture} (${opts.preset}, seed ${opts.seed}${opts.fp8 ? ", fp8 e4m3" : ""}${opts.mtp ? ", 1 MTP layer" : ""}) to ${s.dir}`,
    `  ${c.numHiddenLayers} layers (${c.firstKDenseReplace} dense), hidden ${c.hiddenSize}, ${c.nRoutedExperts} routed experts top-${c.numExpertsPerTok}, ${c.nSharedExperts} shared, vocab ${c.vocabSize}`,
    `  ${s.numTensors} tensors, ${formatBytes(s.tensorBytes)} of weights`,
    ...s.files.map((f) => `  ${f.name.padEnd(36)} ${formatBytes(f.bytes)}`),
  ];
  return `${lines.join("\n")}\n`;
}
