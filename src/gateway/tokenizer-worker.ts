// A worker thread of the PromptEncoder: loads the model's tokenizer from its directory and
// encodes the prompts it is sent, so that a long prompt does not hold the gateway's event
// loop (every stream's tokens go out on it). Messages: see prompt-encoder.ts.
import { parentPort, workerData } from "node:worker_threads";
import { Tokenizer } from "../model/tokenizer.ts";
import { ExpertMeshError } from "../util/errors.ts";
import type { EncodeRequest, WorkerMessage } from "./prompt-encoder.ts";

const port = parentPort;
if (!port) throw new Error("tokenizer-worker.ts runs as a worker thread");
const post = (m: WorkerMessage, transfer: ArrayBuffer[] = []) => port.postMessage(m, transfer);

let tokenizer: Tokenizer | null = null;
try {
  tokenizer = Tokenizer.load((workerData as { dir: string }).dir);
  post({ kind: "ready", size: tokenizer.size, maxTokenBytes: tokenizer.maxTokenBytes });
} catch (err) {
  post({ kind: "failed", message: err instanceof Error ? err.message : String(err) });
}

if (tokenizer) {
  const tok = tokenizer;
  port.on("message", (m: EncodeRequest) => {
    try {
      const each = m.texts.map((t) => tok.encode(t, m.addSpecialTokens));
      const ids = new Uint32Array(each.reduce((n, e) => n + e.length, 0));
      let at = 0;
      for (const e of each) {
        ids.set(e, at);
        at += e.length;
      }
      const lengths = each.map((e) => e.length);
      post({ kind: "encoded", id: m.id, ids, lengths }, [ids.buffer]);
    } catch (err) {
      post({
        kind: "error",
        id: m.id,
        code: err instanceof ExpertMeshError ? err.code : null,
        message: err instanceof Error ? err.message : String(err),
      });
    }
  });
}
