//! A reachability matrix among a few endpoints, as the demos print it: measured, waited for
//! until it is what a policy says, and printed row → column.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// `probe(from, to)` for every ordered pair of `n` endpoints (the diagonal is `true`).
pub fn reach_matrix(
    n: usize,
    probe: impl Fn(usize, usize) -> Result<bool>,
) -> Result<Vec<Vec<bool>>> {
    (0..n)
        .map(|from| {
            (0..n)
                .map(|to| {
                    if from == to {
                        Ok(true)
                    } else {
                        probe(from, to)
                    }
                })
                .collect()
        })
        .collect()
}

/// Measures until the matrix is what `expected(from, to)` says (programming takes a moment);
/// after `timeout`, prints the last one under `names` and fails.
pub fn wait_reach_matrix(
    names: &[String],
    probe: impl Fn(usize, usize) -> Result<bool>,
    expected: impl Fn(usize, usize) -> bool,
    timeout: Duration,
) -> Result<Vec<Vec<bool>>> {
    let n = names.len();
    let want: Vec<Vec<bool>> = (0..n)
        .map(|f| (0..n).map(|t| f == t || expected(f, t)).collect())
        .collect();
    let deadline = Instant::now() + timeout;
    loop {
        let got = reach_matrix(n, &probe)?;
        if got == want {
            return Ok(got);
        }
        if Instant::now() > deadline {
            print_reach_matrix(names, &got);
            bail!("reachability is not what the policy says (expected {want:?})");
        }
    }
}

/// Prints the matrix, rows reaching columns.
pub fn print_reach_matrix(names: &[String], m: &[Vec<bool>]) {
    let width = names.iter().map(String::len).max().unwrap_or(0).max(7) + 3;
    print!("{:>width$}", "");
    for name in names {
        print!("{name:>width$}");
    }
    println!();
    for (i, name) in names.iter().enumerate() {
        print!("{name:>width$}");
        for (j, ok) in m[i].iter().enumerate() {
            let cell = if i == j {
                "-"
            } else if *ok {
                "allowed"
            } else {
                "DENIED"
            };
            print!("{cell:>width$}");
        }
        println!();
    }
}
