"""Small models and adapters built from configs (never downloaded), shared by the demo,
the examples, the tests and the benchmark."""
