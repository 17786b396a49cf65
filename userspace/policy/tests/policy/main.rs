//! Policy semantics, the compiler against the reference, and large rule counts.
//! (one test binary: linking one per file dominated the test run's build time)

mod differential;
mod scale;
mod semantics;
