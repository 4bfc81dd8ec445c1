// Tiny-model forward on a device backend against the CPU backend, through the Node addon:
// the same prefill and decode steps (the seed-0 tiny checkpoints of the goldens, written
// here, so no weights travel) run once with configure({ device: "cpu" }) and once with
// configure({ device }), and every logit row is compared. Decode steps feed both runs the
// CPU run's greedy tokens, and the device run's MoE layers take the CPU run's expert choice
// (its own router runs and is compared), so a near-tie cannot make the two runs diverge.
//
//   node scripts/gpu-forward.ts [--device cuda:0] [--models tiny-v2,tiny-v3,tiny-v3-fp8]
//        [--decode 8] [--tolerance 5e-2] [--isa ISA] [--replay on|off] [--kv-dtype f32|bf16|fp8]
//        [--dtype auto|bf16|fp16|fp32|fp8] [--json FILE]
//
// --dtype serves the linear layers in that dtype (the loader converts them, in each run on
// its own configured device: bf16 of an fp8 checkpoint is a GPU gateway's way to dequantize
// once at load).
//
// Pass: for every model, max |device - cpu| / max |cpu| <= tolerance over the prefill rows
// and over each decode step, and the greedy (argmax) token of every row agrees, except
// where the CPU's top two logits are within tolerance * max |cpu| of each other (a tie at
// that precision), and at most 2 % of the router's decisions differ (another expert set;
// separately, a weight off by more than the tolerance). The default tolerance, 5e-2, is for
// bf16 weights: the CUDA backend runs bf16 GEMMs on tensor cores with the activations rounded to bf16 (the parity suite allows
// 2e-2 per GEMM; a forward chains a few dozen). The goldens (HF transformers in fp32) are
// shown beside it for both runs.
//
// Self-test without a GPU: --device cpu compares the CPU backend with itself, the compared
// run on --isa (default scalar) so two code paths meet; --device sim runs the addon's device
// paths (resident weights and the KV mirror, the addon's defaults; EM_ADDON_RESIDENT=0
// EM_ADDON_KV_MIRROR=0 for the GPU check's staged run) on the stand-in device, whose kernels are the CPU's: no difference at all. The addon is $EM_NATIVE_ADDON, else
// shards/build/expertmesh.node. Imports src/, test/support/golden.ts, Node builtins and the
// pure-JS packages scripts/gpu-bundle.sh carries (the GPU machine has no node_modules).
//
// Prints a Markdown report. Exit: 0 pass, 1 mismatch or error, 2 no CUDA device (or the
// addon was built without CUDA).
import { rmSync, writeFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { backendSummary } from "../src/cli/device.ts";
import type { Backend } from "../src/engine/backend.ts";
import { LocalExperts } from "../src/engine/experts.ts";
import type { KvDtype } from "../src/engine/kv-format.ts";
import { heldExperts, loadWeights } from "../src/engine/loader.ts";
import { DeepSeekForward, SequenceCache } from "../src/engine/model.ts";
import { loadAddon, type NativeInfo, nativeBackend } from "../src/engine/native.ts";
import { parseServeDtype } from "../src/engine/weight-dtype.ts";
import { Checkpoint } from "../src/model/checkpoint.ts";
import { readGolden, tinyCheckpointFor } from "../test/support/golden.ts";

type ModelName = "tiny-v2" | "tiny-v3" | "tiny-v3-fp8";
const MODELS: readonly ModelName[] = ["tiny-v2", "tiny-v3", "tiny-v3-fp8"];

const { values } = parseArgs({
  options: {
    device: { type: "string" },
    models: { type: "string" },
    decode: { type: "string" },
    tolerance: { type: "string" },
    replay: { type: "string" },
    isa: { type: "string" },
    "kv-dtype": { type: "string" },
    dtype: { type: "string" },
    json: { type: "string" },
  },
});
const device = values.device ?? process.env["EM_GPU_FORWARD_DEVICE"] ?? "cuda:0";
const models = (values.models?.split(",") ?? MODELS) as ModelName[];
for (const m of models)
  if (!MODELS.includes(m)) fatal(`unknown model '${m}' (${MODELS.join(", ")})`);
const decodeSteps = Number(values.decode ?? 8);
const tolerance = Number(values.tolerance ?? 5e-2);
// --replay off: the device run keeps its own routing (compared all the same).
const replay = (values.replay ?? "on") !== "off";
if (!Number.isInteger(decodeSteps) || decodeSteps < 0) fatal("--decode must be an integer >= 0");
if (!(tolerance > 0)) fatal("--tolerance must be > 0");
// The latent cache's row dtype in both runs (a paged pool the attention reads in place; the
// GPU check runs the device KV mirror over bf16 rows, as a gateway keeps them).
const kvDtype = (values["kv-dtype"] ?? "f32") as KvDtype;
if (!["f32", "bf16", "fp8"].includes(kvDtype)) fatal("--kv-dtype must be f32, bf16 or fp8");
const dtype = (() => {
  try {
    return parseServeDtype(values.dtype);
  } catch (e) {
    return fatal((e as Error).message);
  }
})();
// The compared run's CPU ISA: for a CPU self-test, the scalar kernels against the best ones.
const isa = values.isa ?? (device === "cpu" ? "scalar" : "auto");

function fatal(message: string): never {
  process.stdout.write(`\n- forward: ERROR: ${message}\n`);
  process.exit(1);
}

const out = (s = "") => process.stdout.write(`${s}\n`);
out(`## Tiny-model forward: ${device} vs the CPU backend (through the addon)`);
out();
const addon = loadAddon();

// No device: say so and exit 2 (never a pass). (sim, the stand-in device, is always there.)
if (device.startsWith("cuda")) {
  const st = addon.cudaStatus();
  if (!st.compiled || st.devices === 0) {
    out(`- forward: ERROR: NO CUDA DEVICE for --device ${device} (${st.status})`);
    process.exit(2);
  }
}

/**
 * Router decisions allowed to differ: 2 % (at least one). The device's router reads hidden
 * states that differ by bf16 rounding, so a near-tie at the top-k cut may flip; a router that
 * is wrong (the parity suite checks it op by op) differs far more often.
 */
const maxRoutingDiffer = (decisions: number) => Math.max(1, Math.floor(decisions * 0.02));

interface Trace {
  /** [T, vocab] prefill logits. */
  prefill: Float32Array;
  /** Decode steps' logits, [vocab] each. */
  steps: Float32Array[];
  /** Tokens fed to the decode steps. */
  fed: number[];
  ms: number;
  info: NativeInfo;
}

const argmax = (a: Float32Array): number => {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i]! > a[best]!) best = i;
  return best;
};
const maxAbs = (a: Float32Array): number => a.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
const relErr = (got: Float32Array, want: Float32Array): number => {
  let d = 0;
  for (let i = 0; i < want.length; i++) d = Math.max(d, Math.abs(got[i]! - want[i]!));
  return d / Math.max(maxAbs(want), 1e-30);
};

