// `expertmesh up -f MANIFEST`: runs a DeepSeekModel manifest on this machine as child
// processes, as the operator would run it on a cluster: prepareRun (src/local/prepare.ts)
// decides and writes what they need (checkpoint, plan, run folder, the -f files' Secrets),
// then LocalRun (src/local/run.ts) runs nats-server, the shards and the gateways until
// Ctrl-C. `up --watch` runs that `up` under a supervisor that watches the files and sends it
// the edits it can take (src/local/watch.ts; ADR 0041).
import { parseArgs } from "node:util";
import { localFiles, prepareRun, UP_OPTIONS } from "../../local/prepare.ts";
import { LocalRun } from "../../local/run.ts";
import { watchAndRun } from "../../local/watch.ts";
import type { Command } from "../registry.ts";

const USAGE = `expertmesh up -f MANIFEST.yaml [-f SECRETS.yaml ...] [options]
  -f FILE            the DeepSeekModel's manifest; more -f files (and other documents of the
                     manifest's) may hold the Secrets and ConfigMaps it names, read as the pods
                     would read them: spec.env's valueFrom, spec.gateway.apiKeySecret and
                     .tls (the gateways then serve https), and
                     spec.model.source.huggingFace.tokenSecret (what no file holds: this
                     shell's $NAME, $EM_API_KEYS, $HF_TOKEN stand in; no TLS)
  --model DIR        checkpoint folder (default: <models-dir>/<spec.model.source.pvc.path>; a
                     spec.model.source.huggingFace repository is fetched into <models-dir>/hf,
                     from $HF_ENDPOINT or the Hub, with $HF_TOKEN, and fetched once per commit)
  --models-dir DIR   where local mode finds PVC paths (default ~/.cache/expertmesh/models)
  --http-port PORT   the gateway's OpenAI API (default: spec.gateway.ports.http, 8000; 0 picks one)
  --grpc-port PORT   the gateway's gRPC API: KServe v2 and expertmesh.v1.Generation
                     (default: spec.gateway.ports.grpc, 8001; 0 picks one)
  --host ADDR        listen address (default 127.0.0.1)
  --micro-batches N  the gateway's micro-batches in flight per step, 1 or 2 (gateway --micro-batches)
  --single-process   one gateway process that runs the routed experts itself (gateway --local):
                     no nats-server and no shards. The fastest way on one machine (the shards'
                     processes add a NATS round trip per layer and share its cores), but
                     spec.experts (shards, replicas) is not exercised
  --device D         auto (default): the roles the manifest gives GPUs (spec.gateway.gpus,
                     spec.experts.gpusPerShard) run on this machine's CUDA devices (shard k on
                     cuda:k mod count, the gateway on cuda:0) when it has any, else on the CPU;
                     cuda: the same, and no CUDA device is an error; cpu: everything on the CPU
A process that dies while serving is started again (after 1, 2, 4, 8, 16 s; the 6th exit of one
process within 10 minutes stops everything), the gateway on the same ports.
With more than one gateway (spec.gateway.replicas, or autoscaling), or under --watch, up listens
on the ports and hands each connection to a serving gateway, as a Service. With spec.autoscaling.enabled (mode
operator), the operator's autoscaler scales the gateways and each shard by queue depth:
processes are started, or stopped after they finish their work. With
spec.experts.rebalance.enabled, a skewed expert load is re-planned and rolled out live
(docs/autoscaling.md).
  --watch            apply each edit of MANIFEST as kubectl apply would make the operator
                     roll it: an edit of the gateways' flags alone (spec.gateway's sampling,
                     limits, KV cache, parsers; spec.servedModelName) rolls the gateways, one
                     new gateway serving before an old one stops (up holds the ports, even for
                     one gateway), nats-server and the shards running on; an edit of
                     spec.gateway.replicas or spec.experts.replicas (without autoscaling)
                     starts or stops processes; any
                     other edit stops everything as on Ctrl-C, then the new manifest starts;
                     one that does not validate is reported and the running one left alone;
                     an edit that says the same (a comment) restarts nothing. The other -f
                     files are watched too: new API keys or a new certificate in their
                     Secrets reach the running gateways without a restart (as a mounted
                     Secret's update reaches a pod); a new spec.env value in any -f file
                     stops everything and starts it again with it (the operator rolls pods)
A tiny-v2/tiny-v3 preset whose folder does not exist yet is created (deterministic, seed 0).
While weights load, stderr shows a progress bar per process (plain lines when it is not a
terminal).`;

export const upCommand: Command = {
  name: "up",
  summary:
    "run a DeepSeekModel manifest on this machine: nats-server, shards and a gateway as local processes",
  usage: USAGE,
  async run(argv) {
    const { values } = parseArgs({ args: argv, options: UP_OPTIONS });
    const files = localFiles(values.file ?? []);
    if (values.watch) {
      return await watchAndRun({
        file: files.model,
        others: files.texts.map(([p]) => p).filter((p) => p !== files.model),
        upArgs: argv.filter((a) => a !== "--watch"),
        say: (line) => process.stderr.write(`[up] ${line}\n`),
      });
    }
    const prepared = await prepareRun(values, files);
    return await new LocalRun(prepared, {
      files: values.file ?? [],
      host: values.host ?? "127.0.0.1",
      microBatches: values["micro-batches"],
    }).run();
  },
};
