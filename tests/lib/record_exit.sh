#!/usr/bin/env bash
# record_exit.sh CMD ARGS...: runs CMD as one rank under mpirun and writes its
# exit code to $EXITS/rank.<world rank>, so a test counts each rank's own exit
# (test_env.sh's mpirun_counted starts it with --mca
# orte_abort_on_non_zero_status 0: one rank's failure does not kill the others).
"$@"; c=$?
echo "$c" > "$EXITS/rank.$OMPI_COMM_WORLD_RANK"
exit $c
