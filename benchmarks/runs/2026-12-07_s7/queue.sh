#!/bin/bash
# run specs from /tmp/s7/queue.txt one at a time (lines are consumed from the top)
cd /work/main
while true; do
  line=$(head -n1 /tmp/s7/queue.txt)
  [ -z "$line" ] && break
  sed -i 1d /tmp/s7/queue.txt
  name=$(echo "$line" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["name"])')
  echo "$(date +%T) start $name" >> /tmp/s7/queue.log
  case "$name" in
    __recipe__*) set -- $name; OMP_NUM_THREADS=1 nice -n 10 taskset -c 1 .venv/bin/python /tmp/s7/recipe_eval.py $2 $3 > /tmp/s7/log_$2.txt 2>&1 ;;
    __sens__*) set -- $name; OMP_NUM_THREADS=1 nice -n 10 taskset -c 1 .venv/bin/python /tmp/s7/sens.py $2 $3 $4 > /tmp/s7/log_sens_$2.txt 2>&1 ;;
    *) OMP_NUM_THREADS=1 nice -n 10 taskset -c 1 .venv/bin/python /tmp/s7/exp.py "$line" > /tmp/s7/log_$name.txt 2>&1 ;;
  esac
  echo "$(date +%T) end $name rc=$?" >> /tmp/s7/queue.log
done
