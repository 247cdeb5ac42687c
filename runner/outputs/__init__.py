"""What a run leaves behind: checkpoints, metric writers and plots."""
