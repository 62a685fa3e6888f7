# shellcheck shell=bash
# EFA / NCCL environment for multi-node training on AWS GPU instances.
#
#   source recipes/slurm/aws_env.sh <instance-type>      # e.g. p4d.24xlarge
#
# Sourced by the sbatch files that `python -m recipes.slurm` renders and by the
# `hydra/launcher=slurm` (submitit) setup lines, once per job on the batch host; srun
# passes the environment on to every rank. Variables that are already set are kept, so a
# user's own `export NCCL_DEBUG=INFO` before sbatch wins. An empty, "null" or "none"
# instance type (a local or non-AWS cluster) exports nothing.
#
# Sources: aws-samples/awsome-distributed-training (test cases and nccl-tests sbatch
# files), the aws-ofi-nccl plugin's documentation.

_lmics_set() {  # _lmics_set NAME VALUE: export NAME=VALUE unless NAME is already set
    if [ -z "${!1+x}" ]; then
        export "$1=$2"
    fi
}

_lmics_instance="${1:-}"
case "${_lmics_instance}" in
    "" | null | none | None) ;;
    *)
        # libfabric's EFA provider, through the aws-ofi-nccl plugin.
        _lmics_set FI_PROVIDER efa
        # NOTE: dataloader workers are forked; with older libfabric (< 1.13) that needs
        # fork-safe memory registration.
        _lmics_set FI_EFA_FORK_SAFE 1
        # Fewer CUDA memory synchronisations on registered buffers (faster FSDP/MiCS).
        _lmics_set FI_EFA_SET_CUDA_SYNC_MEMOPS 0
        # Bootstrap sockets: never the loopback, docker or veth interfaces.
        _lmics_set NCCL_SOCKET_IFNAME "^docker,lo,veth"
        _lmics_set NCCL_DEBUG WARN
        # Deeper send queue and larger P2P chunks (awsome-distributed-training's nccl-tests).
        _lmics_set NCCL_BUFFSIZE 8388608
        _lmics_set NCCL_P2P_NET_CHUNKSIZE 524288
        case "${_lmics_instance}" in
            # GPUDirect RDMA over EFA: A100 (p4d, p4de), H100/H200 (p5, p5e, p5en).
            p4d.* | p4de.* | p5.* | p5e.* | p5en.*)
                _lmics_set FI_EFA_USE_DEVICE_RDMA 1
                ;;
            # p3dn (V100) has EFA but no GPUDirect RDMA: asking for it fails at init.
            *)
                _lmics_set FI_EFA_USE_DEVICE_RDMA 0
                ;;
        esac
        # The EFA libraries and the aws-ofi-nccl plugin (libnccl-net.so): the EFA
        # installer puts them under /opt/amazon; older AMIs under /opt/aws-ofi-nccl.
        for _lmics_dir in /opt/amazon/efa/lib /opt/amazon/ofi-nccl/lib /opt/aws-ofi-nccl/lib; do
            if [ -d "${_lmics_dir}" ]; then
                export LD_LIBRARY_PATH="${_lmics_dir}${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
            fi
        done
        # The plugin's algorithm/protocol tuner for AWS topologies, where installed.
        if [ -f /opt/amazon/ofi-nccl/lib/libnccl-ofi-tuner.so ]; then
            _lmics_set NCCL_TUNER_PLUGIN /opt/amazon/ofi-nccl/lib/libnccl-ofi-tuner.so
        fi
        ;;
esac
unset -f _lmics_set
unset _lmics_instance _lmics_dir
