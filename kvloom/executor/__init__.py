"""Where the model runs: in this process (one rank), or as tensor-parallel ranks in worker processes."""
