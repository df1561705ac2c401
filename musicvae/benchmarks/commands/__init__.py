"""The measuring commands: `musicvae bench`, `bench-prepare`, `benchmark-quality`, `benchmark-map`, `compare`, `linear-codes`, `reliability`."""
