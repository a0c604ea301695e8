#!/bin/sh
# preStop hook of the shedding proxy (HAProxy, files/recsvc-shed.cfg) in a recsvc server pod.
#
# Kubernetes runs this hook and SIGTERMs the recsvc container at the same moment. recsvc turns
# NOT_SERVING at once (the pod leaves the Services' endpoints) and keeps serving for its drain delay,
# which the chart sets to DRAIN_SECONDS + 1. The proxy keeps forwarding for DRAIN_SECONDS, then
# soft-stops: it closes its listener, sends GOAWAY on client connections (clients reconnect to other
# pods) and exits once the calls in flight are answered. recsvc stops accepting a second later, so no
# call the proxy forwards finds it closed.
#
# Why a hook: HAProxy takes SIGTERM as a hard stop, which would cut the calls in flight; SIGUSR1 is its
# soft stop. The kubelet sends SIGTERM when this hook returns, so it returns only when HAProxy is gone
# (with PID 1 gone the container ends and the hook with it).
set -eu
sleep "${DRAIN_SECONDS:?}"
pid=$(cat "${PIDFILE:?}")
kill -USR1 "$pid"
while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
