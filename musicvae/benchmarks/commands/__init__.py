"""The measuring commands: `musicvae bench`, `bench-prepare`, `benchmark-quality`, `compare`, `linear-codes`, `reliability`."""
