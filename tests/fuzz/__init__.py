"""Property-based tests of the live server: a model of the API's semantics driven by Hypothesis, raw bytes on every
method, and the load generator through a faulty network. Sized for CI by default; `make fuzz-long` (or
LSTM_FUZZ_EXAMPLES=N) runs many more examples with fresh random seeds."""
