"""hotfleet's control plane: leader election, fleet-wide two-phase commit, analysis."""
