set -x
cd /work/main && . .venv/bin/activate && export PYTHONPATH=.
R=bench/results/cpu-2026-11-28
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200
python -m fused_ce.bench --reps 10 --no-progress --json $R/bench.json
python -m fused_ce.bench --step --reps 10 --no-progress --json $R/bench_step.json
python -m fused_ce.bench --linear --impls fused_ce,torch.chunked,torch --reps 10 --no-progress --json $R/bench_linear.json
python -m fused_ce.bench --plot docs/cpu --no-progress --json $R/bench_plot.json
python bench/step_floor.py --reps 9 | tee $R/step_floor.log
bash bench/results/cpu-2026-11-28/ptxas_sm90.sh > bench/results/cpu-2026-11-28/ptxas_sm90.log   # (with a header line)
python bench/results/cpu-2026-11-28/linear_plan_memory.py | tee bench/results/cpu-2026-11-28/linear_plan_memory.log
