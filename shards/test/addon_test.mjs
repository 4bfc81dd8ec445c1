// Addon-level test: loads expertmesh.node and checks every exported function against a
// small plain-JS reference, the scalar and SIMD paths against each other, and the error
// codes. Run: node shards/test/addon_test.mjs [path/to/expertmesh.node]   (ctest runs it)
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const addonPath = process.argv[2] ?? path.join(here, "..", "build", "expertmesh.node");
const em = createRequire(import.meta.url)(addonPath);

let seed = 12345;
const rand = () => {
  seed = (seed * 1103515245 + 12345) % 2147483648;
  return seed / 2147483648;
};
const randArray = (n, lo = -1, hi = 1) =>
  Float32Array.from({ length: n }, () => lo + (hi - lo) * rand());
const toBf16 = (f) => {
  const u = new Uint32Array(new Float32Array([f]).buffer)[0];
  return u >>> 16; // truncation: the reference uses the stored value
};
const fromBf16 = (h) => new Float32Array(new Uint32Array([h << 16]).buffer)[0];
const close = (got, want, tol, what) => {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < got.length; i++) {
    const err = Math.abs(got[i] - want[i]);
    assert.ok(
      err <= tol * (1 + Math.abs(want[i])),
      `${what}[${i}]: got ${got[i]}, want ${want[i]}`,
    );
  }
};
const throwsCode = (fn, code) => assert.throws(fn, (e) => e.code === code, `expected ${code}`);

// backendInfo / configure
const info = em.backendInfo();
assert.equal(info.backend, "cpu");
assert.ok(info.availableIsas.includes(info.isa));
assert.deepEqual(info.ops.matmul, ["f32", "bf16", "f16", "fp8"]);
throwsCode(() => em.configure({ isa: "sse9" }), "EM_NATIVE_ARG");

// devices: "cpu"; malformed strings are EM_NATIVE_ARG; cuda without a CUDA build or device
// is EM_NATIVE_UNSUPPORTED (and leaves the backends as they were)
assert.equal(em.configure({ device: "cpu" }).device, "cpu");
assert.deepEqual(em.backendInfo().fallback, {});
for (const d of ["tpu", "cuda:x", "cuda:", ""])
  throwsCode(() => em.configure({ device: d }), "EM_NATIVE_ARG");
const cuda = em.cudaStatus();
assert.equal(cuda.compiled, info.cudaCompiled);
if (cuda.devices === 0) {
  throwsCode(() => em.configure({ device: "cuda:0" }), "EM_NATIVE_UNSUPPORTED");
  assert.equal(em.backendInfo().backend, "cpu");
} else {
  const ci = em.configure({ device: "cuda:0" });
  assert.equal(ci.backend, "cuda");
  assert.deepEqual(ci.fallback.sample, ["f32"]);
  em.configure({ device: "cpu" });
}
// the stand-in device "sim" (expertmesh/sim.h): the CUDA backend's op table, the CPU's kernels
{
  for (const d of ["sim:", "sim:0", "sim:-1", "simx"])
    throwsCode(() => em.configure({ device: d }), "EM_NATIVE_ARG");
  const si = em.configure({ device: "sim", resident: false, kvMirror: false });
  assert.equal(si.backend, "sim");
  assert.deepEqual(
    Object.keys(si.fallback).sort(),
    ["logprobs", "sample", "wireUnpack", "wirePack"].sort(),
  );
  assert.deepEqual(em.simStats(), {
    allocations: 0,
    bytes: 0,
    allocatedTotal: 0,
    copies: 0,
    rangeCopies: 0,
    ranges: 0,
    copiedBytes: 0,
  });
  throwsCode(() => em.configure({ resident: "yes" }), "EM_NATIVE_ARG");
  // resident weights: copied to the device once, then read there (the copy is what ops read)
  em.configure({ device: "sim", resident: true });
  const w = { dtype: "f32", shape: [3, 2], data: Float32Array.from([1, 2, 3, 4, 5, 6]) };
  const x = Float32Array.from([1, -1]);
  assert.deepEqual(Array.from(em.matmul(x, 1, w)), [-1, -1, -1]);
  assert.deepEqual(Array.from(em.matmul(x, 1, w)), [-1, -1, -1]);
  assert.equal(em.simStats().allocatedTotal, 1);
  assert.equal(em.simStats().copiedBytes, 24);
  // a device too small for the weight: staged per op, the same answer
  em.configure({ device: "sim:16", resident: true });
  const w2 = { dtype: "f32", shape: [3, 2], data: Float32Array.from([1, 2, 3, 4, 5, 6]) };
  assert.deepEqual(Array.from(em.matmul(x, 1, w2)), [-1, -1, -1]);
  assert.equal(em.simStats().allocations, 0);
  em.configure({ device: "cpu", resident: process.env.EM_ADDON_RESIDENT !== "0" });
  assert.equal(em.simStats(), null);
}
// The defaults at load (a fresh process): resident weights and the KV mirror on, each off
// with its variable set to "0" (what a fresh load decides, not what configure() keeps).
{
  const probe = `const em = require(${JSON.stringify(path.resolve(addonPath))});
    em.configure({ device: "sim" });
    const w = { dtype: "f32", shape: [3, 2], data: Float32Array.from([1, 2, 3, 4, 5, 6]) };
    em.matmul(Float32Array.from([1, -1]), 1, w);
    process.stdout.write(String(em.simStats().allocatedTotal));`;
  const env = { ...process.env };
  delete env.EM_ADDON_RESIDENT;
  delete env.EM_ADDON_KV_MIRROR;
  const run = (extra) =>
    execFileSync(process.execPath, ["-e", probe], { env: { ...env, ...extra }, encoding: "utf8" });
  assert.equal(run({}), "1", "resident weights by default");
  assert.equal(run({ EM_ADDON_RESIDENT: "0" }), "0", "EM_ADDON_RESIDENT=0 stages weights per op");
  assert.equal(run({ EM_ADDON_RESIDENT: "1" }), "1", "EM_ADDON_RESIDENT=1");
}

