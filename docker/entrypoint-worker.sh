#!/bin/sh
# Entrypoint of the worker image (Dockerfile.worker): run the Conveyor process named by
# WORKER_SCRIPT. `exec` replaces this shell, so `conveyor` becomes PID 1 and receives the
# SIGTERM of `docker stop` / Kubernetes directly. Extra arguments are passed through.
#
#   worker    | start:worker     -> conveyor worker     (execution worker)
#   scheduler | start:scheduler  -> conveyor scheduler  (cron scheduler, one active by lock)
#   timers    | start:timers     -> conveyor timers     (durable timer dispatcher)
#
# Unset WORKER_SCRIPT means `worker` (the image sets it anyway); anything else, the empty
# string included, is a deployment mistake: say so and exit 2, like a bad setting.
set -eu

script="${WORKER_SCRIPT-worker}"
case "$script" in
    worker | start:worker) role=worker ;;
    scheduler | start:scheduler) role=scheduler ;;
    timers | start:timers) role=timers ;;
    *)
        echo "conveyor-worker: invalid setting WORKER_SCRIPT='$script': must be one of worker, scheduler, timers (or start:worker, start:scheduler, start:timers)" >&2
        exit 2
        ;;
esac

exec conveyor "$role" "$@"
