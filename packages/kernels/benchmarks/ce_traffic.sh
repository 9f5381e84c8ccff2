#!/usr/bin/env bash
# Where cross-entropy's time goes at V = 256k on a CUDA GPU with Nsight Compute (ncu): DRAM bytes of the row kernel,
# the same kernel with fewer programs, a persisting-L2 set-aside, the probe kernel's modes and a plain read-rate probe.
# Each part's output goes to $1/<part>.log (default: ./ce-traffic-logs).
#   bash packages/kernels/benchmarks/ce_traffic.sh /tmp/logs
set -u
out=${1:-ce-traffic-logs}
mkdir -p "$out"
cd "$(dirname "$0")"
shapes=8192x128256,8192x256000
ncu_bytes() { ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum -k "regex:$1" "${@:2}"; }
python3 ce_variants.py --repeats 2 --shapes $shapes '{}' '{"lane_cols": 8}' '{"programs": 99}' \
    '{"lane_cols": 8, "programs": 99}' '{"lane_cols": 8, "programs": 66}' > "$out/variants.log" 2>&1
ncu_bytes _cross_entropy_fwd python3 ce_variants.py --once --shapes $shapes '{}' > "$out/ncu-kernel.log" 2>&1
python3 ce_variants.py --repeats 1 --persisting-l2-mib 16 --shapes $shapes '{}' > "$out/persisting-l2.log" 2>&1
python3 ce_probe.py --shapes $shapes --modes normal,no-reread,loss-only,max-only > "$out/probe.log" 2>&1
ncu_bytes _probe_kernel python3 ce_probe.py --once --shapes $shapes --modes normal,normal+cg,forward+cg \
    > "$out/ncu-probe.log" 2>&1
python3 ce_read_rate.py > "$out/read-rate.log" 2>&1
for f in "$out"/*.log; do echo "== $f"; grep -E "^[0-9]+x|copy bandwidth|dram__|gpu__time|^ +[0-9]+ |once|set aside|^RESULT \{\"shape.*mode" "$f"; done
