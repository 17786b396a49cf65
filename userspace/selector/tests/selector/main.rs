//! Selector language: table tests and properties.
//! (one test binary: linking one per file dominated the test run's build time)

mod properties;
mod table;
