//! The parser never panics, and whatever parses prints to a form that parses back to itself.
#![no_main]

use calico_selector::Selector;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Selector::parse(text) {
        Ok(selector) => {
            let printed = selector.to_string();
            let reparsed = Selector::parse(&printed).expect("canonical form must parse");
            assert_eq!(reparsed, selector, "`{text}` printed as `{printed}`");
        }
        Err(err) => assert!(err.offset <= text.len()),
    }
});
