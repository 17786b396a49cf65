//! Documents: round trips and bad inputs.
//! (one test binary: linking one per file dominated the test run's build time)

mod bad_inputs;
mod roundtrip;
