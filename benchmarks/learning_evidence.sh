#!/usr/bin/env bash
# The learning-evidence runs reported in the README, in the CPU-sized configurations we could afford.
# Each seed runs single-threaded; three seeds share a 2-core machine. Results: benchmarks/summarize_runs.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
RUNS=${RUNS:-runs/evidence}

# Offline, random HalfCheetah-v5 (the default dataset), N = 5, in fp32 (the default when these were measured). One mu (seed 1) is pretrained, then reused by
# every seed, as the paper does for a sweep.
python emaq_offline.py --num-samples 5 --preset table3 --num-qs 4 --q-hidden 256 --q-layers 3 --batch-size 256 \
    --behavior-updates 20000 --total-updates 0 --runs-dir "$RUNS/mu" --exp-name mu_only --precision fp32
MU=$(ls -d "$RUNS"/mu/*/ | head -n 1)mu.pt
for seed in 1 2 3; do
  python emaq_offline.py --num-samples 5 --preset table3 --num-qs 4 --q-hidden 256 --q-layers 3 --batch-size 256 \
      --behavior-path "$MU" --behavior-updates 0 --total-updates 30000 --eval-every 5000 --eval-episodes 5 \
      --checkpoint-every 5000 --runs-dir "$RUNS/offline" --exp-name evidence_cpu --seed $seed --precision fp32 &
done
wait

# bf16 vs fp32 (issue #5): the same offline configuration, 10k updates, 2 seeds per precision, the same mu.
for precision in fp32 bf16; do
  for seed in 1 2; do
    python emaq_offline.py --num-samples 5 --preset table3 --num-qs 4 --q-hidden 256 --q-layers 3 --batch-size 256 \
        --behavior-path "$MU" --behavior-updates 0 --total-updates 10000 --eval-every 2500 --eval-episodes 5 \
        --checkpoint-every 2500 --runs-dir "$RUNS/precision_$precision" --exp-name cmp_$precision --seed $seed \
        --precision $precision &
  done
done
wait

# Online, InvertedPendulum-v5, fully online (M = 1), with a faster target (EMA 0.98, Q lr 3e-4).
for seed in 1 2 3; do
  python emaq_online.py --env-id InvertedPendulum-v5 --total-timesteps 12000 --learning-starts 1000 --eval-every 1000 \
      --eval-episodes 5 --behavior-preset table3 --num-qs 4 --q-hidden 256 --q-layers 2 --num-samples 20 \
      --q-lr 3e-4 --ema 0.98 --seed $seed --runs-dir "$RUNS/online" --exp-name evidence_cpu &
done
wait

# Online, Hopper-v5 and HalfCheetah-v5 curves (paper target settings, CPU-sized networks).
for env in Hopper-v5 HalfCheetah-v5; do
  python emaq_online.py --env-id $env --total-timesteps 20000 --learning-starts 5000 --eval-every 2500 --eval-episodes 5 \
      --behavior-preset table3 --num-qs 4 --q-hidden 256 --q-layers 2 --num-samples 10 --seed 1 \
      --runs-dir "$RUNS/curves" --exp-name curve_cpu --checkpoint-every 5000 &
done
wait
python benchmarks/summarize_runs.py "$RUNS" --curve

# bf16 vs fp32 where Q is large (issue #11): real medium Walker2d-v5 data (../shared/datasets, rewards of 2 to 4 per
# step), the CPU configuration, 30k updates, 2 seeds per precision, one mu (20k updates) shared by all four runs.
export MINARI_DATASETS_PATH=${MINARI_DATASETS_PATH:-../shared/datasets}
WALKER=practice/walker2d/medium-v0
CPU_CONFIG=(--num-samples 5 --preset table3 --num-qs 4 --q-hidden 256 --q-layers 3 --batch-size 256)
OMP_NUM_THREADS=2 python emaq_offline.py --dataset-id $WALKER "${CPU_CONFIG[@]}" --behavior-updates 20000 \
    --total-updates 0 --runs-dir "$RUNS/walker_mu" --exp-name mu_only --eval-episodes 10
WALKER_MU=$(ls -d "$RUNS"/walker_mu/*/ | head -n 1)mu.pt
for precision in fp32 bf16; do
  for seed in 1 2; do
    python emaq_offline.py --dataset-id $WALKER "${CPU_CONFIG[@]}" --behavior-path "$WALKER_MU" --behavior-updates 0 \
        --total-updates 30000 --eval-every 5000 --eval-episodes 10 --checkpoint-every 5000 \
        --runs-dir "$RUNS/walker_precision_$precision" --exp-name walker_$precision --seed $seed --precision $precision \
        &
  done