// matmul with bf16 weights, on every ISA: y = x W^T
const M = 5,
  N = 19,
  K = 70;
const x = randArray(M * K);
const wBits = Uint16Array.from({ length: N * K }, () => toBf16(rand() * 2 - 1));
const w = { dtype: "bf16", shape: [N, K], data: wBits };
const yRef = new Float64Array(M * N);
for (let m = 0; m < M; m++)
  for (let n = 0; n < N; n++) {
    let acc = 0;
    for (let k = 0; k < K; k++) acc += x[m * K + k] * fromBf16(wBits[n * K + k]);
    yRef[m * N + n] = acc;
  }
for (const isa of info.availableIsas) {
  em.configure({ isa, threads: 2 });
  // avx512bf16 and amx round x to bf16 (bf16 weights), the others multiply in fp32.
  const roundsX = isa === "avx512bf16" || isa === "amx";
  close(em.matmul(x, M, w), yRef, roundsX ? 1e-2 : 1e-5, `matmul ${isa}`);
}
em.configure({});
const out = new Float32Array(M * N);
assert.equal(em.matmul(x, M, w, out), out);
throwsCode(() => em.matmul(x.subarray(1), M, w), "EM_NATIVE_SHAPE");
throwsCode(
  () => em.matmul(x, M, { dtype: "bf16", shape: [N, K], data: wBits.subarray(1) }),
  "EM_NATIVE_SHAPE",
);
throwsCode(() => em.matmul(x, M, { dtype: "q4", shape: [N, K], data: wBits }), "EM_NATIVE_DTYPE");
throwsCode(() => em.matmul([1, 2], 1, w), "EM_NATIVE_ARG");
throwsCode(
  () => em.matmul(x, M, { dtype: "fp8", shape: [N, K], data: new Uint8Array(N * K) }),
  "EM_NATIVE_ARG",
);

// rmsnorm
const D = 33;
const xn = randArray(3 * D, -2, 2),
  gw = randArray(D, 0.5, 1.5);
const rn = new Float64Array(3 * D);
for (let r = 0; r < 3; r++) {
  let ss = 0;
  for (let c = 0; c < D; c++) ss += xn[r * D + c] ** 2;
  const inv = 1 / Math.sqrt(ss / D + 1e-6);
  for (let c = 0; c < D; c++) rn[r * D + c] = xn[r * D + c] * inv * gw[c];
}
close(em.rmsnorm(xn, gw, 1e-6), rn, 1e-5, "rmsnorm");
throwsCode(() => em.rmsnorm(xn.subarray(1), gw, 1e-6), "EM_NATIVE_SHAPE");

