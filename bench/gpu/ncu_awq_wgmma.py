"""A target for ncu: three awq_wgmma calls on one Llama-3.1-8B linear (random weights), so that
``--launch-skip 2 --launch-count 1`` profiles a warm one. On the GPU machine, after
``source bench/gpu/setup.sh``:

    ncu --clock-control none -k regex:_awq_wgmma --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section SourceCounters -o $OUT/wgmma \\
        python bench/gpu/ncu_awq_wgmma.py 512 gate_up
    ncu -i $OUT/wgmma.ncu-rep --page source --print-source sass --csv > $OUT/wgmma_sass.csv
"""

import sys

import torch

from bench.bench_awq_linear import SHAPES
from engine.kernels.awq_wgmma import awq_wgmma
from engine.quantization.awq import quantize

tokens, shape = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "gate_up"
k, n = SHAPES[shape]
torch.manual_seed(0)
qweight, qzeros, scales = quantize(torch.randn(n, k, device="cuda") * 0.02, 128)
x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    awq_wgmma(x, qweight, qzeros, scales)
torch.cuda.synchronize()
