# device call B (issue 12): bench_train 350m x 32768 with remat, compile scaling 12 -> 48 layers; ncu stall reasons of the CARVE state loop last
export CARVE_COMMIT=25cc3cc PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/wh .whl/*.whl 2>/dev/null; export PYTHONPATH=$PWD:/tmp/wh
echo "== bench_train $(date -u +%T)"
python3 -m experiments.bench_train --budget_s 330 --min_row_s 50 --loop_steps 10 --device_reps 3 --sizes 350m --seq_lens 32768 --mixers carve,gdn2,attention,kda --remat_policies none,save_dots_and_mixer --rows 350m:32768:attention:none,350m:32768:carve:save_dots_and_mixer,350m:32768:gdn2:save_dots_and_mixer,350m:32768:kda:save_dots_and_mixer --out_dir $OUT/results --tag _h200_350m_t32768 2>&1 | grep "bench_train\]"
echo "== compile scaling $(date -u +%T)"
timeout 110 python3 -m experiments.bench_train --compile_scaling --compile_scan on --compile_layers 12,48 --mixers carve --budget_s 105 --out_dir $OUT/results --tag _h200 2>&1 | grep "bench_train\]"
echo "== ncu $(date -u +%T)"
timeout 70 ncu --clock-control none --kernel-name regex:carve_state --section WarpStateStats --section SpeedOfLight python3 -m experiments.kernel_probe --B 2 --T 8192 --carve-only --once > $OUT/ncu_carve_state.txt 2>&1; grep -E "Stall|Warp Cycles|Issued|Duration|Throughput|stall" $OUT/ncu_carve_state.txt | head -40
echo "== done $(date -u +%T)"
