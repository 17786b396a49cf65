//! calicoctl's input: YAML or JSON documents as `-f` reads them. Parsing and validation never
//! panic, and a resource that validates is written (`get -o yaml` / `-o json`) in a form that
//! reads back as the same resource.
#![no_main]

use calico_model::{parse_documents, to_json, to_yaml, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(resources) = parse_documents(text) else {
        return;
    };
    for resource in resources {
        if validate(&resource).is_err() {
            continue;
        }
        let one = std::slice::from_ref(&resource);
        for written in [to_yaml(one), to_json(one)] {
            let read = parse_documents(&written).unwrap_or_else(|e| {
                panic!("{resource:?} written as\n{written}\ndoes not read: {e}")
            });
            assert_eq!(read, one, "written as\n{written}");
        }
    }
});
