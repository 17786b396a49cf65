//! Selector behaviour as data: (selector, labels, expected match), canonical forms, and syntax
//! errors with the offset each must report.

use std::collections::BTreeMap;

use calico_selector::{InheritedLabels, Selector};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const APP_WEB: &[(&str, &str)] = &[("app", "web"), ("tier", "frontend"), ("env", "prod")];
const NONE: &[(&str, &str)] = &[];
const ODD: &[(&str, &str)] = &[
    ("projectcalico.org/namespace", "kube-system"),
    ("k8s-app", "kube-dns"),
    ("quote", "say \"hi\""),
    ("empty", ""),
];

type LabelPairs = &'static [(&'static str, &'static str)];

#[rustfmt::skip]
const MATCHES: &[(&str, LabelPairs, bool)] = &[
    ("", APP_WEB, true),
    ("   ", NONE, true),
    ("all()", NONE, true),
    ("all( )", APP_WEB, true),
    ("global()", APP_WEB, true),
    ("app == 'web'", APP_WEB, true),
    ("app == \"web\"", APP_WEB, true),
    ("app=='web'", APP_WEB, true),
    ("app == 'db'", APP_WEB, false),
    ("app == 'web'", NONE, false),
    ("app != 'db'", APP_WEB, true),
    ("app != 'web'", APP_WEB, false),
    ("app != 'web'", NONE, true),
    ("has(app)", APP_WEB, true),
    ("has( app )", APP_WEB, true),
    ("has(app)", NONE, false),
    ("!has(app)", NONE, true),
    ("!has(app)", APP_WEB, false),
    ("app in {'web', 'db'}", APP_WEB, true),
    ("app in {'db'}", APP_WEB, false),
    ("app in {}", APP_WEB, false),
    ("app in {'web'}", NONE, false),
    ("app not in {'db'}", APP_WEB, true),
    ("app not in {'web','db'}", APP_WEB, false),
    ("app not in {'web'}", NONE, true),
    ("app not in {}", NONE, true),
    ("app contains 'e'", APP_WEB, true),
    ("app contains 'x'", APP_WEB, false),
    ("app contains ''", APP_WEB, true),
    ("app contains ''", NONE, false),
    ("tier starts with 'front'", APP_WEB, true),
    ("tier starts with 'end'", APP_WEB, false),
    ("tier ends with 'end'", APP_WEB, true),
    ("tier ends   with 'front'", APP_WEB, false),
    ("app == 'web' && env == 'prod'", APP_WEB, true),
    ("app == 'web' && env == 'dev'", APP_WEB, false),
    ("app == 'db' || env == 'prod'", APP_WEB, true),
    ("app == 'db' || env == 'dev'", APP_WEB, false),
    ("!(app == 'db' || env == 'dev')", APP_WEB, true),
    ("!app == 'web'", APP_WEB, false),
    ("!!has(app)", APP_WEB, true),
    // && binds tighter than ||.
    ("app == 'db' && env == 'x' || tier == 'frontend'", APP_WEB, true),
    ("app == 'db' && (env == 'x' || tier == 'frontend')", APP_WEB, false),
    ("has(app) && !has(db) && (env in {'prod', 'staging'} || all())", APP_WEB, true),
    ("projectcalico.org/namespace == 'kube-system'", ODD, true),
    ("k8s-app == \"kube-dns\" && has(projectcalico.org/namespace)", ODD, true),
    ("quote == 'say \"hi\"'", ODD, true),
    ("quote contains '\"'", ODD, true),
    ("empty == ''", ODD, true),
    ("has(empty)", ODD, true),
    ("empty != ''", ODD, false),
    // Keywords are only keywords after a label: labels may be called in, contains, not, all.
    ("in == 'x'", &[("in", "x")], true),
    ("contains in {'x'}", &[("contains", "x")], true),
    ("not not in {'y'}", &[("not", "x")], true),
    ("all == 'x'", &[("all", "x")], true),
];

