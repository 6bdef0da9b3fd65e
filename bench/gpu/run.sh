# The GPU benchmarks, by stage; results land in $OUT/results. Source setup first.
#   bash bench/gpu/run.sh offline-qwen BACKEND | offline-llama BACKEND | serve-qwen BACKEND
set -x
R=$OUT/results; mkdir -p $R
case "$1" in
  offline-qwen)  python -m bench.bench_offline --shape qwen3-0.6b --attention-backend $2 --out $R/offline_qwen3-0.6b_$2.json ${3:+--baseline-batches} ;;
  offline-llama) python -m bench.bench_offline --shape llama-3.1-8b --attention-backend $2 --out $R/offline_llama-3.1-8b_$2.json ${3:+--baseline-batches} ;;
  serve-qwen)    python -m bench.bench_serve --shape qwen3-0.6b --attention-backend $2 --max-model-len 2064 --request-rate inf 16 32 --out $R/serve_qwen3-0.6b_$2.json ;;
esac 2>&1 | grep -v Warning | tail -${TAIL:-6}