/**
 * The CPU run's routing, replayed in the device run. The device's router runs (and is
 * compared), but the forward goes on with the CPU's choice: an expert near the top-k cut
 * can swap places under bf16 rounding, which changes that token's output by a whole
 * expert's share, a real but discrete effect that would hide the numerics compared here.
 */
interface Routing {
  /** Every gate call's result in call order (the CPU run). */
  calls: { ids: Int32Array; weights: Float32Array; k: number }[];
  /** (token, layer) decisions whose expert set differs on the device. */
  sets: number;
  /** Decisions of the same set with a weight off by more than the tolerance x the largest. */
  weights: number;
  decisions: number;
}

function replayRouting(b: Backend, routing: Routing, record: boolean, replay: boolean): Backend {
  let call = 0;
  const gate: Backend["gate"] = (x, t, weight, bias, cfg) => {
    const got = b.gate(x, t, weight, bias, cfg);
    if (record) {
      routing.calls.push({
        ids: got.ids.slice(),
        weights: got.weights.slice(),
        k: got.ids.length / Math.max(t, 1),
      });
      return got;
    }
    const want = routing.calls[call++];
    if (!want || want.ids.length !== got.ids.length)
      throw new Error(`gate call ${call}: not the CPU run's shape`);
    for (let i = 0; i < t; i++) {
      // Another expert set, or the same set with a weight off by more than tolerance x the
      // largest (weights drift with the hidden states: the router reads bf16-rounded sums).
      const cpu = new Map<number, number>();
      for (let j = i * want.k; j < (i + 1) * want.k; j++) cpu.set(want.ids[j]!, want.weights[j]!);
      const scale = Math.max(...cpu.values(), 1e-30);
      let set = true;
      let weights = true;
      for (let j = i * want.k; j < (i + 1) * want.k; j++) {
        const w = cpu.get(got.ids[j]!);
        if (w === undefined) set = false;
        else if (Math.abs(w - got.weights[j]!) > tolerance * scale) weights = false;
      }
      routing.decisions++;
      if (!set) routing.sets++;
      else if (!weights) routing.weights++;
    }
    return replay ? { ids: want.ids.slice(), weights: want.weights.slice() } : got;
  };
  return new Proxy(b, {
    get: (target, key) => {
      if (key === "gate") return gate;
      const v = Reflect.get(target, key);
      return typeof v === "function" ? v.bind(target) : v;
    },
  });
}