done
wait

# Medium-quality data (issue #18; README, "Medium-quality data"). 1) The runs above, diagnosed and evaluated over 100
# episodes at test-time N in {1, 2, 5, 10, 25} (N = 1 is mu itself); mu's deterministic policy is N = 1 at temperature 0.
python tools/diagnose_q.py "$RUNS"/walker_precision_*/*/ --ns 1 2 5 10 25 --episodes 100 --json "$RUNS/walker_diag_base.json"
python tools/diagnose_q.py "$(ls -d "$RUNS"/walker_precision_bf16/*/ | head -n 1)" --ns 1 5 --temperatures 0.0 0.5 \
    --episodes 100 --json "$RUNS/walker_diag_temperature.json"
# 2) One change at a time from the CPU configuration (seed 1, the same mu, 30k updates, final evaluation over 50
# episodes), two runs at a time; then each diagnosed like the runs above.
ABLATIONS=("n10 --num-samples 10" "ema098 --ema 0.98" "lr3e-4 --q-lr 3e-4" "k8 --num-qs 8"
    "lam05 --ensemble-lambda 0.5 --test-ensemble-lambda 0.5" "lr3e-4_s2 --q-lr 3e-4 --seed 2")
for i in "${!ABLATIONS[@]}"; do
  set -- ${ABLATIONS[$i]}
  name=$1
  shift
  python emaq_offline.py --dataset-id $WALKER "${CPU_CONFIG[@]}" --behavior-path "$WALKER_MU" --behavior-updates 0 \
      --total-updates 30000 --eval-every 10000 --eval-episodes 10 --final-eval-episodes 50 --checkpoint-every 10000 \
      --precision bf16 --runs-dir "$RUNS/walker_ablation/$name" --exp-name "$name" --seed 1 "$@" &
  if (( i % 2 == 1 )); then wait; fi
done
wait
# Without observation normalization mu must be trained again on raw observations (a saved mu is refused).
python emaq_offline.py --dataset-id $WALKER "${CPU_CONFIG[@]}" --behavior-updates 20000 --total-updates 30000 \
    --eval-every 10000 --final-eval-episodes 50 --precision bf16 --runs-dir "$RUNS/walker_ablation/noobsnorm" \
    --exp-name noobsnorm --no-normalize-obs
python tools/diagnose_q.py "$RUNS"/walker_ablation/*/*/ --ns 1 2 5 10 25 --episodes 100 \
    --json "$RUNS/walker_diag_ablations.json"

# The VAE behavior model (issue #16; README, "The VAE behavior model"): each mu once (20k updates, its sampled and
# greedy policies over 100 episodes), then EMaQ with N = 5 over each, 10k updates, last evaluation over 50 episodes.
for model in autoregressive vae; do
  OMP_NUM_THREADS=2 python emaq_offline.py --dataset-id $WALKER "${CPU_CONFIG[@]}" --behavior-model $model \
      --behavior-updates 20000 --total-updates 0 --eval-episodes 100 --runs-dir "$RUNS/walker_mu_$model"
  python emaq_offline.py --dataset-id $WALKER "${CPU_CONFIG[@]}" --behavior-model $model \
      --behavior-path "$(ls -d "$RUNS"/walker_mu_$model/*/ | head -n 1)mu.pt" --behavior-updates 0 --total-updates 10000 \
      --eval-every 5000 --final-eval-episodes 50 --runs-dir "$RUNS/walker_emaq_$model"
