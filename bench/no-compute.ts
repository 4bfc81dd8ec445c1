// The dispatch benchmarks' expert FFN stand-in: it returns zeros, so that what is measured
// is transport and codec, not compute. The FFN's output array is the FFN's own cost (the
// kernels suite measures it), so the stand-in hands out views of one zero buffer (only ever
// read: the shard encodes its reply from it) instead of a fresh multi-MiB allocation per batch.
import type { Backend, MoeArgs } from "../src/engine/backend.ts";

let zeros = new Float32Array(0);

export const noComputeBackend = {
  name: "no-compute",
  moe: (a: MoeArgs) => {
    const n = a.numOut * a.dim;
    if (zeros.length < n) zeros = new Float32Array(n);
    return zeros.subarray(0, n);
  },
} as unknown as Backend;
