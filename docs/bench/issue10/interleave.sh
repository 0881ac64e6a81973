#!/bin/bash
# Interleaved before/after runs of the updater benchmarks (issue 10).
set -u
out=/tmp/bench-cmp; mkdir -p $out; : > $out/before.txt; : > $out/after.txt
for i in 1 2 3 4; do
  for v in before after; do
    if [ $v = before ]; then dir=/tmp/before/updater; else dir=/work/main/updater; fi
    (cd $dir && /tmp/upd-$v.test -test.run '^$' -test.bench 'BenchmarkFanout/devices=10000|BenchmarkAcks' -test.benchtime 2x -test.count 1 -test.timeout 30m 2>&1) | grep -E '^(Benchmark|FAIL|---)' >> $out/$v.txt
    echo "$(date +%T) round $i $v done" >> $out/progress
  done
done
echo done >> $out/progress
