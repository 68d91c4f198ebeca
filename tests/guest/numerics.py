"""Linear algebra a data job relies on, computed in the guest and printed as one JSON line.

The host computes the same with its own NumPy and compares (tests/test_vm.py): a CPU
model whose emulation is wrong shows up here as a wrong number, not as a crash.
Every case runs on a contiguous matrix and on strided views of a larger one, since
NumPy takes other SIMD loops (gathers) for strided data.
Usage: python numerics.py
"""
import json

import numpy as np

DTYPES = ("float32", "float64", "complex64", "complex128")


def matrices(dtype: str) -> dict:
    rng = np.random.default_rng(20261203)
    big = rng.standard_normal((18, 18))
    if dtype.startswith("complex"):
        big = big + 1j * rng.standard_normal((18, 18))
    big = big.astype(dtype) + 6 * np.eye(18, dtype=dtype)  # well conditioned
    return {
        "contiguous": np.ascontiguousarray(big[:6, :6]),
        "strided": big[:6, ::3],  # columns 3 elements apart
        "strided2": big[::3, 1::3],
        "small_strided": (np.arange(1, 13).reshape(2, 6)
                          + (1j * np.arange(2, 14).reshape(2, 6) if dtype.startswith("complex") else 0)
                          ).astype(dtype)[:, ::3],
    }


def encode(value) -> list:
    """Complex numbers as [re, im] pairs, everything as nested lists of floats."""
    array = np.asarray(value)
    if np.iscomplexobj(array):
        return np.stack([array.real, array.imag], axis=-1).astype(float).tolist()
    return array.astype(float).tolist()


def results() -> dict:
    out: dict = {"numpy": np.__version__}
    for dtype in DTYPES:
        for layout, a in matrices(dtype).items():
            key = f"{dtype}/{layout}"
            b = np.arange(1, a.shape[0] + 1).astype(dtype)
            out[key] = {
                "cond": [float(np.real(np.linalg.cond(a, p))) for p in (None, "fro", 1, -1, np.inf, -np.inf, 2, -2)],
                "solve": encode(np.linalg.solve(a, b)),
                "svd": encode(np.linalg.svd(a, compute_uv=False)),
                "inv": encode(np.linalg.inv(a)),
                "det": encode(np.linalg.det(a)),
                "norm_fro": float(np.linalg.norm(a, "fro")),
                "product": encode(a.conj() * a),
                "abs_sum": encode(abs(a).sum(-2)),
                "matmul": encode(a @ a.T),
            }
    return out


def mismatches(want: dict, got: dict) -> list[str]:
    """Where ``got`` differs from ``want`` beyond rounding (relative, by precision)."""
    problems = []
    for key, cases in want.items():
        if key == "numpy":
            continue
        if key not in got:
            problems.append(f"{key}: missing")
            continue
        rtol = 2e-4 if key.split("/")[0] in ("float32", "complex64") else 1e-9
        for name, value in cases.items():
            expected, actual = np.asarray(value, dtype=float), np.asarray(got[key].get(name), dtype=float)
            if expected.shape != actual.shape:
                problems.append(f"{key} {name}: shape {actual.shape}, want {expected.shape}")
                continue
            scale = max(float(np.max(np.abs(expected))), 1.0)  # entries near 0 judged against the largest
            if not np.allclose(actual, expected, rtol=rtol, atol=rtol * scale):
                worst = float(np.max(np.abs(actual - expected)))
                problems.append(f"{key} {name}: off by up to {worst:.3g} (e.g. {actual.ravel()[:3].tolist()}"
                                f" for {expected.ravel()[:3].tolist()})")
    return problems


if __name__ == "__main__":
    print(json.dumps(results()))