done

# The CPU preset's grid (issue #17; README, "The CPU preset"): the preset's sizes, 30k updates, seed 1, one mu per
# dataset (20k updates, its policies over 100 episodes); N x Q lr x EMA on the practice Walker2d datasets, last
# evaluation over 50 episodes. Run on one H200 with 15 runs at a time (`--compile off`); on a CPU, a few at a time.
python - <<'PY'
import minari
medium, expert = (minari.load_dataset(f"practice/walker2d/{q}-v0") for q in ("medium", "expert"))
minari.combine_datasets([medium, expert], "practice/walker2d/medium-expert-v0")  # needs a writable MINARI_DATASETS_PATH
PY
for data in medium expert medium-expert; do
  python emaq_offline.py --dataset-id practice/walker2d/$data-v0 --preset cpu --total-updates 0 --eval-episodes 100 \
      --runs-dir "$RUNS/grid_mu_$data"
  GRID_MU=$(ls -d "$RUNS"/grid_mu_$data/*/ | head -n 1)mu.pt
  for n in 5 10; do for lr in 1e-4 3e-4; do for ema in 0.995 0.98; do
    python emaq_offline.py --dataset-id practice/walker2d/$data-v0 --preset cpu --behavior-path "$GRID_MU" \
        --behavior-updates 0 --num-samples $n --q-lr $lr --ema $ema --eval-every 10000 --final-eval-episodes 50 \
        --runs-dir "$RUNS/grid_$data" --exp-name "n${n}_lr${lr}_ema${ema}" &
  done; done; wait; done
done
# Issue #18's last two ablations, on the medium mu of the grid (same seed): Q width 750, and raw observations (own mu).
MEDIUM_MU=$(ls -d "$RUNS"/grid_mu_medium/*/ | head -n 1)mu.pt
PAPER_RATES=(--preset cpu --num-samples 5 --q-lr 1e-4 --ema 0.995 --eval-every 10000 --final-eval-episodes 50)
python emaq_offline.py --dataset-id $WALKER "${PAPER_RATES[@]}" --behavior-path "$MEDIUM_MU" --behavior-updates 0 \
    --q-hidden 750 --runs-dir "$RUNS/walker_ablation/width750" &
python emaq_offline.py --dataset-id $WALKER "${PAPER_RATES[@]}" --no-normalize-obs --runs-dir "$RUNS/walker_ablation/noobsnorm30k" &
wait
# Issue #16 at N = 25 (10k updates, the paper's Q lr and EMA) over each model's mu; the VAE mu trained once here.
python emaq_offline.py --dataset-id $WALKER --preset cpu --behavior-model vae --total-updates 0 --eval-episodes 100 \
    --runs-dir "$RUNS/grid_mu_medium_vae"
for model in autoregressive vae; do
  mu_dir=$([ $model = vae ] && echo grid_mu_medium_vae || echo grid_mu_medium)
  python emaq_offline.py --dataset-id $WALKER "${PAPER_RATES[@]}" --num-samples 25 --total-updates 10000 \
      --behavior-model $model --behavior-path "$(ls -d "$RUNS"/$mu_dir/*/ | head -n 1)mu.pt" --behavior-updates 0 \
      --runs-dir "$RUNS/walker_n25_$model" &
done
wait
# ... and on the default random HalfCheetah (N = 5 and 25, 10k updates; each model's mu trained once).
for model in autoregressive vae; do
  python emaq_offline.py --preset cpu --behavior-model $model --total-updates 0 --eval-episodes 100 \
      --runs-dir "$RUNS/hc_mu_$model"
  for n in 5 25; do
    python emaq_offline.py --preset cpu --q-lr 1e-4 --ema 0.995 --behavior-model $model --num-samples $n \
        --behavior-path "$(ls -d "$RUNS"/hc_mu_$model/*/ | head -n 1)mu.pt" --behavior-updates 0 --total-updates 10000 \
        --eval-every 5000 --final-eval-episodes 50 --runs-dir "$RUNS/hc_emaq_${model}_n$n"
  done
done