/**
 * Prefill `prompt`, then decode: the given tokens, or (none given) greedy ones. The CPU run
 * records its routing into `routing`, the device run replays it.
 */
async function trace(
  dir: string,
  prompt: number[],
  configure: { device: string; isa: string },
  feed: number[] | null,
  routing: Routing,
): Promise<Trace> {
  const info = addon.configure(configure);
  const backend: Backend = replayRouting(nativeBackend(), routing, feed === null, replay);
  const weights = await loadWeights(await Checkpoint.open(dir), "all", undefined, { dtype });
  const model = new DeepSeekForward(
    weights,
    backend,
    new LocalExperts(backend, heldExperts(weights)),
  );
  const V = weights.config.vocabSize;
  const t0 = performance.now();
  const cache = new SequenceCache(weights.config, prompt.length + decodeSteps + 1, kvDtype);
  const prefill = await model.forward(prompt, cache);
  const steps: Float32Array[] = [];
  const fed: number[] = [];
  let last = prefill.subarray((prompt.length - 1) * V);
  for (let k = 0; k < decodeSteps; k++) {
    const token = feed ? feed[k]! : argmax(last);
    fed.push(token);
    last = await model.forward([token], cache);
    steps.push(last);
  }
  return { prefill, steps, fed, ms: performance.now() - t0, info };
}

interface Row {
  model: ModelName;
  prefillErr: number;
  /** Prefill position with the largest error, and the median row's error (same scale). */
  worstRow: number;
  medianRowErr: number;
  decodeErr: number;
  /** Router decisions (token x MoE layer) whose expert set / weights differ on the device. */
  routing: { sets: number; weights: number; decisions: number };
  greedy: { agree: number; rows: number; ties: number; mismatches: string[] };
  goldenCpu: number;
  goldenDevice: number;
  cpuMs: number;
  deviceMs: number;
  pass: boolean;
}

