# Host simulation of mla_wgmma_kernel (cuda/attention.cu, $EM_CUDA_MLA=wgmma) for one block:
# shared memory as bytes in the layouts the kernel writes (cm_offset, load_tile's chunk
# order), the wgmma operands read back through the descriptors the kernel builds (start,
# LBO, SBO) under the documented no-swizzle interpretation (cuda/wgmma.cuh), and the
# kernel's two-warpgroup softmax exchange and epilogue, against a float64 MLA reference.
# It checks the kernel's layout arithmetic is consistent with that interpretation; whether
# the hardware reads descriptors that way is test/wgmma_probe.cu's question (on a GPU).
# Run by hand (needs numpy; about 4 s): python3 shards/test/sim_mla_wgmma.py
# Written 2026-11-30 before the kernel ever ran: 5.6e-4 of max |ref| (bf16 P), mapping ok.
import numpy as np
rng = np.random.default_rng(1)
C, DR = 512, 64
D = C + DR
QG = 64; BN = 64
ROW8 = (D // 8) * 128

def bf16(x):
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7fff + ((u >> 16) & 1)) >> 16) & 0xffff
    return u.astype(np.uint16)

def f32(h):
    return (h.astype(np.uint32) << 16).view(np.float32)

def cm_offset(r, k, K):
    return ((r >> 3) * (K >> 3) + (k >> 3)) * 128 + (r & 7) * 16 + (k & 7) * 2

def put(smem, off, h):  # store bf16 bits at byte offset
    smem[off:off+2] = np.uint16(h).tobytes()

def get(smem, off):
    return np.frombuffer(bytes(smem[off:off+2]), dtype=np.uint16)[0]

def read_kmajor(smem, start, lbo, sbo, rows):  # rows x 16 operand
    out = np.zeros((rows, 16), np.float32)
    for r in range(rows):
        for k in range(16):
            off = start + (r // 8) * sbo + (k // 8) * lbo + (r % 8) * 16 + (k % 8) * 2
            out[r, k] = f32(np.array([get(smem, off)]))[0]
    return out

def read_nmajor(smem, start, lbo, sbo, n):  # 16 x n operand, B[k][n]
    out = np.zeros((16, n), np.float32)
    for k in range(16):
        for j in range(n):
            off = start + (j // 8) * sbo + (k // 8) * lbo + (k % 8) * 16 + (j % 8) * 2
            out[k, j] = f32(np.array([get(smem, off)]))[0]
    return out

# One block: 64 query rows (all heads 0..63 of one token), a cache of L rows, position L-1.
L = 150
q = rng.standard_normal((QG, D)).astype(np.float32)
cache = bf16(rng.standard_normal((L, D)).astype(np.float32))
scale_log2 = 0.07 * 1.4426950408889634
vis = [L] * QG

smem_Q = bytearray(QG * D * 2)
for r in range(QG):
    for k in range(0, D, 2):
        put(smem_Q, cm_offset(r, k, D), bf16(q[r, k]))
        put(smem_Q, cm_offset(r, k + 1, D), bf16(q[r, k + 1]))

def load_tile(j0):
    t = bytearray(BN * D * 2)
    for e in range(BN * (D // 8)):
        q8 = e >> 3; r = (q8 // (D // 8)) * 8 + (e & 7); c = q8 % (D // 8)
        assert 16 * e == cm_offset(r, c * 8, D)
        if j0 + r < L:
            t[16 * e:16 * e + 16] = cache[j0 + r, c * 8:c * 8 + 8].tobytes()
    return t

o = np.zeros((2, QG, 256), np.float64)  # per warpgroup
m = np.full(QG, -np.inf); lpart = np.zeros((2, QG))
ntiles = (L + BN - 1) // BN
for t in range(ntiles):
    j0 = t * BN
    Kt = load_tile(j0)
    s = np.zeros((2, QG, 32))
    for wg in range(2):
        for k in range(D // 16):
            A = read_kmajor(smem_Q, 256 * k, 128, ROW8, 64)
            B = read_kmajor(Kt, 4 * wg * ROW8 + 256 * k, 128, ROW8, 32)  # B[n][k]
            s[wg] += A.astype(np.float64) @ B.T.astype(np.float64)
    red = np.zeros((2, QG))
    for wg in range(2):
        for r in range(QG):
            cols = 32 * wg + np.arange(32)
            v = np.where(cols < vis[r] - j0, s[wg, r] * scale_log2, -np.inf)
            s[wg, r] = v
            red[wg, r] = v.max()
    Ps = bytearray(QG * BN * 2)
    newm = np.maximum(m, np.maximum(red[0], red[1]))
    muse = np.where(newm == -np.inf, 0, newm)
    alpha = np.exp2(m - muse)
    for wg in range(2):
        lpart[wg] *= alpha
        p = np.exp2(s[wg] - muse[:, None])
        lpart[wg] += p.sum(1)
        for r in range(QG):
            for cc in range(32):
                put(Ps, cm_offset(r, 32 * wg + cc, BN), bf16(p[r, cc]))
        o[wg] *= alpha[:, None]
    m = newm
    for wg in range(2):
        for k in range(BN // 16):
            A = read_kmajor(Ps, 256 * k, 128, (BN // 8) * 128, 64)
            B = read_nmajor(Kt, 2 * k * ROW8 + 32 * wg * 128, ROW8, 128, 256)
            o[wg] += A.astype(np.float64) @ B.astype(np.float64)
Ltot = lpart[0] + lpart[1]
got = np.concatenate([o[0], o[1]], axis=1) / Ltot[:, None]

# Reference: softmax(q_bf16 . cache * scale) @ latent, in float64.
qb = f32(bf16(q)).astype(np.float64); cf = f32(cache).astype(np.float64)
sc = qb @ cf.T * (scale_log2 / 1.4426950408889634)
pr = np.exp(sc - sc.max(1, keepdims=True)); pr /= pr.sum(1, keepdims=True)
ref = pr @ cf[:, :C]
err = np.abs(got - ref).max() / np.abs(ref).max()
print(f"L={L}: max |sim - ref| / max |ref| = {err:.3e}")
assert err < 2e-2, err

# The accumulator mapping the kernel assumes (wgmma.cuh): thread t of a warpgroup, register i
# -> row 16 w + g + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2 q + (i & 1): one owner per element.
for n in (32, 256):
    seen = set()
    for t in range(128):
        w, g, qq = t // 32, (t % 32) // 4, t % 4
        for i in range(n // 2):
            seen.add((16 * w + g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * qq + (i & 1)))
    assert seen == {(r, c) for r in range(64) for c in range(n)}, n
print("accumulator mapping: every element of 64 x 32 and 64 x 256 owned once")
