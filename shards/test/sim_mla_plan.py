# Host simulation of the MLA attention plan and its wgmma path (cuda/attention.cu) end to
# end, written by a review on 2026-12-01 (no GPU): plan_kernel ported (groups of tokens x
# heads, split into items by cache chunks), mla_wgmma_kernel per item with its per-thread
# softmax and epilogue indexing and the shared-memory byte layouts read back through its
# descriptors (as in sim_mla_wgmma.py), the partial rows and mla_combine_kernel's merge,
# against a float64 reference. Cases: V2-Lite prefill, rows fully masked in split groups,
# a decode batch, and 60-row groups (H = 20). "unwritten" counts output rows no item wrote.
# Like sim_mla_wgmma.py it checks the kernel's arithmetic against the documented layouts;
# only a GPU run (test_cuda_parity --wgmma) checks the hardware agrees.
# Run by hand (needs numpy; about 1 s): python3 shards/test/sim_mla_plan.py
import numpy as np, math, sys
rng = np.random.default_rng(7)
C, DR = 512, 64
D = C + DR
QG = 64; BN = 64
ROW8 = (D // 8) * 128

def bf16r(x):
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7fff + ((u >> 16) & 1)) >> 16) & 0xffff
    return (u.astype(np.uint32) << 16).view(np.float32)

def cm_offset(r, k, K):
    return ((r >> 3) * (K >> 3) + (k >> 3)) * 128 + (r & 7) * 16 + (k & 7) * 2

