import { parseArgs } from "node:util";
import { type ExpertRunner, LocalExperts } from "../../engine/experts.ts";
import { generate } from "../../engine/generate.ts";
import { parseKvCacheDtype } from "../../engine/kv-format.ts";
import { heldExperts, loadWeights } from "../../engine/loader.ts";
import { DeepSeekForward } from "../../engine/model.ts";
import { parseServeDtype } from "../../engine/weight-dtype.ts";
import { Checkpoint } from "../../model/checkpoint.ts";
import { MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY } from "../../model/generation-config.ts";
import { Tokenizer } from "../../model/tokenizer.ts";
import { RemoteExperts } from "../../moe/dispatcher.ts";
import { connectNats } from "../../moe/nats-connection.ts";
import { parsePlan } from "../../moe/plan-json.ts";
import { subjects } from "../../moe/subjects.ts";
import { ExpertMeshError } from "../../util/errors.ts";
import { selectBackend } from "../device.ts";
import {
  chatTemplateOption,
  defaultModelName,
  intFlag,
  NATS_AUTH_FLAGS,
  natsAuthFlags,
  natsAuthUsage,
  numberFlag as num,
  readOptionFile,
  subjectRef,
} from "../options.ts";
import type { Command } from "../registry.ts";

const USAGE = `expertmesh generate --model DIR --prompt TEXT [options]
  --max-tokens N        tokens to generate (default 32)
  --temperature T       0 = greedy (default 0)
  --top-k K, --top-p P  sampling filters (default off)
  --min-p P             keep tokens at least P times as likely as the most likely (default 0, off)
  --repetition-penalty R  divide (multiply, when negative) the logits of the prompt's and the
                        output's tokens by R (default 1, off)
  --seed S              sampling seed (default 0)
  --kv-cache-dtype D    float32 (default) | bfloat16 | fp8: how the KV cache stores rows
  --dtype DTYPE         the linear layers' weights: auto (the checkpoint's, default), bf16, fp16,
                        fp32 or fp8 (128x128 block-scaled e4m3), converted as they load
  --chat                wrap the prompt in the model's chat template
  --chat-template FILE|TEMPLATE  with --chat: this template instead of tokenizer_config.json's
  --backend NAME        native (default) | reference (slow TypeScript ops, for checking)
  --device DEV          native backend's device: cpu (default), cuda (= cuda:0) or cuda:N
                        (sim: a stand-in for a GPU, for tests; shards/README.md)
  --cpu-matmul fp32|bf16  how the CPU multiplies by bf16/fp8 weights: fp32 (default) or bf16
                        (activations rounded to bf16: AMX or AVX512_BF16 where the CPU has them)
  --batch-invariant     kernels that compute each token the same however the prompt is
                        chunked (see gateway --help; cpu only)
  --distributed         routed experts on shard processes over NATS (with --nats, --plan)
  --nats URL, --plan FILE, --namespace NS (default default), --model-name NAME (default: folder name)
  --wire bf16|fp8|f32   dispatch dtype on the wire (default bf16; f32 + f32 combine for exact checks)
${natsAuthUsage(22)}`;

