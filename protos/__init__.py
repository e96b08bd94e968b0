"""The gRPC contract of ep-recovery. Generated modules live under ep_recovery/v1."""
