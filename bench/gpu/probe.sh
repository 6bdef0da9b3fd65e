# First call of a GPU session (carries .fa4/part1): CUDA-graph tests and a step profile on the triton backend.
source bench/gpu/setup.sh
python -m pytest tests/test_gpu.py -x -q -k "triton" 2>&1 | tail -5
python -m bench.profile_step --shape qwen3-0.6b --num-requests 128 --max-len 512 --attention-backend triton > $OUT/profile_triton.txt 2>&1
tail -5 $OUT/profile_triton.txt; grep -A 30 "Ordered by" $OUT/profile_triton.txt | head -32
