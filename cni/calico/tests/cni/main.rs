//! The CNI plugins run as a runtime runs them, by libcni's sequence, by podman, and under a storm.
//! (one test binary: linking one per file dominated the test run's build time)

mod chaos;
mod common;
mod plugin;
mod podman;
mod storm;