async function compare(name: ModelName): Promise<{ row: Row; info: NativeInfo }> {
  const golden = readGolden(name);
  const p = golden.prompts[1] ?? golden.prompts[0]!;
  const dir = await tinyCheckpointFor(name);
  try {
    const routing: Routing = { calls: [], sets: 0, weights: 0, decisions: 0 };
    const cpu = await trace(dir, p.token_ids, { device: "cpu", isa: "auto" }, null, routing);
    const dev = await trace(dir, p.token_ids, { device, isa }, cpu.fed, routing);
    const V = p.shape[1];
    // Every row: the prefill's T rows, then each decode step.
    const rows: [Float32Array, Float32Array, string][] = [];
    for (let t = 0; t < p.token_ids.length; t++)
      rows.push([
        cpu.prefill.subarray(t * V, (t + 1) * V),
        dev.prefill.subarray(t * V, (t + 1) * V),
        `prefill ${t}`,
      ]);
    for (const [k, s] of cpu.steps.entries()) rows.push([s, dev.steps[k]!, `decode ${k}`]);
    const greedy = { agree: 0, rows: rows.length, ties: 0, mismatches: [] as string[] };
    for (const [c, d, what] of rows) {
      const ct = argmax(c);
      const dt = argmax(d);
      if (ct === dt) greedy.agree++;
      else if (c[ct]! - c[dt]! <= tolerance * maxAbs(c)) greedy.ties++;
      else greedy.mismatches.push(`${what}: cpu ${ct}, ${device} ${dt}`);
    }
    const prefillErr = relErr(dev.prefill, cpu.prefill);
    // The row the prefill's error comes from (a stray row points at a routing or masking issue).
    const scale = Math.max(maxAbs(cpu.prefill), 1e-30);
    const rowErrs = rows
      .slice(0, p.token_ids.length)
      .map(([c, d]) => relErr(d, c) * (maxAbs(c) / scale));
    const worstRow = rowErrs.indexOf(Math.max(...rowErrs));
    const medianRowErr = [...rowErrs].sort((a, b) => a - b)[rowErrs.length >> 1] ?? 0;
    const decodeErr = Math.max(0, ...cpu.steps.map((s, k) => relErr(dev.steps[k]!, s)));
    const row: Row = {
      model: name,
      prefillErr,
      worstRow,
      medianRowErr,
      decodeErr,
      greedy,
      routing: { sets: routing.sets, weights: routing.weights, decisions: routing.decisions },
      goldenCpu: relErr(cpu.prefill, p.logits),
      goldenDevice: relErr(dev.prefill, p.logits),
      cpuMs: cpu.ms,
      deviceMs: dev.ms,
      pass:
        prefillErr <= tolerance &&
        decodeErr <= tolerance &&
        greedy.mismatches.length === 0 &&
        routing.sets <= maxRoutingDiffer(routing.decisions) &&
        routing.weights <= maxRoutingDiffer(routing.decisions),
    };
    return { row, info: dev.info };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// One model's failure (an op error on the device, say) is its row's result; the others run.
const results: Row[] = [];
const errors: { model: ModelName; message: string }[] = [];
let deviceInfo: NativeInfo | null = null;
for (const name of models) {
  try {
    const { row, info } = await compare(name);
    results.push(row);
    deviceInfo = info;
  } catch (e) {
    const code = (e as { code?: string }).code;
    errors.push({
      model: name,
      message: `${code ? `[${code}] ` : ""}${(e as Error).stack ?? String(e)}`,
    });
  } finally {
    addon.configure({ device: "cpu" });
  }
}

const pass = errors.length === 0 && results.every((r) => r.pass);
const e = (x: number) => x.toExponential(2);
out(
  `- forward: ${pass ? "PASS" : "FAIL"} (${device}${device === "cpu" ? ` isa ${isa}, a CPU self-test` : ""} vs the CPU backend${replay ? "" : ", own routing"}, ` +
    `${models.length} tiny models, prefill + ${decodeSteps} decode steps, ${kvDtype} KV rows, ${dtype === "auto" ? "" : `linear layers served in ${dtype}, `}tolerance ${e(tolerance)} x max|logit|)`,
);
out();
if (deviceInfo) out(`Device run: ${backendSummary(deviceInfo)}.`);
out(
  `Node ${process.version}; addon ${process.env["EM_NATIVE_ADDON"] ?? "shards/build/expertmesh.node"}.`,
);
out();
out(
  "| model | prefill rel err (worst row; median row) | decode rel err (max) | greedy agree | near-ties | routing differs (sets, weights) | golden rel err cpu / device | ms cpu / device | result |",
);
out("|---|---|---|---|---|---|---|---|---|");
for (const r of results)
  out(
    `| ${r.model} | ${e(r.prefillErr)} (row ${r.worstRow}; ${e(r.medianRowErr)}) | ${e(r.decodeErr)} | ` +
      `${r.greedy.agree}/${r.greedy.rows} | ${r.greedy.ties} | ${r.routing.sets}, ${r.routing.weights} of ${r.routing.decisions} | ` +
      `${e(r.goldenCpu)} / ${e(r.goldenDevice)} | ${r.cpuMs.toFixed(0)} / ${r.deviceMs.toFixed(0)} | ${r.pass ? "ok" : "FAIL"} |`,
  );
for (const r of results)
  for (const m of r.greedy.mismatches) out(`- ${r.model} greedy mismatch: ${m}`);
for (const { model, message } of errors) {
  out(`- ${model}: ERROR`);
  out();
  out("```");
  out(message);
  out("```");
}
out();
out(
  "rel err = max |device - cpu| / max |cpu| over the rows; decode steps are fed the CPU run's greedy tokens, " +
    "and every MoE layer the CPU run's expert choice (the device's router runs and is compared: " +
    "routing differs = token x layer decisions with another expert set, or the same set with a weight off by more than the tolerance; at most 2 % of each pass). " +
    "A greedy disagreement passes only as a near-tie (the CPU's top two within the tolerance).",
);
if (values.json)
  writeFileSync(
    values.json,
    `${JSON.stringify({ device, isa, tolerance, decodeSteps, kvDtype, pass, results, errors }, null, 2)}\n`,
  );
process.exit(pass ? 0 : 1);