#[test]
fn selectors_match_as_upstream() {
    for (text, pairs, expected) in MATCHES {
        let selector =
            Selector::parse(text).unwrap_or_else(|e| panic!("`{text}` should parse: {e}"));
        assert_eq!(
            selector.matches(&labels(pairs)),
            *expected,
            "`{text}` against {pairs:?}"
        );
        // The canonical form means the same thing.
        let reparsed = Selector::parse(&selector.to_string()).expect("canonical form parses");
        assert_eq!(
            reparsed.matches(&labels(pairs)),
            *expected,
            "canonical `{selector}`"
        );
    }
}

#[rustfmt::skip]
const CANONICAL: &[(&str, &str)] = &[
    ("", "all()"),
    ("all()", "all()"),
    ("a=='b'", "a == \"b\""),
    ("a  !=   \"b\"", "a != \"b\""),
    ("a == 'say \"x\"'", "a == 'say \"x\"'"),
    ("has(  a )", "has(a)"),
    ("! has(a)", "!has(a)"),
    ("a in {'z','a','z'}", "a in {\"a\", \"z\"}"),
    ("a not in {}", "a not in {}"),
    ("a contains 'x'", "a contains \"x\""),
    ("a starts  with 'x'", "a starts with \"x\""),
    ("a ends with 'x'", "a ends with \"x\""),
    ("a == 'b' && c == 'd'", "(a == \"b\" && c == \"d\")"),
    ("a == 'b' && c == 'd' && has(e)", "(a == \"b\" && c == \"d\" && has(e))"),
    ("a == 'b' || c == 'd' && has(e)", "(a == \"b\" || (c == \"d\" && has(e)))"),
    ("((a == 'b'))", "a == \"b\""),
    ("(a == 'b' || c == 'd') && has(e)", "((a == \"b\" || c == \"d\") && has(e))"),
    ("!(a == 'b' && global())", "!(a == \"b\" && global())"),
    // Upstream's spellings: operator words written together, a trailing comma in a set,
    // double negation dropped.
    ("a startswith 'x'", "a starts with \"x\""),
    ("a endswith 'x'", "a ends with \"x\""),
    ("a notin {'x'}", "a not in {\"x\"}"),
    ("a in {'x', 'y',}", "a in {\"x\", \"y\"}"),
    ("!!has(a)", "has(a)"),
    ("!!!has(a)", "!has(a)"),
    ("!(!(a == 'b' || has(c)))", "(a == \"b\" || has(c))"),
];

#[test]
fn selectors_print_canonically() {
    for (text, canonical) in CANONICAL {
        let selector = Selector::parse(text).unwrap_or_else(|e| panic!("`{text}`: {e}"));
        assert_eq!(
            selector.to_string(),
            *canonical,
            "canonical form of `{text}`"
        );
        assert_eq!(
            Selector::parse(canonical).expect("canonical parses"),
            selector,
            "canonical `{canonical}` parses back to the same selector"
        );
    }
}

