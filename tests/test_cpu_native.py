"""sluice's CPU GEMM for fp16 weights (engine/layers/cpu_gemm.cpp through cpu_native.py): against a
float64 reference at every tile shape and remainder, the same bits for a row whatever the row
count, clear errors for wrong inputs, and one OpenMP runtime in the process (torch's)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

from engine.layers import cpu_native

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="no AVX2/F16C CPU or no C++ compiler")

# Rows: every few-row tile (1..8), the 4-row blocks of many rows with each remainder (9..12), a
# prompt-sized count. Features: K with and without a tail past the last 8, N below, at and past
# a 48-feature chunk and past a 3-wide tile.
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 37]
SHAPES = [(8, 1), (13, 7), (64, 48), (100, 50), (512, 97)]


@pytest.mark.parametrize("in_features,out_features", SHAPES)
def test_gemm_matches_float64_and_is_batch_invariant(in_features: int, out_features: int) -> None:
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs each run; the seed is in any failure
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=gen) * in_features**-0.5).half()
    x = torch.randn(max(ROWS), in_features, generator=gen)
    full = cpu_native.gemm_f16_weight(x, weight)
    expected = x.double() @ weight.double().T
    # fp32 sums of in_features products: rounding grows like sqrt(K) * 2**-24 of the terms' size.
    torch.testing.assert_close(full.double(), expected, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    for rows in ROWS:
        part = cpu_native.gemm_f16_weight(x[:rows], weight)
        assert torch.equal(part, full[:rows]), f"{rows} rows differ from the same rows among {max(ROWS)}, seed {seed}"
    one_by_one = torch.cat([cpu_native.gemm_f16_weight(x[i:i + 1], weight) for i in range(max(ROWS))])
    assert torch.equal(one_by_one, full), f"seed {seed}"


def test_gemm_of_no_rows_and_uneven_thread_counts() -> None:
    weight = torch.randn(50, 64).half()
    assert cpu_native.gemm_f16_weight(torch.zeros(0, 64), weight).shape == (0, 50)
    x = torch.randn(5, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu_native.gemm_f16_weight(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, cpu_native.gemm_f16_weight(x, weight))  # the split never changes a sum


def test_gemm_rejects_wrong_dtypes_and_shapes() -> None:
    weight = torch.randn(16, 32).half()
    with pytest.raises(ValueError, match="float16"):
        cpu_native.gemm_f16_weight(torch.randn(2, 32), weight.float())
    with pytest.raises(ValueError, match="float32"):
        cpu_native.gemm_f16_weight(torch.randn(2, 32).double(), weight)
    with pytest.raises(ValueError, match=r"\(2, 31\)"):
        cpu_native.gemm_f16_weight(torch.randn(2, 31), weight)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_native.gemm_f16_weight(torch.randn(2, 16), weight.t())


def test_kernels_share_torchs_openmp_runtime() -> None:
    """Two OpenMP runtimes would each keep a pool of spinning threads on the same cores."""
    code = ("import re, torch; from engine.layers import cpu_native; assert cpu_native.available(); "
            "print(sorted(set(re.findall(r'\\S*libgomp\\S*', open('/proc/self/maps').read()))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    runtimes = ast.literal_eval(out.stdout.strip())
    assert len(runtimes) == 1, runtimes


def test_a_changed_source_builds_into_its_own_file(tmp_path, monkeypatch) -> None:
    """The cache key hashes the source: a build never loads a stale library."""
    source = tmp_path / "cpu_gemm.cpp"
    source.write_text(cpu_native._SOURCE.read_text() + "\n// a change\n")
    monkeypatch.setattr(cpu_native, "_SOURCE", source)
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path / "cache"))
    cpu_native._library.cache_clear()
    try:
        assert cpu_native.available()
        built = list((tmp_path / "cache").glob("cpu_gemm-*.so"))
        assert len(built) == 1
        weight, x = torch.randn(9, 16).half(), torch.randn(3, 16)
        torch.testing.assert_close(cpu_native.gemm_f16_weight(x, weight).double(), x.double() @ weight.double().T,
                                   rtol=1e-5, atol=1e-5)
    finally:
        cpu_native._library.cache_clear()
