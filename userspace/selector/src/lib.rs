//! Calico's label selector language, whole: `==`, `!=`, `in {…}`, `not in {…}`, `has(k)`,
//! `all()`, `global()`, `contains`, `starts with`, `ends with`, `&&`, `||`, `!`, parentheses,
//! single- and double-quoted strings.
//!
//! [`Selector::parse`] reports errors with the byte offset where they occur. A selector prints
//! in upstream's canonical form (`Display`), so selectors that mean the same thing textually
//! (spacing, quote style, set order and duplicates) print the same, and parsing the printed form
//! gives the same selector back. Evaluation is pure: labels come through the [`Labels`] trait,
//! which [`InheritedLabels`] implements for an endpoint's own labels over those it inherits from
//! its profiles.

mod ast;
mod eval;
mod lexer;
mod parser;

pub use ast::{Expr, Selector};
pub use eval::{InheritedLabels, Labels};
pub use parser::SelectorError;