#[rustfmt::skip]
const SYNTAX_ERRORS: &[(&str, usize, &str)] = &[
    ("a = 'b'", 2, "expected '=='"),
    ("a == b", 5, "expected a quoted string after '=='"),
    ("a == 'b", 5, "unterminated string"),
    ("a == \"b", 5, "unterminated string"),
    ("a", 1, "expected an operator after label 'a'"),
    ("a 'b'", 2, "expected an operator"),
    ("a is 'b'", 2, "expected an operator"),
    ("a starts 'b'", 9, "expected 'with' after 'starts'"),
    ("a ends wit 'b'", 7, "expected 'with' after 'ends'"),
    ("a not 'b'", 6, "expected 'in' after 'not'"),
    ("a in 'b'", 5, "expected '{' to open a set"),
    ("a in {'b' 'c'}", 10, "expected ',' or '}' in the set"),
    ("a in {'b',,}", 10, "expected a quoted string in the set"),
    ("a in {,}", 6, "expected a quoted string in the set"),
    ("a in {b}", 6, "expected a quoted string in the set"),
    ("a in {'b'", 9, "expected ',' or '}' in the set"),
    ("has(a", 5, "expected ')' to close 'has('"),
    ("has()", 4, "expected a label name in 'has(…)'"),
    ("has(a b)", 6, "expected ')' to close 'has('"),
    ("all(x)", 4, "expected ')' to close 'all('"),
    ("global(", 7, "expected ')' to close 'global('"),
    ("a == 'b' &", 9, "expected '&&'"),
    ("a == 'b' | c == 'd'", 9, "expected '||'"),
    ("a == 'b' &&", 11, "expected a label"),
    ("&& a == 'b'", 0, "expected a label"),
    ("(a == 'b'", 9, "expected ')' to close '(' at offset 0"),
    ("a == 'b')", 8, "unexpected ')'"),
    ("a == 'b' c == 'd'", 9, "unexpected label 'c'"),
    ("()", 1, "expected a label"),
    ("!", 1, "expected a label"),
    ("a == 'b' $", 9, "unexpected character '$'"),
    ("a == 'b' && (c in {'x'} || )", 27, "expected a label"),
];

#[test]
fn syntax_errors_name_the_offset() {
    for (text, offset, message) in SYNTAX_ERRORS {
        let err = Selector::parse(text).expect_err(&format!("`{text}` must not parse"));
        assert_eq!(err.offset, *offset, "offset for `{text}`: {err}");
        assert!(
            err.message.contains(message),
            "error for `{text}` is `{err}`, expected it to contain `{message}`"
        );
    }
}

#[test]
fn caret_points_at_the_error() {
    let text = "app == 'web' && tier = 'x'";
    let err = Selector::parse(text).unwrap_err();
    assert_eq!(err.caret(text), format!("{text}\n{}^", " ".repeat(21)));
}

#[test]
fn deep_nesting_is_refused_not_overflowed() {
    let deep = format!("{}has(a){}", "(".repeat(10_000), ")".repeat(10_000));
    let err = Selector::parse(&deep).unwrap_err();
    assert!(err.message.contains("nested deeper"), "{err}");
    let nots = format!("{}has(a)", "!".repeat(10_000));
    assert!(Selector::parse(&nots).is_err());
}

#[test]
fn profile_labels_are_inherited_with_endpoint_labels_winning() {
    let own = labels(&[("app", "web")]);
    let profile_a = labels(&[("app", "overridden"), ("team", "a")]);
    let profile_b = labels(&[("team", "b"), ("zone", "z1")]);
    let parents = [&profile_a, &profile_b];
    let inherited = InheritedLabels {
        own: &own,
        inherited: &parents,
    };
    for (text, expected) in [
        ("app == 'web'", true),
        ("app == 'overridden'", false),
        ("team == 'a'", true),
        ("team == 'b'", false),
        ("zone == 'z1'", true),
        ("has(missing)", false),
    ] {
        let selector = Selector::parse(text).unwrap();
        assert_eq!(selector.matches(&inherited), expected, "`{text}`");
    }
}

/// Label names are at most 512 characters, as upstream's tokenizer reads them: in a
/// comparison and in `has(…)`; 512 itself is fine.
#[test]
fn label_names_longer_than_512_characters_are_refused() {
    let long = "k".repeat(513);
    for text in [format!("{long} == 'v'"), format!("has({long})")] {
        let err = Selector::parse(&text).expect_err("a 513-character label");
        assert!(
            err.message
                .contains("label name longer than 512 characters"),
            "{err}"
        );
    }
    let limit = "k".repeat(512);
    for text in [format!("{limit} == 'v'"), format!("has({limit})")] {
        Selector::parse(&text).unwrap_or_else(|e| panic!("512 characters: {e}"));
    }
}
