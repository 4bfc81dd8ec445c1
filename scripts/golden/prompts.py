"""The goldens' prompts: deterministic token ids, shared by make_goldens.py and
make_mtp_goldens.py (no dependencies, so the numpy-only script can import it)."""

from __future__ import annotations


def prompt_ids(index: int, length: int, vocab: int) -> list[int]:
    """Deterministic token ids in [0, vocab): a 31-bit LCG (glibc constants) seeded by the index.

    x0 = 1000 + index; x_{n+1} = (1103515245 * x_n + 12345) mod 2^31; id_n = (x_{n+1} >> 8) mod vocab.
    The ids are stored in the fixture too, so consumers never need to recompute them.
    """
    x = 1000 + index
    out = []
    for _ in range(length):
        x = (1103515245 * x + 12345) % (1 << 31)
        out.append((x >> 8) % vocab)
    return out
