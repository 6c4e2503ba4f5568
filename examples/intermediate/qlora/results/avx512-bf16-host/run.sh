#!/bin/bash
# QLoRA on both bundled models (the commands in docs/04-qlora.md): train, evaluate after reloading, predict / generate.
# Usage: bash run.sh [OUT_DIR]   (default /tmp/qh); records the CPU model and its bf16 flags in OUT_DIR/lscpu.txt
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T=.venv/bin/tunelab
O=${1:-/tmp/qh}; rm -rf $O; mkdir -p $O
lscpu | grep -E 'Model name' > $O/lscpu.txt; lscpu | grep -o -E 'avx512_bf16|amx_bf16|avx2' | sort -u | tr '\n' ' ' >> $O/lscpu.txt; echo >> $O/lscpu.txt
/usr/bin/time -v $T train examples/beginner/full-fine-tuning/config.yaml method.name=qlora method.rank=8 data.max_train_samples=64 data.max_eval_samples=64 train.max_steps=4 train.lr=2e-4 output.dir=$O output.name=minilm-qlora > $O/minilm-train.log 2> $O/minilm-time.txt
head -64 data/imdb/test.jsonl > $O/imdb-first64.jsonl
$T eval $O/minilm-qlora --data $O/imdb-first64.jsonl --output $O/minilm-qlora/reload_eval_first64.json > $O/minilm-eval.log 2>&1
$T predict $O/minilm-qlora "a wonderful, moving film" > $O/minilm-qlora/predict.jsonl 2> $O/minilm-predict.err
/usr/bin/time -v $T train configs/smollm2-alpaca-lora.yaml method.name=qlora data.max_train_samples=16 data.max_eval_samples=8 train.max_steps=2 eval.num_samples=1 eval.max_new_tokens=8 output.dir=$O output.name=smollm2-qlora > $O/smollm2-train.log 2> $O/smollm2-time.txt
$T generate $O/smollm2-qlora "Name a colour." --max-new-tokens 8 > $O/smollm2-qlora/generate.jsonl 2> $O/smollm2-generate.err
echo ALLDONE
