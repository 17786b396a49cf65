//! Differential test: for random worlds, policies and packets, the compiled tables (looked up
//! the way the dataplane looks them up) give exactly the reference evaluator's verdict.

use std::sync::atomic::{AtomicUsize, Ordering};

use calico_policy::{
    evaluate,
    testing::{make_packet, packet, world},
    CompiledProgram, Direction,
};
use proptest::prelude::*;

#[test]
fn compiled_tables_agree_with_the_reference() {
    let cases = AtomicUsize::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(1500));
    let strategy = (
        world(),
        0usize..4,
        any::<bool>(),
        prop::collection::vec(packet(), 60),
    );
    let result = runner.run(&strategy, |(w, endpoint, ingress, packets)| {
        let id = w.endpoints.keys().nth(endpoint).unwrap().clone();
        let addresses = w.endpoints[&id].addresses.clone();
        let direction = if ingress {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let program = w.program(&id, direction);
        let compiled = CompiledProgram::compile(&w, &program, &addresses, direction)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for numbers in packets {
            let Some(packet) = make_packet(&addresses, ingress, numbers) else {
                continue;
            };
            let reference = evaluate(&w, &program, &packet);
            let table = compiled.lookup(&packet);
            prop_assert_eq!(
                table,
                Some(&reference),
                "packet {:?}\nprogram {:#?}",
                packet,
                program
            );
            cases.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let n = cases.load(Ordering::Relaxed);
    assert!(n > 5_000, "too few packets were checked: {n}");
    println!(
        "differential: {n} (program, packet) cases, compiled tables == reference verdict in all"
    );
}
