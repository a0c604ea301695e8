#!/bin/sh
# tritonserver 2.51.0 as nvidia-pytriton bundles it (python backend only): the Triton of the chart's cpu
# target. Arguments are tritonserver's own; this adds only what locates the bundled pieces, the same way
# recsvc.repository.TritonServer does for `recsvc triton`, so the chart can run it as the container's
# main process (logs on stdout, SIGTERM straight to Triton).
set -eu
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
home=$site/pytriton/tritonserver
# The server's own shared libraries ship next to the package.
export LD_LIBRARY_PATH="$site/nvidia_pytriton.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# numpy's OpenBLAS would start a spinning thread per core in every python stub.
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$home/bin/tritonserver" --backend-directory="$home/backends" --cache-directory="$home/caches" "$@"