# smem modelled as float arrays indexed by (byte offset / 2)
def read_kmajor(sm, start, lbo, sbo, rows):
    r = np.arange(rows)[:, None]; k = np.arange(16)[None, :]
    off = start + (r // 8) * sbo + (k // 8) * lbo + (r % 8) * 16 + (k % 8) * 2
    return sm[off // 2]

def read_nmajor(sm, start, lbo, sbo, n):
    k = np.arange(16)[:, None]; j = np.arange(n)[None, :]
    off = start + (j // 8) * sbo + (k // 8) * lbo + (k % 8) * 16 + (j % 8) * 2
    return sm[off // 2]

def plan_kernel(H, T, positions, q_offsets, seqs, qg, min_chunk, target_blocks, tile, plan):
    first = len(plan['groups'])
    for s in seqs:
        t0 = q_offsets[s] if q_offsets else 0
        t1 = q_offsets[s + 1] if q_offsets else T
        def add(t, ntok, h0, nh):
            vis = 0
            for u in range(t, t + ntok): vis = max(vis, positions[u] + 1)
            plan['groups'].append(dict(seq=s, t0=t, h0=h0, nh=nh, nrows=ntok * nh, visible=vis, ib=0, ie=0))
        if H >= qg:
            chunks = (H + qg - 1) // qg; nh = (H + chunks - 1) // chunks
            for t in range(t0, t1):
                for h0 in range(0, H, nh): add(t, 1, h0, min(nh, H - h0))
        else:
            per = qg // H
            t = t0
            while t < t1:
                add(t, min(per, t1 - t), 0, H); t += per
    G = plan['groups'][first:]
    ngroups = len(G); target = max(1, target_blocks)
    max_vis = max([1] + [g['visible'] for g in G])
    rt = lambda v: (v + tile - 1) // tile * tile
    count = lambda ck: sum((g['visible'] + ck - 1) // ck for g in G)
    whole = rt(max(max_vis, min_chunk))
    chunk = whole; best = (ngroups + target - 1) // target * whole
    if ngroups < 4 * target:
        for w in range(1, 5):
            if ngroups > w * target: continue
            lo = rt(min_chunk) // tile; hi = whole // tile
            while lo < hi:
                mid = (lo + hi) // 2
                if count(mid * tile) <= w * target: hi = mid
                else: lo = mid + 1
            if w * lo * tile < best: best = w * lo * tile; chunk = lo * tile
    for gi in range(first, len(plan['groups'])):
        g = plan['groups'][gi]
        n = (g['visible'] + chunk - 1) // chunk
        step = ((g['visible'] + n - 1) // n + tile - 1) // tile * tile
        g['ib'] = len(plan['items'])
        r = 0
        while r < g['visible']:
            single = step >= g['visible']
            plan['items'].append(dict(group=gi, rb=r, re=min(g['visible'], r + step), pb=-1 if single else plan['part_rows']))
            if not single: plan['part_rows'] += g['nrows']
            r += step
        g['ie'] = len(plan['items'])
        if g['ie'] - g['ib'] > 1: plan['multi'].append(gi)

def wgmma_item(it, g, qcat, H, positions, cache, scale_log2, o_lat, part_o, part_ml):
    tid = np.arange(256)
    wg = tid >> 7; w = (tid & 127) >> 5; gq = (tid & 31) >> 2; tq = tid & 3
    r0 = 16 * w + gq
    grp_tok = lambda r: g['t0'] + r // g['nh']
    grp_head = lambda r: g['h0'] + r % g['nh']
    # Q smem
    Qs = np.zeros(QG * D, np.float32)
    for r in range(QG):
        v = np.zeros(D, np.float32)
        if r < g['nrows']: v = qcat[grp_tok(r) * H + grp_head(r)]
        ks = np.arange(D)
        Qs[cm_offset(r, ks, D) // 2] = bf16r(v)
    vis = np.array([min(positions[grp_tok(r)] + 1, it['re']) if r < g['nrows'] else 0 for r in range(QG)])
    ntiles = (it['re'] - it['rb'] + BN - 1) // BN
    o = np.zeros((256, 128)); m = np.full((256, 2), -np.inf); l = np.zeros((256, 2))
    ii = np.arange(16)
    for t in range(ntiles):
        j0 = it['rb'] + t * BN
        Kt = np.zeros(BN * D, np.float32)
        for e in range(BN * (D // 8)):
            q8 = e >> 3; r = (q8 // (D // 8)) * 8 + (e & 7); c = q8 % (D // 8)
            if j0 + r < it['re']:
                Kt[8 * e: 8 * e + 8] = cache[j0 + r, c * 8: c * 8 + 8]
        # S per warpgroup, matrix level, then to per-thread regs
        S = np.zeros((2, 64, 32))
        for x in range(2):
            for k in range(D // 16):
                A = read_kmajor(Qs, 256 * k, 128, ROW8, 64)
                B = read_kmajor(Kt, 4 * x * ROW8 + 256 * k, 128, ROW8, 32)
                S[x] += A.astype(np.float64) @ B.T.astype(np.float64)
        rows = r0[:, None] + 8 * ((ii[None, :] >> 1) & 1)
        cols = 8 * (ii[None, :] >> 2) + 2 * tq[:, None] + (ii[None, :] & 1)
        s = S[wg[:, None], rows, cols].astype(np.float32)
        lim = np.stack([vis[r0] - j0, vis[r0 + 8] - j0], 1)
        h = (ii >> 1) & 1
        colt = 32 * wg[:, None] + cols
        s = np.where(colt < lim[np.arange(256)[:, None], h[None, :]], s * np.float32(scale_log2), -np.inf)
        mx = np.full((256, 2), -np.inf)
        for hh in range(2): mx[:, hh] = np.max(np.where(h[None, :] == hh, s, -np.inf), 1)
        # quad reduce
        for hh in range(2):
            v = mx[:, hh].reshape(-1, 4).max(1); mx[:, hh] = np.repeat(v, 4)
        red = np.full((2, 64), np.nan)
        sel = tq == 0
        red[wg[sel], r0[sel]] = mx[sel, 0]; red[wg[sel], r0[sel] + 8] = mx[sel, 1]
        Ps = np.full(QG * BN, np.nan, np.float32)
        alpha = np.zeros((256, 2)); muse = np.zeros((256, 2))
        for hh in range(2):
            r = r0 + 8 * hh
            mnew = np.maximum(m[:, hh], np.maximum(red[0, r], red[1, r]))
            muse[:, hh] = np.where(mnew == -np.inf, 0, mnew)
            alpha[:, hh] = np.exp2(m[:, hh] - muse[:, hh])
            m[:, hh] = mnew; l[:, hh] *= alpha[:, hh]
        for i in range(0, 16, 2):
            hh = (i >> 1) & 1; col = 32 * wg + 8 * (i >> 2) + 2 * tq
            p0 = np.exp2(s[:, i] - muse[:, hh]); p1 = np.exp2(s[:, i + 1] - muse[:, hh])
            l[:, hh] += p0 + p1
            off = cm_offset(r0 + 8 * hh, col, BN)
            Ps[off // 2] = bf16r(p0); Ps[off // 2 + 1] = bf16r(p1)
        assert not np.isnan(Ps).any()
        i128 = np.arange(128)
        o *= alpha[:, (i128 >> 1) & 1]
        for x in range(2):
            acc = np.zeros((64, 256))
            for k in range(BN // 16):
                A = read_kmajor(Ps, 256 * k, 128, (BN // 8) * 128, 64)
                B = read_nmajor(Kt, 2 * k * ROW8 + 32 * x * 128, ROW8, 128, 256)
                acc += A.astype(np.float64) @ B.astype(np.float64)
            sel = wg == x
            rr = r0[sel][:, None] + 8 * ((i128[None, :] >> 1) & 1)
            cc = 8 * (i128[None, :] >> 2) + 2 * tq[sel][:, None] + (i128[None, :] & 1)
            o[sel] += acc[rr, cc]
    for hh in range(2):
        v = l[:, hh].reshape(-1, 4).sum(1); l[:, hh] = np.repeat(v, 4)
    red = np.full((2, 64), np.nan)
    sel = tq == 0
    red[wg[sel], r0[sel]] = l[sel, 0]; red[wg[sel], r0[sel] + 8] = l[sel, 1]
    for th in range(256):
        for hh in range(2):
            r = r0[th] + 8 * hh
            if r >= g['nrows']: continue
            L = red[0, r] + red[1, r]
            row = grp_tok(r) * H + grp_head(r)
            for i in range(128):
                if ((i >> 1) & 1) != hh: continue
                c = 256 * wg[th] + 8 * (i >> 2) + 2 * tq[th] + (i & 1)
                if it['pb'] < 0: o_lat[row, c] = o[th, i] / L
                else: part_o[it['pb'] + r, c] = o[th, i]
            if it['pb'] >= 0 and wg[th] == 0 and tq[th] == 0:
                part_ml[it['pb'] + r] = (m[th, hh], L)

def combine(plan, g, H, o_lat, part_o, part_ml):
    for r in range(g['nrows']):
        items = plan['items'][g['ib']:g['ie']]
        M = max(part_ml[it['pb'] + r][0] for it in items)
        if M == -np.inf: M = 0
        L = sum(np.exp2(part_ml[it['pb'] + r][0] - M) * part_ml[it['pb'] + r][1] for it in items)
        acc = sum(np.exp2(part_ml[it['pb'] + r][0] - M) * part_o[it['pb'] + r] for it in items)
        row = (g['t0'] + r // g['nh']) * H + g['h0'] + r % g['nh']
        o_lat[row] = acc / L

def run_case(name, H, seqs, sm_count=132):
    # seqs: list of (cache_rows, positions)
    positions = []; q_offsets = [0]; caches = []
    for rows, pos in seqs:
        caches.append(bf16r(rng.standard_normal((rows, D)).astype(np.float32)))
        positions += pos; q_offsets.append(len(positions))
    T = len(positions)
    qcat = rng.standard_normal((T * H, D)).astype(np.float32)
    scale = 0.07; scale_log2 = np.float32(scale * 1.4426950408889634)
    plan = dict(groups=[], items=[], multi=[], part_rows=0)
    S = len(seqs)
    live = [s for s in range(S) if q_offsets[s + 1] > q_offsets[s]]
    plan_kernel(H, T, positions, q_offsets if S > 1 else None, live, 64, 128, sm_count, 64, plan)
    o_lat = np.full((T * H, C), np.nan); part_o = np.full((max(1, plan['part_rows']), C), np.nan)
    part_ml = [None] * max(1, plan['part_rows'])
    for it in plan['items']:
        g = plan['groups'][it['group']]
        wgmma_item(it, g, qcat, H, positions, caches[g['seq']], scale_log2, o_lat, part_o, part_ml)
    for gi in plan['multi']: combine(plan, plan['groups'][gi], H, o_lat, part_o, part_ml)
    # reference
    ref = np.zeros((T * H, C))
    for s in live:
        for t in range(q_offsets[s], q_offsets[s + 1]):
            cf = caches[s].astype(np.float64)[:positions[t] + 1]
            for h in range(H):
                qb = bf16r(qcat[t * H + h]).astype(np.float64)
                sc = cf @ qb * scale
                p = np.exp(sc - sc.max()); p /= p.sum()
                ref[t * H + h] = p @ cf[:, :C]
    err = np.nanmax(np.abs(o_lat - ref)) / np.abs(ref).max()
    nans = np.isnan(o_lat).sum()
    print(f"{name}: items {len(plan['items'])} multi {len(plan['multi'])} part_rows {plan['part_rows']} err {err:.3e} unwritten {nans}")
    assert nans == 0 and err < 2e-2

if __name__ == "__main__":
    run_case("lite prefill 70 (4 tok x 16 heads)", 16, [(70, list(range(70)))], sm_count=8)
    run_case("lite tokens 100, 1000 split", 16, [(1000, [100, 999])], sm_count=8)
    run_case("v3-ish H=64 decode batch", 64, [(1, [0]), (37, [36]), (300, [299]), (5, [])], sm_count=6)
    run_case("H=20 partial rows", 20, [(400, [100, 200, 399])], sm_count=4)