export const generateCommand: Command = {
  name: "generate",
  summary:
    "generate text from a checkpoint in one process (prefill, then decode with the KV cache)",
  usage: USAGE,
  async run(argv) {
    const { values } = parseArgs({
      args: argv,
      options: {
        model: { type: "string" },
        prompt: { type: "string" },
        "max-tokens": { type: "string" },
        temperature: { type: "string" },
        "top-k": { type: "string" },
        "top-p": { type: "string" },
        "min-p": { type: "string" },
        "chat-template": { type: "string" },
        "repetition-penalty": { type: "string" },
        seed: { type: "string" },
        "kv-cache-dtype": { type: "string" },
        chat: { type: "boolean" },
        backend: { type: "string" },
        device: { type: "string" },
        "cpu-matmul": { type: "string" },
        "batch-invariant": { type: "boolean" },
        distributed: { type: "boolean" },
        nats: { type: "string" },
        ...NATS_AUTH_FLAGS,
        plan: { type: "string" },
        namespace: { type: "string" },
        "model-name": { type: "string" },
        wire: { type: "string" },
        dtype: { type: "string" },
      },
    });
    if (!values.model || values.prompt === undefined)
      throw new ExpertMeshError("EM_CLI_USAGE", "--model and --prompt are required");
    // The sampling flags before anything loads (ranges as the gateway's).
    const sampling = {
      maxTokens: intFlag(values["max-tokens"], "--max-tokens", 32, 1),
      temperature: num(values.temperature, "--temperature", 0),
      topK: intFlag(values["top-k"], "--top-k", 0, 0),
      topP: num(values["top-p"], "--top-p", 1),
      minP: num(values["min-p"], "--min-p", 0),
      repetitionPenalty: num(values["repetition-penalty"], "--repetition-penalty", 1),
      seed: intFlag(values.seed, "--seed", 0, 0),
      kvCacheDtype: parseKvCacheDtype(values["kv-cache-dtype"] ?? "float32"),
    };
    const dtype = parseServeDtype(values.dtype);
    if (!(sampling.topP > 0 && sampling.topP <= 1))
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `--top-p must be in (0, 1], got '${values["top-p"]}'`,
      );
    if (!(sampling.minP >= 0 && sampling.minP <= 1))
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `--min-p must be in [0, 1], got '${values["min-p"]}'`,
      );
    if (
      !(
        sampling.repetitionPenalty >= MIN_REPETITION_PENALTY &&
        sampling.repetitionPenalty <= MAX_REPETITION_PENALTY
      )
    )
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `--repetition-penalty must be in ${MIN_REPETITION_PENALTY}..${MAX_REPETITION_PENALTY}, got '${values["repetition-penalty"]}'`,
      );
    const selected = selectBackend(
      values.backend,
      values.device,
      values["cpu-matmul"],
      values["batch-invariant"] === true,
    );
    const backend = selected.backend;
    // Before the weights: a wrong --plan path or NATS file fails at once.
    const auth = natsAuthFlags(values);
    const plan =
      values.distributed && values.plan
        ? parsePlan(readOptionFile(values.plan, "--plan").toString("utf8"))
        : undefined;
    const t0 = performance.now();
    const ckpt = await Checkpoint.open(values.model);
    const tokenizer = Tokenizer.load(
      values.model,
      values["chat-template"] === undefined
        ? undefined
        : chatTemplateOption(values["chat-template"]),
    );
    const weights = await loadWeights(
      ckpt,
      "all",
      (done, total) => process.stderr.write(`\rloading weights: layer ${done}/${total}`),
      { dtype },
    );
    process.stderr.write(
      `\rloaded ${(ckpt.bytesRead / 2 ** 20).toFixed(1)} MiB of weights in ${((performance.now() - t0) / 1000).toFixed(1)} s (${selected.summary})\n`,
    );
    let experts: ExpertRunner = new LocalExperts(backend, heldExperts(weights));
    let close = async () => {};
    if (values.distributed) {
      if (!values.nats || !plan)
        throw new ExpertMeshError("EM_CLI_USAGE", "--distributed needs --nats and --plan");
      const wire = values.wire ?? "bf16";
      if (wire !== "bf16" && wire !== "fp8" && wire !== "f32")
        throw new ExpertMeshError("EM_CLI_USAGE", `--wire must be bf16, fp8 or f32, got '${wire}'`);
      const model = subjectRef(
        values.namespace ?? "default",
        values["model-name"] ?? defaultModelName(values.model),
      );
      const nc = await connectNats({
        url: values.nats,
        name: "expertmesh-generate",
        auth,
        inboxPrefix: subjects.inboxPrefix(model),
      });
      close = () => nc.drain();
      experts = new RemoteExperts({
        nc,
        // Shards of these weights only (ADR 0035).
        model: { ...model, weights: await ckpt.weightsDigest() },
        plan,
        dispatchDtype: wire,
        combineDtype: wire === "f32" ? "f32" : "bf16",
        batchInvariant: values["batch-invariant"] === true,
      });
    }
    const model = new DeepSeekForward(weights, backend, experts);
    const context = weights.config.maxPositionEmbeddings;
    const tooLong = (tokens: string) =>
      new ExpertMeshError(
        "EM_CLI_USAGE",
        `the prompt (${tokens} tokens) and --max-tokens ${sampling.maxTokens} do not fit the model's context of ${context} tokens (max_position_embeddings)`,
      );
    // Far too long is known from the size alone: encoding it would take long for nothing.
    const atLeast = tokenizer.minTokens(values.prompt);
    if (atLeast > 0 && atLeast + sampling.maxTokens > context) throw tooLong(`at least ${atLeast}`);
    const prompt = values.chat
      ? tokenizer.encodeChat([{ role: "user", content: values.prompt }], true)
      : tokenizer.encode(values.prompt);
    if (prompt.length + sampling.maxTokens > context) throw tooLong(String(prompt.length));
    const generated: number[] = [];
    let printed = 0;
    let result: Awaited<ReturnType<typeof generate>>;
    try {
      result = await generate(
        model,
        prompt,
        {
          ...sampling,
          stopTokens: tokenizer.eosTokenId === null ? [] : [tokenizer.eosTokenId],
        },
        (id) => {
          // Byte-level tokens may split a character: print what decodes completely so far.
          generated.push(id);
          const text = tokenizer.decode(generated, true);
          if (!text.endsWith("\uFFFD")) {
            process.stdout.write(text.slice(printed));
            printed = text.length;
          }
        },
      );
      process.stdout.write(`${tokenizer.decode(generated, true).slice(printed)}\n`);
    } finally {
      await close();
    }
    const { tokens, stats } = result;
    const decodeRate =
      stats.generatedTokens > 1 ? (stats.generatedTokens - 1) / (stats.decodeMs / 1000) : 0;
    process.stderr.write(
      `prompt ${stats.promptTokens} tokens in ${stats.prefillMs.toFixed(0)} ms (${((stats.promptTokens / stats.prefillMs) * 1000).toFixed(1)} tokens/s); ` +
        `generated ${tokens.length} tokens, decode ${decodeRate.toFixed(1)} tokens/s\n`,
    );
    return 0;
  },
};
