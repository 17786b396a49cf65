//! Properties over generated selectors and inputs: printing then parsing gives the same
//! selector; arbitrary input never panics the parser.

use std::collections::{BTreeMap, BTreeSet};

use calico_selector::{Expr, Selector};
use proptest::prelude::*;

fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,6}",
        "[a-zA-Z0-9_./-]{1,12}",
        Just("in".to_owned()),
        Just("not".to_owned()),
        Just("contains".to_owned()),
    ]
}

/// Values that can be written in one quote style or the other (never both quote characters).
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z ]{0,5}",
        "[a-z\"]{0,5}",
        "[a-z']{0,5}",
        Just(String::new())
    ]
}

fn leaf() -> impl Strategy<Value = Expr> {
    prop_oneof![
        Just(Expr::All),
        Just(Expr::Global),
        label().prop_map(Expr::Has),
        (label(), value()).prop_map(|(k, v)| Expr::Eq(k, v)),
        (label(), value()).prop_map(|(k, v)| Expr::Ne(k, v)),
        (label(), prop::collection::btree_set(value(), 0..4)).prop_map(|(k, s)| Expr::In(k, s)),
        (label(), prop::collection::btree_set(value(), 0..4)).prop_map(|(k, s)| Expr::NotIn(k, s)),
        (label(), value()).prop_map(|(k, v)| Expr::Contains(k, v)),
        (label(), value()).prop_map(|(k, v)| Expr::StartsWith(k, v)),
        (label(), value()).prop_map(|(k, v)| Expr::EndsWith(k, v)),
    ]
}

fn expr() -> impl Strategy<Value = Expr> {
    leaf().prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
            prop::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
            prop::collection::vec(inner, 2..4).prop_map(Expr::Or),
        ]
    })
}

fn label_set() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(label(), value(), 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parse_of_print_is_identity(e in expr()) {
        let selector = Selector::from_expr(e);
        let printed = selector.to_string();
        let parsed = Selector::parse(&printed)
            .map_err(|err| TestCaseError::fail(format!("`{printed}`: {err}")))?;
        prop_assert_eq!(&parsed, &selector, "printed as `{}`", printed);
        prop_assert_eq!(parsed.to_string(), printed);
    }

    #[test]
    fn canonical_form_evaluates_the_same(e in expr(), labels in label_set()) {
        let selector = Selector::from_expr(e);
        let reparsed = Selector::parse(&selector.to_string()).unwrap();
        prop_assert_eq!(selector.matches(&labels), reparsed.matches(&labels));
    }

    #[test]
    fn negation_inverts(e in expr(), labels in label_set()) {
        let not = Expr::Not(Box::new(e.clone()));
        prop_assert_eq!(not.matches(&labels), !e.matches(&labels));
    }

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,64}") {
        let _ = Selector::parse(&text);
    }

    #[test]
    fn selector_shaped_text_never_panics(
        parts in prop::collection::vec(
            prop_oneof![
                Just("a"), Just("=="), Just("!="), Just("!"), Just("("), Just(")"),
                Just("{"), Just("}"), Just(","), Just("'x'"), Just("\"y\""), Just("&&"),
                Just("||"), Just("in"), Just("not"), Just("has("), Just("all()"),
                Just("starts"), Just("with"), Just(" "), Just("contains"), Just("global("),
            ],
            0..24,
        )
    ) {
        let text: String = parts.concat();
        if let Err(err) = Selector::parse(&text) {
            prop_assert!(err.offset <= text.len(), "offset past the end for `{}`", text);
        }
    }

    #[test]
    fn equal_sets_print_the_same(values in prop::collection::vec(value(), 0..5)) {
        let forward: BTreeSet<String> = values.iter().cloned().collect();
        let reversed: BTreeSet<String> = values.iter().rev().cloned().collect();
        prop_assert_eq!(
            Selector::from_expr(Expr::In("k".into(), forward)).to_string(),
            Selector::from_expr(Expr::In("k".into(), reversed)).to_string()
        );
    }
}
