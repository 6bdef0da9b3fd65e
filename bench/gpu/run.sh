# The GPU benchmarks, by stage; results land in $OUT/results. Source bench/gpu/setup.sh first.
#   bash bench/gpu/run.sh offline SHAPE BACKEND [bench_offline flags...]
#   bash bench/gpu/run.sh serve SHAPE BACKEND [bench_serve / sluice serve flags...]
#   bash bench/gpu/run.sh load [bench_load flags...]
#   bash bench/gpu/run.sh spec NAME [bench_spec_decode flags...]
R=$OUT/results; mkdir -p $R
stage=$1; shift
case "$stage" in
  offline) shape=$1 backend=$2; shift 2
           python -m bench.bench_offline --shape $shape --attention-backend $backend --baseline-batches \
             --out $R/offline_${shape}_${backend}${TAG}.json "$@" ;;
  serve)   shape=$1 backend=$2; shift 2
           # The offline stage's engine settings (bench_offline's defaults), so the two compare.
           python -m bench.bench_serve --shape $shape --attention-backend $backend --max-model-len 2064 \
             --max-num-seqs 256 --max-num-batched-tokens 8192 \
             --full-warmup --out $R/serve_${shape}_${backend}${TAG}.json "$@" ;;
  load)    python -m bench.bench_load --out $R/load_h200${TAG}.json "$@" ;;
  spec)    name=$1; shift; python -m bench.bench_spec_decode --out $R/spec_decode_${name}.json "$@" ;;
esac 2>&1 | grep -v "Warning\|warn\|it/s\]\|req/s\]" | tail -${TAIL:-8}