// siluMul (long enough for the 4096-wide split plus a remainder)
const g = randArray(9000, -8, 8),
  u = randArray(9000);
close(
  em.siluMul(g, u),
  Float64Array.from(g, (v, i) => (v / (1 + Math.exp(-v))) * u[i]),
  1e-5,
  "siluMul",
);

// moeFfn: two f32 experts, rows scattered into 2 outputs with weights
const dim = 8,
  inter = 6;
const mk = (r, c) => ({ dtype: "f32", shape: [r, c], data: randArray(r * c, -0.5, 0.5) });
const experts = [0, 1].map(() => ({ w1: mk(inter, dim), w2: mk(dim, inter), w3: mk(inter, dim) }));
const xm = randArray(3 * dim);
const offsets = Int32Array.from([0, 2, 3]);
const rowWeights = Float32Array.from([0.5, 0.25, 1.0]);
const outIndex = Int32Array.from([1, 0, 1]);
const ffn = (e, row) => {
  const h = new Float64Array(inter);
  for (let i = 0; i < inter; i++) {
    let a = 0,
      b = 0;
    for (let d = 0; d < dim; d++) {
      a += row[d] * e.w1.data[i * dim + d];
      b += row[d] * e.w3.data[i * dim + d];
    }
    h[i] = (a / (1 + Math.exp(-a))) * b;
  }
  return Float64Array.from({ length: dim }, (_, d) =>
    h.reduce((s, v, i) => s + v * e.w2.data[d * inter + i], 0),
  );
};
const moeRef = new Float64Array(2 * dim);
for (let r = 0; r < 3; r++) {
  const y = ffn(experts[r < 2 ? 0 : 1], xm.subarray(r * dim, (r + 1) * dim));
  for (let d = 0; d < dim; d++) moeRef[outIndex[r] * dim + d] += rowWeights[r] * y[d];
}
const moeOut = em.moeFfn({
  x: xm,
  dim,
  expertOffsets: offsets,
  w1: experts.map((e) => e.w1),
  w2: experts.map((e) => e.w2),
  w3: experts.map((e) => e.w3),
  rowWeights,
  outIndex,
  outRows: 2,
});
close(moeOut, moeRef, 1e-5, "moeFfn");
throwsCode(
  () => em.moeFfn({ x: xm, dim, expertOffsets: offsets, w1: [], w2: [], w3: [] }),
  "EM_NATIVE_SHAPE",
);

// rope on the rope part of q [T, H, 3 + 4]: plain RoPE (factor 1), interleaved pairs
const T = 3,
  H = 2,
  ropeDim = 4,
  headDim = 7,
  offset = 3;
const q = randArray(T * H * headDim),
  q0 = q.slice();
const positions = Int32Array.from([0, 5, 77]);
em.rope(q, positions, { ropeDim, theta: 10000, headDim, offset });
const inv = em.ropeInvFreq({ ropeDim, theta: 10000 });
close(inv, [1, 1 / 100], 1e-7, "ropeInvFreq");
for (let t = 0; t < T; t++)
  for (let h = 0; h < H; h++) {
    const base = (t * H + h) * headDim;
    for (let i = 0; i < offset; i++) assert.equal(q[base + i], q0[base + i]);
    for (let i = 0; i < ropeDim / 2; i++) {
      const a = Math.fround(positions[t] * inv[i]);
      const re = q0[base + offset + 2 * i],
        im = q0[base + offset + 2 * i + 1];
      close(
        [q[base + offset + 2 * i], q[base + offset + 2 * i + 1]],
        [re * Math.cos(a) - im * Math.sin(a), re * Math.sin(a) + im * Math.cos(a)],
        1e-6,
        "rope",
      );
    }
  }

