//! Running external commands with the command line in every error.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// A command whose failure names itself.
pub(crate) struct Cmd(Command);

impl Cmd {
    pub(crate) fn new(program: impl AsRef<OsStr>) -> Self {
        Self(Command::new(program))
    }

    pub(crate) fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.0.args(args);
        self
    }

    pub(crate) fn arg_path(mut self, path: &Path) -> Self {
        self.0.arg(path);
        self
    }

    pub(crate) fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.0.env(key, value);
        self
    }

    pub(crate) fn current_dir(mut self, dir: &Path) -> Self {
        self.0.current_dir(dir);
        self
    }

    /// Runs with inherited stdio; fails unless the exit status is success.
    pub(crate) fn run(mut self) -> Result<()> {
        let line = self.line();
        let status = self
            .0
            .status()
            .with_context(|| format!("could not start `{line}`"))?;
        if !status.success() {
            bail!("`{line}` failed ({status})");
        }
        Ok(())
    }

    /// Runs capturing stdout; fails with stderr unless the exit status is success.
    pub(crate) fn output(mut self) -> Result<String> {
        let line = self.line();
        let out = self
            .0
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("could not start `{line}`"))?;
        if !out.status.success() {
            bail!(
                "`{line}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a libtest-based test command, echoing its stdout while adding up the `test result:`
    /// lines and the harness's SKIPPED notices.
    pub(crate) fn run_tests(mut self) -> Result<TestTally> {
        let line = self.line();
        let mut child = self
            .0
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start `{line}`"))?;
        let stdout = child.stdout.take().expect("stdout was piped");
        let mut tally = TestTally::default();
        for text in BufReader::new(stdout).lines() {
            let text = text.context("reading test output")?;
            println!("{text}");
            tally.add_line(&text);
        }
        let status = child.wait()?;
        tally.status_ok = status.success();
        if !status.success() && tally.failed == 0 {
            bail!("`{line}` failed ({status}) before reporting a failing test");
        }
        Ok(tally)
    }

    fn line(&self) -> String {
        std::iter::once(self.0.get_program())
            .chain(self.0.get_args())
            .map(|s| s.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Test counts summed over every test binary of a run. libtest has no "skipped" outcome: a test
/// whose requirements are missing returns early and is reported `ok`, so every harness SKIPPED
/// notice moves one test from passed to skipped, by name.
#[derive(Debug, Default)]
pub(crate) struct TestTally {
    /// As libtest reported them, skipped tests included.
    reported_ok: u64,
    pub(crate) failed: u64,
    pub(crate) skipped: Vec<String>,
    status_ok: bool,
}

impl TestTally {
    fn add_line(&mut self, line: &str) {
        if let Some(summary) = line.strip_prefix("test result: ") {
            // e.g. "ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; ..."
            for part in summary.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(label), Some(count)) = (words.next(), words.next()) else {
                    continue;
                };
                let count: u64 = count.parse().unwrap_or(0);
                match label {
                    "passed" => self.reported_ok += count,
                    "failed" => self.failed += count,
                    _ => {}
                }
            }
        } else if let Some((_, rest)) = line.split_once("*** SKIPPED ") {
            let name = rest.split(':').next().unwrap_or(rest).to_owned();
            self.skipped.push(name);
        }
    }

    /// Tests that ran and passed (skips excluded).
    pub(crate) fn passed(&self) -> u64 {
        self.reported_ok.saturating_sub(self.skipped.len() as u64)
    }

    pub(crate) fn ensure_green(&self) -> Result<()> {
        if self.failed > 0 || !self.status_ok {
            bail!("{} test(s) failed", self.failed);
        }
        if self.passed() == 0 {
            bail!("no test ran");
        }
        Ok(())
    }
}

/// The cargo that runs this xtask, in `dir`.
pub(crate) fn cargo(dir: &Path) -> Cmd {
    Cmd::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).current_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::TestTally;

    #[test]
    fn a_skipped_test_counts_as_skipped_not_passed() {
        let mut t = TestTally::default();
        for line in [
            "*** SKIPPED netns_test: not running as root (euid != 0) ***",
            "test result: ok. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.1s",
            "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.1s",
        ] {
            t.add_line(line);
        }
        assert_eq!((t.passed(), t.failed), (4, 1));
        assert_eq!(t.skipped, ["netns_test"]);
    }
}