// mlaAttention (decode of one token over a 4-row f32 cache) vs naive MLA
{
  const Hh = 2,
    dn = 4,
    dr = 2,
    dv = 3,
    C = 5,
    S = 4;
  const wkvB = { dtype: "f32", shape: [Hh * (dn + dv), C], data: randArray(Hh * (dn + dv) * C) };
  const cache = randArray(S * (C + dr));
  const qq = randArray(Hh * (dn + dr));
  const scale = em.mlaSoftmaxScale(dn + dr, 1, 1);
  assert.ok(Math.abs(scale - 1 / Math.sqrt(dn + dr)) < 1e-12);
  const W = (r, c) => wkvB.data[r * C + c];
  const want = new Float64Array(Hh * dv);
  for (let h = 0; h < Hh; h++) {
    const s = [];
    for (let j = 0; j < S; j++) {
      let acc = 0;
      for (let i = 0; i < dn; i++) {
        let k = 0;
        for (let c = 0; c < C; c++) k += W(h * (dn + dv) + i, c) * cache[j * (C + dr) + c];
        acc += qq[h * (dn + dr) + i] * k;
      }
      for (let i = 0; i < dr; i++) acc += qq[h * (dn + dr) + dn + i] * cache[j * (C + dr) + C + i];
      s.push(acc * scale);
    }
    const mx = Math.max(...s);
    const p = s.map((v) => Math.exp(v - mx));
    const z = p.reduce((a, b) => a + b);
    for (let d = 0; d < dv; d++)
      for (let j = 0; j < S; j++) {
        let v = 0;
        for (let c = 0; c < C; c++) v += W(h * (dn + dv) + dn + d, c) * cache[j * (C + dr) + c];
        want[h * dv + d] += (p[j] / z) * v;
      }
  }
  const got = em.mlaAttention({
    q: qq,
    positions: Int32Array.from([S - 1]),
    caches: [cache],
    numHeads: Hh,
    qkNopeHeadDim: dn,
    qkRopeHeadDim: dr,
    vHeadDim: dv,
    kvLoraRank: C,
    wkvB,
    softmaxScale: scale,
  });
  close(got, want, 1e-5, "mlaAttention");
  throwsCode(
    () =>
      em.mlaAttention({
        q: qq,
        positions: Int32Array.from([S]),
        caches: cache,
        numHeads: Hh,
        qkNopeHeadDim: dn,
        qkRopeHeadDim: dr,
        vHeadDim: dv,
        kvLoraRank: C,
        wkvB,
        softmaxScale: scale,
      }),
    "EM_NATIVE_ARG",
  );
}

// kvWrite: encoded rows copied into a paged pool are what attention then reads, on every
// device. With a device's KV mirror (the default; EM_ADDON_KV_MIRROR=0 or configure({
// kvMirror: false }) turns it off) the mirror is made at the first read and the rows written
// after it reach it: on "sim" always (its device memory starts as NaN, and stale rows change
// the answer), on CUDA unless gpu-check runs this test with EM_ADDON_KV_MIRROR=0.
{
  const C = 8,
    dr = 4,
    Hh = 2,
    dn = 4,
    dv = 3,
    B = 4,
    nb = 3;
  const rb = em.kvRowBytes("bf16", C, dr);
  const pool = new Uint8Array(nb * B * rb);
  em.kvEncode("bf16", C, dr, randArray(nb * B * (C + dr)), pool, 0);
  const wkvB = { dtype: "f32", shape: [Hh * (dn + dv), C], data: randArray(Hh * (dn + dv) * C) };
  const q = randArray(Hh * (dn + dr));
  const attend = (rows) =>
    em.mlaAttention({
      q,
      positions: Int32Array.from([nb * B - 1]),
      pages: {
        pool: rows,
        dtype: "bf16",
        blockSize: B,
        table: Int32Array.from([0, 1, 2]),
        tableOffsets: Int32Array.from([0, 3]),
      },
      numHeads: Hh,
      qkNopeHeadDim: dn,
      qkRopeHeadDim: dr,
      vHeadDim: dv,
      kvLoraRank: C,
      wkvB,
      softmaxScale: em.mlaSoftmaxScale(dn + dr, 1, 1),
    });
  const rows = new Uint8Array(B * rb);
  em.kvEncode("bf16", C, dr, randArray(B * (C + dr), -3, 3), rows, 0);
  const written = pool.slice();
  written.set(rows, B * rb); // block 1
  em.configure({ device: "cpu" });
  const want = [attend(pool.slice()), attend(written)];
  assert.ok(
    want[1].some((v, i) => Math.abs(v - want[0][i]) > 1e-3),
    "kvWrite: the new rows change attention",
  );
  const mirrored = process.env.EM_ADDON_KV_MIRROR !== "0";
  const devices = [["sim", true], ...(cuda.devices > 0 ? [["cuda:0", mirrored]] : [])];
  for (const [device, kvMirror] of devices) {
    const pages = pool.slice();
    // resident weights off: wkv_b would take a device allocation of its own
    em.configure({ device, kvMirror, resident: false });
    const before = attend(pages); // the mirror is made here
    em.kvWrite(rows, pages, B * rb);
    assert.deepEqual(pages, written);
    const after = attend(pages); // and brought up to date here
    if (device === "sim") {
      // the same kernels on the same bytes: exactly the CPU's
      assert.deepEqual(before, want[0], "kvWrite: sim before the write");
      assert.deepEqual(after, want[1], "kvWrite: sim after the write");
      const st = em.simStats();
      assert.equal(st.allocations, 1, "sim: one mirror");
      assert.equal(st.rangeCopies, 1, "sim: the written rows went across in one range copy");
      assert.equal(st.copiedBytes, pool.length + rows.length);
    } else {
      close(before, want[0], 5e-2, `kvWrite: ${device} before the write`);
      close(after, want[1], 5e-2, `kvWrite: ${device} after the write`);
    }
  }
  // A pool written behind the addon's back (not through kvWrite or kvEncode) is not seen by
  // the mirror: the rule the engine keeps (src/engine/kv-format.ts writeKvBytes).
  {
    const pages = pool.slice();
    em.configure({ device: "sim", kvMirror: true });
    attend(pages);
    pages.set(rows, B * rb);
    assert.deepEqual(attend(pages), want[0], "sim: the mirror keeps the rows it was given");
  }
  em.configure({
    device: "cpu",
    kvMirror: mirrored,
    resident: process.env.EM_ADDON_RESIDENT !== "0",
  });
  throwsCode(() => em.kvWrite(rows, pool, pool.length - rows.length + 1), "EM_NATIVE_SHAPE");
}

// gate: softmax greedy top-2 of 4 experts, renormalized and scaled
{
  const gwt = {
    dtype: "f32",
    shape: [4, 3],
    data: Float32Array.from([1, 0, 0, 0, 1, 0, 0, 0, 1, 0.5, 0.5, 0]),
  };
  const r = em.gate({
    x: Float32Array.from([0.1, 2, 1]),
    weight: gwt,
    scoreFunc: "softmax",
    topkMethod: "greedy",
    topK: 2,
    normTopkProb: true,
    routedScalingFactor: 2,
  });
  assert.deepEqual(Array.from(r.indices), [1, 3]); // logits 0.1, 2, 1, 1.05
  const e1 = Math.exp(2),
    e2 = Math.exp(1.05);
  close(r.weights, [(2 * e1) / (e1 + e2), (2 * e2) / (e1 + e2)], 1e-6, "gate weights");
  throwsCode(
    () =>
      em.gate({
        x: Float32Array.from([1, 2, 3]),
        weight: gwt,
        scoreFunc: "relu",
        topkMethod: "greedy",
        topK: 2,
      }),
    "EM_NATIVE_ARG",
  );
}

// convert: fp8 with a block scale -> f32; f32 -> bf16
{
  const fp8 = Uint8Array.from([0x38, 0xb8, 0x40, 0x01]); // 1, -1, 2, 2^-9
  const f = em.convert(
    { dtype: "fp8", shape: [1, 4], data: fp8, scale: Float32Array.from([0.5]) },
    "f32",
  );
  close(f, [0.5, -0.5, 1, 2 ** -10], 0, "fp8 dequant");
  const b = em.convert({ dtype: "f32", shape: [2], data: Float32Array.from([1, -2]) }, "bf16");
  assert.deepEqual(Array.from(b), [0x3f80, 0xc000]);
}

// sample: greedy rows and a sampled row
{
  const logits = Float32Array.from([0, 3, 1, 2, 9, 0, -1, 0, 1]);
  assert.deepEqual(Array.from(em.sample(logits, 3, { temperature: 0 })), [1, 1, 2]);
  const t = em.sample(logits, 3, {
    temperature: Float32Array.from([0, 1, 1]),
    topK: 1,
    uniform: 0.5,
  });
  assert.deepEqual(Array.from(t), [1, 1, 2]);
  throwsCode(() => em.sample(logits, 3, { temperature: 1 }), "EM_NATIVE_ARG"); // no uniform
  throwsCode(() => em.sample(logits, 4, {}), "EM_NATIVE_SHAPE");
}

console.log(`addon: ok (${addonPath}, ${info.isa}, ${info.threads} threads)`);
